"""Whole-sequence operator against per-step autograd of the same package.

Both compute the same stacked ConvGRU over a sequence with the same weights:

* ``sequence``: ``ConvGRU2d`` -- per layer one batched input convolution and one
  operator (one autograd node) for the whole time loop; the hidden weight
  gradient is one batched call.
* ``steps``: ``ConvGRUCell2d`` stepped in a Python loop over time and layers --
  one input convolution and one autograd node per step, weight gradients
  accumulated step by step.

Measured per workload: forward+backward time (median; CUDA synchronised), the
bytes autograd keeps for the backward pass (every saved tensor's storage,
counted once, via ``torch.autograd.graph.saved_tensors_hooks``: the same on any
device) and, on CUDA, the peak memory of the training step.

    python -m bench.sequence_vs_steps [--device cpu|cuda] [--dtype float32|bfloat16] [--out DIR]

On CPU it runs scaled-down versions of the workloads (same structure).
Writes ``sequence_vs_steps-<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch

from convgru_triton import ConvGRU2d, ConvGRUCell2d

from .machine import convgru_machine_info, sync


@dataclass(frozen=True)
class SequenceWorkload:
    name: str
    steps: int
    batch: int
    input_channels: int
    hidden_channels: int
    size: int
    kernel_size: int
    num_layers: int


# Full sizes (CUDA) and CPU versions of the same structure.
WORKLOADS = {
    "cuda": [
        SequenceWorkload("moving-mnist", 10, 16, 64, 128, 16, 5, 2),
        SequenceWorkload("nowcasting-96", 5, 4, 16, 64, 96, 3, 1),
        SequenceWorkload("nowcasting-32", 5, 4, 64, 192, 32, 3, 1),
    ],
    "cpu": [
        SequenceWorkload("moving-mnist", 10, 2, 16, 32, 16, 5, 2),
        SequenceWorkload("nowcasting-96", 5, 1, 8, 16, 48, 3, 1),
        SequenceWorkload("nowcasting-32", 5, 1, 16, 48, 32, 3, 1),
    ],
}


class StepLoop(torch.nn.Module):
    """The ConvGRU2d of ``model`` as cells stepped in Python (per-step autograd)."""

    def __init__(self, model: ConvGRU2d):
        super().__init__()
        self.cells = torch.nn.ModuleList()
        for layer in range(model.num_layers):
            cell = ConvGRUCell2d(
                model.input_channels if layer == 0 else model.hidden_channels, model.hidden_channels,
                model.kernel_size, device=model.weight_ih_l0.device, dtype=model.weight_ih_l0.dtype,
            )
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).data.copy_(getattr(model, f"{name}_l{layer}"))
            self.cells.append(cell)

    def forward(self, x):
        states: List = [None] * len(self.cells)
        outputs = []
        for t in range(x.shape[0]):
            inp = x[t]
            for i, cell in enumerate(self.cells):
                states[i] = cell(inp, states[i])
                inp = states[i]
            outputs.append(inp)
        return torch.stack(outputs), torch.stack(states)


def _loss(model, x):
    out, h_n = model(x)
    return out.float().square().mean() + h_n.float().mean()


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, x)
    loss.backward()
    return sum(storages.values())


def time_step(model, x, device, repeats: int) -> float:
    """Median seconds of one forward+backward."""
    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, x).backward()

    for _ in range(2):
        step()
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_memory(model, x, device) -> int:
    if device.type != "cuda":
        return 0
    model.zero_grad(set_to_none=True)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _loss(model, x).backward()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def run(workload: SequenceWorkload, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    model = ConvGRU2d(workload.input_channels, workload.hidden_channels, workload.kernel_size,
                      num_layers=workload.num_layers, device=device, dtype=dtype)
    loop = StepLoop(model)
    x = torch.randn(workload.steps, workload.batch, workload.input_channels, workload.size, workload.size,
                    device=device, dtype=dtype)
    with torch.no_grad():  # same function before timing anything
        a, b = model(x)[0], loop(x)[0]
        error = ((a.float() - b.float()).norm() / b.float().norm()).item()
    row = {"workload": asdict(workload), "relative_error": error}
    for name, m in (("sequence", model), ("steps", loop)):
        row[name] = {
            "fwd_bwd_ms": 1e3 * time_step(m, x, device, repeats),
            "saved_bytes": saved_bytes(m, x),
            "peak_bytes": peak_memory(m, x, device),
        }
    row["speedup"] = row["steps"]["fwd_bwd_ms"] / row["sequence"]["fwd_bwd_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 5 CPU, 20 CUDA)")
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    rows = [run(w, device, dtype, repeats) for w in WORKLOADS[device.type]]
    report = {"machine": convgru_machine_info(device), "dtype": args.dtype, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sequence_vs_steps-{device.type}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    mib = 1 / 2**20
    print(f"| workload ({device.type}, {args.dtype}) | sequence ms | steps ms | speed-up | "
          "saved for backward MiB, sequence / steps | peak MiB, sequence / steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s, p = r["sequence"], r["steps"]
        peak = f"{s['peak_bytes'] * mib:.1f} / {p['peak_bytes'] * mib:.1f}" if device.type == "cuda" else "n/a (CPU)"
        print(f"| {r['workload']['name']} | {s['fwd_bwd_ms']:.2f} | {p['fwd_bwd_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{s['saved_bytes'] * mib:.1f} / {p['saved_bytes'] * mib:.1f} | {peak} |")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
