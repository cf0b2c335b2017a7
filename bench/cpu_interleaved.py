"""The CPU workloads of ``pytest bench`` timed interleaved, in CPU time.

``pytest bench --benchmark-only`` times each benchmark for a second, one after
the other, in wall-clock time: on a machine shared with other jobs the
providers of one row are measured under different loads. This runs the same
workloads, models and inputs (:mod:`bench.workloads`, CPU sizes, float32) with
the providers ``seed``, ``raft`` and ``ours`` (eager backend) round-robin,
``--rounds`` times, and measures each call's CPU time (``time.thread_time``,
on one torch thread: waiting for a core does not count). Reported: the median
per provider, min-max, and ``ours`` against the faster eager baseline, from the
medians and paired (the median over rounds of the ratio within a round).

    python -m bench.cpu_interleaved [--rounds 15] [--label after] [--out bench/results]

writes ``cpu_interleaved-<label>.{json,md}``. Run it on two commits (e.g. a
``git worktree`` of the older one on ``PYTHONPATH``) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict

import torch

from bench import workloads as wl
from bench.machine import convgru_machine_info

PROVIDERS = ("seed", "raft", "ours")


def measure(rounds: int, names=None) -> Dict:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    results: Dict = {}
    for workload in wl.CPU_WORKLOADS:
        if names and workload.name not in names:
            continue
        master = wl.make_master(workload, device)
        for pass_ in wl.PASSES:
            backward = pass_ == "fwd+bwd"
            steps = {}
            for provider in PROVIDERS:
                model = wl.build_model(workload, provider, master, torch.float32)
                inputs = wl.make_inputs(workload, device, torch.float32, requires_grad=backward)
                step = wl.make_step(model, inputs, backward)
                step()
                step()
                steps[provider] = step
            times = {p: [] for p in steps}
            for _ in range(rounds):
                for provider, step in steps.items():
                    start = time.thread_time()
                    step()
                    times[provider].append((time.thread_time() - start) * 1e3)
            row = {p: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v),
                       "runs_ms": [round(t, 3) for t in v]} for p, v in times.items()}
            best = min(row["seed"]["median_ms"], row["raft"]["median_ms"])
            row["ours_vs_best"] = best / row["ours"]["median_ms"]
            # Paired: the faster baseline over ours within each round (runs a
            # fraction of a second apart), median over rounds.
            row["ours_vs_best_paired"] = statistics.median(
                min(s, r) / o for s, r, o in zip(times["seed"], times["raft"], times["ours"]))
            results[f"{workload.name} {pass_}"] = row
            print(f"{workload.name:16s} {pass_:8s} " + " ".join(
                f"{p} {row[p]['median_ms']:8.2f}" for p in PROVIDERS) + f"  best/ours {row['ours_vs_best']:.3f}",
                flush=True)
    return results


def markdown(results: Dict, info: Dict, label: str, rounds: int) -> str:
    lines = [
        f"CPU time per call, ms (median of {rounds} interleaved rounds, min–max), 1 torch thread, float32, "
        f"CPU workload sizes · {info.get('cpu')} · torch {info.get('torch')} · commit "
        f"{str(info.get('commit'))[:12]} ({label})",
        "",
        "`ours vs faster baseline`: the faster baseline's median over ours'; `paired`: the median over rounds of "
        "the faster baseline's time in that round over ours (which favours the baselines a little: the faster of "
        "two noisy times).",
        "",
        "| workload | pass | seed | raft | ours | ours vs faster baseline | paired |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for key, row in results.items():
        name, pass_ = key.rsplit(" ", 1)
        cells = [f"{row[p]['median_ms']:.2f} ({row[p]['min_ms']:.1f}–{row[p]['max_ms']:.1f})" for p in PROVIDERS]
        lines.append(f"| {name} | {pass_} | " + " | ".join(cells)
                     + f" | {row['ours_vs_best']:.2f}× | {row['ours_vs_best_paired']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    names = args.workloads.split(",") if args.workloads else None
    results = measure(args.rounds, names)
    info = convgru_machine_info(torch.device("cpu"))
    text = markdown(results, info, args.label, args.rounds)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"cpu_interleaved-{args.label}")
        with open(stem + ".json", "w") as f:
            json.dump({"machine_info": info, "label": args.label, "rounds": args.rounds, "results": results}, f,
                      indent=1)
        with open(stem + ".md", "w") as f:
            f.write(f"# CPU workloads, interleaved ({args.label})\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
