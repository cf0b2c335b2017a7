"""Where the time goes: torch.profiler tables of one benchmark workload per provider.

    python -m bench.profile_workload [--workload raft-convgru] [--pass fwd+bwd] [--dtype bfloat16]
                            [--providers raft,compile,ours,ours-fused] [--size full|cpu|tiny] [--steps 5]

For each provider: the workload's model and inputs exactly as in the benchmark
suite, a warm-up, then ``--steps`` calls under ``torch.profiler``; prints the
total time per call and the operators/kernels that take it (self CUDA time on
a GPU, self CPU time on CPU), as markdown. This is the "why" behind a missed
target: e.g. how much of a training step is convolution, how much gate math,
how much launch overhead.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

from bench import workloads as wl
from bench.machine import sync


def profile_provider(workload, provider, dtype, device, backward: bool, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    reason = wl.unavailable(provider, device, dtype)
    if reason:  # never cuDNN + the gate kernels under the fused step's name
        return f"**{provider}**: skipped: {reason}\n"
    torch._dynamo.reset()
    master = wl.make_master(workload, device)
    model = wl.build_model(workload, provider, master, dtype)
    inputs = wl.make_inputs(workload, device, dtype, requires_grad=backward)
    run = wl.make_step(model, inputs, backward)

    def step():
        run()
        sync(device)

    note = ""
    if provider in wl.OURS:  # which path ran: the fused step's kernels for ours-fused only
        with wl.count_fused_launches() as launches:
            step()
        wl.check_path(provider, launches[0])
        note = f"; {launches[0]} fused-step launches per call"
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per_call = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    if device.type == "cuda":
        key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        key = "self_cpu_time_total"
    events = sorted(averages, key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in averages) or 1
    where = "GPU" if device.type == "cuda" else "CPU"
    lines = [f"**{provider}**: {per_call * 1e3:.3f} ms per call (wall, unprofiled); "
             f"profiled self {where} time {total / steps / 1e3:.3f} ms per call{note}", "",
             f"| operator / kernel | self {where} ms per call | share | calls per call |", "|---|--:|--:|--:|"]
    for e in events[:rows]:
        t = getattr(e, key, 0)
        if t <= 0:
            break
        name = e.key if len(e.key) <= 70 else e.key[:67] + "..."
        lines.append(f"| `{name}` | {t / steps / 1e3:.3f} | {t / total * 100:.1f}% | {e.count / steps:g} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_workload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="raft-convgru")
    parser.add_argument("--pass", dest="pass_", default="fwd+bwd", choices=wl.PASSES)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--providers", default="raft,compile,ours,ours-fused")
    parser.add_argument("--size", default=None, choices=sorted(wl.WORKLOAD_SETS), help="default full on CUDA, cpu on CPU")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.size or ("full" if device.type == "cuda" else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    workload = next((w for w in wl.WORKLOAD_SETS[size] if w.name == args.workload), None)
    if workload is None:
        parser.error(f"unknown workload {args.workload!r}")
    from bench.machine import convgru_machine_info
    from bench.report import machine_line

    print(f"### Profile: `{workload.name}` {args.pass_} {dtype_name} ({workload.describe()})\n")
    print(machine_line({"machine_info": {"convgru": convgru_machine_info(device)}}) + "\n")
    status = 0
    for provider in [p.strip() for p in args.providers.split(",") if p.strip()]:
        try:
            print(profile_provider(workload, provider, wl.DTYPES[dtype_name], device, args.pass_ == "fwd+bwd",
                                   args.steps, args.rows))
        except Exception as exc:  # e.g. a torch.compile failure: report it, profile the others
            print(f"**{provider}**: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}\n")
            status = 1
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
