"""A 12-step RAFT update loop: eager, replayed from a CUDA graph, and under
``torch.compile(mode="reduce-overhead")`` (which captures CUDA graphs itself).

RAFT runs its GRU cell 12-32 times per image pair with the same shapes; once
the host cost of a step is near the GPU's, replaying the captured loop removes
it. For each cell (``ConvGRUCell2d`` 3x3 as in RAFT-small's update, and
``SepConvGRUCell2d`` 1x5 + 5x1 as in RAFT-large), at RAFT's sizes (N=6, 256
input and 128 hidden channels, 46x62 = 1/8 of a 368x496 crop), bfloat16,
inference:

* ``eager``: the loop in Python, one launch sequence per step;
* ``graph``: the loop captured once into a ``torch.cuda.CUDAGraph`` (static
  input and state tensors; ``copy_`` new inputs in, ``replay()``);
* ``reduce-overhead``: ``torch.compile(loop, mode="reduce-overhead")``.

Each cell runs twice: first with the fused step forced
(``CONVGRU_TRITON_FUSED_STEP=1``: convolution and gate math in one pass;
eager and graph, the rows named "fused step", first so that a time limit
leaves them measured; ``reduce-overhead`` traces the step's math for
Inductor, not the fused kernels, so it is not repeated), then ``=0``: cuDNN +
the gate kernels. A fused row counts the fused step's launches in its
warm-up and fails when there are none (never cuDNN + the gate kernels under
its name); under ``--dry-run`` it runs the kernels in the Triton
interpreter (``TRITON_INTERPRET=1``) or says why it is skipped.

Each replay is checked against the eager loop (same kernels, so the same
values are expected; the maximum difference is reported), then timed: ms per
step (the loop's time / 12), median of ``--repeats`` runs, CUDA-synchronised.

    python -m bench.cuda_graphs [--out DIR] [--time-limit 90] [--batch 6]
    python -m bench.cuda_graphs --dry-run     # CPU: tiny sizes, eager parts only (checks the script)

Writes ``cuda_graphs-<device>.{json,md}`` into ``--out``; the JSON
(:func:`result_json`) names each row's workload of ``bench/workloads.py`` and
the shape, so that ``bench/report.py`` can set a row's replay time against
that workload's roofline floor (the fused step's target: ≤ 2× the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

from bench import workloads as wl

STEPS = 12
#: The workload of bench/workloads.py each cell's loop is one step of, 12 times (at its full size on CUDA).
CELL_WORKLOADS = {"ConvGRUCell2d 3x3": "raft-convgru", "SepConvGRUCell2d 1x5+5x1": "raft-sepconvgru"}


def raft_loop(cell: torch.nn.Module, steps: int = STEPS) -> Callable:
    """RAFT's update loop over the GRU: the state of each step is the next one's.
    (RAFT's input also changes every step, computed from the state's flow
    estimate; a fixed input keeps the loop about the GRU.)"""

    def loop(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for _ in range(steps):
            h = cell(x, h)
        return h

    return loop


def _timed(fn: Callable[[], object], device: torch.device, repeats: int, deadline: float) -> List[float]:
    """Seconds per call of ``fn``, CUDA-synchronised, until ``repeats`` or the deadline."""
    times = []
    for _ in range(repeats):
        if time.perf_counter() > deadline and times:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _capture(loop: Callable, x: torch.Tensor, h: torch.Tensor):
    """``(graph, static_x, static_h, static_out)``: the loop captured into a CUDA
    graph after a warm-up on a side stream (the documented recipe)."""
    static_x, static_h = x.clone(), h.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            loop(static_x, static_h)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x, static_h)
    return graph, static_x, static_h, static_out


def _difference(a: torch.Tensor, b: torch.Tensor) -> Dict:
    diff = (a.float() - b.float()).abs()
    return {"max_abs_diff": float(diff.max()), "bitwise_equal": bool(torch.equal(a, b))}


def run_cell(name: str, cell: torch.nn.Module, x: torch.Tensor, h: torch.Tensor, repeats: int,
             deadline: float, fused: str = "0") -> Dict:
    """One row: ``fused`` is the ``fused_step`` setting while the row runs
    (``"1"``: the fused step, checked to launch; ``"0"``: cuDNN + the gate kernels)."""
    result: Dict = {"cell": name + (" · fused step" if fused == "1" else ""), "fused_step": fused,
                    "workload": CELL_WORKLOADS.get(name)}
    reason = wl.unavailable("ours-fused", x.device, x.dtype) if fused == "1" else None
    if reason:
        result["eager"] = f"skipped: {reason}"
        return result
    with wl.fused_switch(fused):
        return _run_cell(result, cell, x, h, repeats, deadline, compile_too=fused != "1")


def _run_cell(result: Dict, cell: torch.nn.Module, x: torch.Tensor, h: torch.Tensor, repeats: int,
              deadline: float, compile_too: bool) -> Dict:
    device = x.device
    loop = raft_loop(cell)
    with torch.no_grad():
        # warm-up (plans, Triton compilation, cuDNN set-up) and the reference
        with wl.count_fused_launches() as launches:
            want = loop(x, h)
        result["fused_launches"] = launches[0]
        wl.check_path("ours-fused" if result["fused_step"] == "1" else "ours", launches[0])
        times = _timed(lambda: loop(x, h), device, repeats, deadline)
        result["eager_ms_per_step"] = statistics.median(times) / STEPS * 1e3
        result["eager_runs"] = len(times)
        if device.type != "cuda":
            result["graph"] = result["reduce-overhead"] = "skipped: no CUDA device"
            return result
        try:
            graph, static_x, static_h, static_out = _capture(loop, x, h)
            static_x.copy_(x)
            static_h.copy_(h)
            graph.replay()
            result["graph_check"] = _difference(static_out, want)
            times = _timed(graph.replay, device, repeats, deadline)
            result["graph_ms_per_step"] = statistics.median(times) / STEPS * 1e3
        except Exception as exc:  # report and go on: the other half may still work
            result["graph"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        if not compile_too:
            result["reduce-overhead"] = "not run: torch.compile traces the step's math, not the fused kernels"
            return result
        if time.perf_counter() > deadline:
            result["reduce-overhead"] = "skipped: time limit"
            return result
        try:
            torch._dynamo.reset()
            compiled = torch.compile(loop, mode="reduce-overhead")
            start = time.perf_counter()
            for _ in range(3):  # compile, record, then replay
                out = compiled(x, h)
            torch.cuda.synchronize(device)
            result["compile_s"] = time.perf_counter() - start
            out = compiled(x, h).clone()
            result["reduce_overhead_check"] = _difference(out, want)
            times = _timed(lambda: compiled(x, h), device, repeats, deadline)
            result["reduce_overhead_ms_per_step"] = statistics.median(times) / STEPS * 1e3
        except Exception as exc:
            result["reduce-overhead"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return result


def build(device: torch.device, dtype: torch.dtype, batch: int, tiny: bool, backend: str = "auto"):
    from convgru_triton import ConvGRUCell2d, SepConvGRUCell2d

    c_in, hidden, size = (6, 4, (5, 7)) if tiny else (256, 128, (46, 62))
    torch.manual_seed(0)
    cells = {
        "ConvGRUCell2d 3x3": ConvGRUCell2d(c_in, hidden, 3, device=device, dtype=dtype, backend=backend),
        "SepConvGRUCell2d 1x5+5x1": SepConvGRUCell2d(c_in, hidden, 5, device=device, dtype=dtype, backend=backend),
    }
    x = torch.randn(batch, c_in, *size, device=device, dtype=dtype)
    h = torch.tanh(torch.randn(batch, hidden, *size, device=device, dtype=dtype))
    return cells, x, h


def result_json(rows: List[Dict], device: str, device_type: str, dtype: torch.dtype, batch: int,
                x: torch.Tensor, h: torch.Tensor) -> Dict:
    """What ``cuda_graphs-<device>.json`` holds: ``device`` (the GPU's name, or
    "CPU (dry run)"), ``device_type`` ("cuda"/"cpu"), ``dtype``, ``batch``,
    ``steps``, the shape (``input_channels``, ``hidden_channels``, ``size``) of
    ``x`` (N, C_in, Y, X) and ``h`` (N, H, Y, X), and the ``rows`` of :func:`run_cell`."""
    return {"device": device, "device_type": device_type, "dtype": str(dtype), "batch": batch, "steps": STEPS,
            "input_channels": x.shape[1], "hidden_channels": h.shape[1], "size": list(h.shape[2:]), "rows": rows}


def markdown(rows: List[Dict], header: str) -> str:
    def ms(row, key):
        v = row.get(key)
        return f"{v:.3f}" if isinstance(v, float) else "—"

    def check(row, key):
        c = row.get(key)
        if not c:
            return "—"
        return "bitwise equal" if c["bitwise_equal"] else f"max diff {c['max_abs_diff']:.3g}"

    lines = [header, "", "| cell | eager ms/step | graph ms/step | reduce-overhead ms/step | graph vs eager | "
             "reduce-overhead vs eager |", "|---|--:|--:|--:|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {ms(r, 'eager_ms_per_step')} | {ms(r, 'graph_ms_per_step')} | "
                     f"{ms(r, 'reduce_overhead_ms_per_step')} | {check(r, 'graph_check')} | "
                     f"{check(r, 'reduce_overhead_check')} |")
    for r in rows:
        for key in ("eager", "graph", "reduce-overhead"):
            if isinstance(r.get(key), str):
                lines.append(f"\n{r['cell']}, {key}: {r[key]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds for the timed parts")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, float32: checks the script")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, dtype, batch = torch.device("cpu"), torch.float32, 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
            return 2
        device, dtype, batch = torch.device("cuda"), torch.bfloat16, args.batch
    deadline = time.perf_counter() + args.time_limit
    cells, x, h = build(device, dtype, batch, tiny=args.dry_run)
    repeats = 3 if args.dry_run else args.repeats
    rows = []
    # The fused step first (the replay target's), the same weights (same seed); on
    # the CPU under the interpreter its cells are forced to the Triton backend (auto: eager).
    if wl.unavailable("ours-fused", device, dtype):
        fused_cells = cells
    else:
        fused_cells = build(device, dtype, batch, tiny=args.dry_run, backend="triton")[0]
    for name, cell in fused_cells.items():
        if args.dry_run and rows:  # the interpreter takes ~0.6 s a step: one cell, one timed loop
            break
        rows.append(run_cell(name, cell, x, h, 1 if args.dry_run else repeats, deadline, fused="1"))
    for name, cell in cells.items():
        rows.append(run_cell(name, cell, x, h, repeats, deadline, fused="0"))
    what = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU (dry run)")
    header = (f"12-step RAFT update loop, N={batch}, {tuple(x.shape[1:])} input, {tuple(h.shape[1:])} state, "
              f"{str(dtype).replace('torch.', '')}, inference · {what} · torch {torch.__version__}")
    text = markdown(rows, header)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"cuda_graphs-{device.type}")
        with open(stem + ".json", "w") as f:
            json.dump(result_json(rows, what, device.type, dtype, batch, x, h), f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write("# CUDA graphs: RAFT update loop\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
