"""Compile time of a ConvGRU training step against sequence length T.

The time loop is inside one operator per layer and direction, so what
torch.compile traces does not depend on T. This measures it: for each T, a
fresh ``torch.compile(model, fullgraph=True)`` runs one forward+backward (trace,
compile and run) and then three more (run only); compile time is the first
minus the fastest of the others. Inductor's on-disk caches are disabled. Also records the graph-break count.

    python -m bench.compile_time [--steps 10 100] [--device cpu|cuda] [--out DIR]

Writes ``compile_time-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch._inductor.config

from convgru_triton import ConvGRU

from .machine import convgru_machine_info, sync


def _training_step(model, x) -> None:
    out, h_n = model(x)
    (out.float().square().mean() + h_n.float().mean()).backward()


def measure(steps: int, device: torch.device, backend: str = "auto") -> dict:
    """Seconds for the first compiled training step and for the next ones."""
    # A compile served from inductor's on-disk caches would measure the cache.
    torch._inductor.config.force_disable_caches = True
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvGRU(8, 16, 3, num_layers=2, bidirectional=True, backend=backend, device=device)
    x = torch.randn(steps, 2, 8, 16, 16, device=device, requires_grad=True)
    breaks = torch._dynamo.explain(model)(x).graph_break_count
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    timings = []
    for _ in range(4):
        sync(device)
        start = time.perf_counter()
        _training_step(compiled, x)
        sync(device)
        timings.append(time.perf_counter() - start)
    first, steady = timings[0], min(timings[1:])
    return {"steps": steps, "first_call_s": first, "steady_call_s": steady, "all_calls_s": timings,
            "compile_s": first - steady, "graph_breaks": breaks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # One discarded compile first: the first in a process also pays one-time
    # imports and initialisation. Then each T is measured `repeats` times,
    # interleaved, keeping the fastest compile.
    measure(args.steps[0], device, args.backend)
    runs = [measure(t, device, args.backend) for _ in range(args.repeats) for t in args.steps]
    rows = [min((r for r in runs if r["steps"] == t), key=lambda r: r["compile_s"]) for t in args.steps]
    base = rows[0]["compile_s"]
    report = {"machine": convgru_machine_info(device), "all_runs": runs, "model": "ConvGRU(8, 16, 3, num_layers=2, bidirectional=True), "
              "N=2, 16x16, fullgraph=True, default mode", "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compile_time-{device.type}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"| T | graph breaks | first step (s) | steady step (s) | compile (s) | vs T={rows[0]['steps']} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['graph_breaks']} | {r['first_call_s']:.2f} | {r['steady_call_s']:.3f} | "
              f"{r['compile_s']:.2f} | {r['compile_s'] / base:.2f}x |")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
