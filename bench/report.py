"""Turn pytest-benchmark JSON into a markdown table and a PNG bar chart.

    python -m bench.report RESULTS.json [MORE.json ...] --out DIR [--name STEM]

writes ``DIR/STEM.md`` and ``DIR/STEM.png`` (STEM defaults to the JSON's file
name). Among the JSON files may be one of ``bench/cuda_graphs.py``
(``cuda_graphs-cuda.json``): its graph-replay times go into the fused-step
targets, against the roofline floor of each RAFT workload's inference step.
The table has one row per workload and pass, the median time of every
provider, the speed-up of ``ours`` over each baseline (baseline median / ours
median) and, on CUDA, the peak memory; each dtype gets its own table. The
machine (CPU model or GPU name), torch and triton versions and the commit are
in the heading.

CPU and GPU numbers never share a table: JSON files from different kinds of
device (or different GPUs/CPUs) are refused, and STEM must start with ``cpu``
or ``gpu`` to match the data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

PROVIDERS = ("seed", "raft", "compile", "ours", "ours-compile", "ours-fused")
BASELINES = ("seed", "raft", "compile")
EAGER_BASELINES = ("seed", "raft")
PASSES = ("fwd", "fwd+bwd")
# The benchmark targets (reported, not enforced).
GPU_TARGETS = {"raft": 1.5, "compile": 1.2}  # ours fwd+bwd speed-up in bfloat16
# The fused step's targets on the benchmark rows (bfloat16, H100/H200, same run): the RAFT
# workloads' training step (fwd+bwd) and inference (fwd) against RAFT's eager cell and
# torch.compile of it; sequence workloads: the fused step no slower than cuDNN + the gate kernels.
FUSED_STEP_SPEEDUPS = {"raft": 1.5, "compile": 1.2}
FUSED_STEP_SEQUENCES = ("nowcast", "mmnist", "dgmr")
# The CUDA-graph replay of the RAFT inference step at most this many times the
# roofline floor of that step (bench/cuda_graphs.py's ms per step over bench/roofline.py's floor).
REPLAY_FLOOR_RATIO = 2.0
# bench/cuda_graphs.py's cells -> the workload each is one step of (= its CELL_WORKLOADS; not
# imported: it imports torch), for its JSON whose rows name no workload (the H200 results in bench/results).
CUDA_GRAPH_CELLS = {"ConvGRUCell2d 3x3": "raft-convgru", "SepConvGRUCell2d 1x5+5x1": "raft-sepconvgru"}
FUSED_SUFFIX = " · fused step"  # bench/cuda_graphs.py's fused rows: the cell's name and this


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def _machine(data: dict) -> dict:
    return dict(data.get("machine_info", {}).get("convgru", {}))


def device_kind(data: dict) -> str:
    """``"cpu"`` or ``"gpu"``: from the machine info, else from the records."""
    dev = _machine(data).get("device")
    if dev is None:
        devs = {b.get("extra_info", {}).get("device") for b in data.get("benchmarks", [])} - {None}
        if len(devs) > 1:
            raise ValueError(f"benchmarks from several devices in one file: {sorted(devs)}")
        dev = devs.pop() if devs else "cpu"
    return "gpu" if dev == "cuda" else "cpu"


def _machine_name(data: dict) -> str:
    m = _machine(data)
    return m.get("gpu") if device_kind(data) == "gpu" else m.get("cpu", "")


def is_cuda_graphs_json(data) -> bool:
    """Whether ``data`` is what ``bench/cuda_graphs.py`` writes (``steps`` and a ``rows`` list)."""
    return isinstance(data, dict) and isinstance(data.get("rows"), list) and "steps" in data


def _read_benchmark_json(path: str, warn, cuda_graphs: Optional[list] = None) -> Optional[dict]:
    """A pytest-benchmark JSON file's data, or ``None`` (with a warning) for a file
    that is empty or not such JSON: a benchmark run killed before pytest-benchmark
    wrote its ``--benchmark-json`` leaves an empty file, and the GPU check's other
    parts write JSON of their own; neither may cost the report the others' data.
    ``bench/cuda_graphs.py``'s JSON with rows goes to ``cuda_graphs`` (a list of
    ``(path, data)``) when one is given; without rows it is skipped, with a warning."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as exc:  # empty or cut short
        warn(f"skipped {path}: not JSON ({exc})")
        return None
    if cuda_graphs is not None and is_cuda_graphs_json(data):
        if data["rows"]:
            cuda_graphs.append((path, data))
        else:
            warn(f"skipped {path}: CUDA-graph results without rows")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        warn(f"skipped {path}: not pytest-benchmark JSON (no 'benchmarks' list)")
        return None
    return data


def _cuda_graphs_kind(cg: dict) -> str:
    """``"gpu"`` or ``"cpu"`` (a dry run) for bench/cuda_graphs.py's JSON (``device_type``;
    before it was written, the device's name: "CPU (dry run)" or the GPU's)."""
    kind = cg.get("device_type")
    if kind is None:
        kind = "cpu" if str(cg.get("device", "")).startswith("CPU") else "cuda"
    return "gpu" if kind == "cuda" else "cpu"


def _check_cuda_graphs(merged: dict, path: str, cg: dict) -> None:
    """Refuse a CUDA-graph result of another kind of device or another GPU (as
    :func:`load` refuses such benchmark files)."""
    kind = _cuda_graphs_kind(cg)
    if kind != device_kind(merged):
        raise ValueError(f"{path}: {kind} CUDA-graph results cannot be mixed with {device_kind(merged)} "
                         "results in one report")
    name = _machine_name(merged)
    if kind == "gpu" and name and cg.get("device") and cg["device"] != name:
        raise ValueError(f"{path}: CUDA-graph results of {cg['device']!r} cannot be mixed with {name!r} "
                         "in one report")


def load(paths: Sequence[str], warn=None) -> dict:
    """Read and merge pytest-benchmark JSON files of one machine (a later file's
    benchmark replaces an earlier one of the same name). Files that are empty or
    not pytest-benchmark JSON are skipped, each with a call of ``warn`` (default:
    a line on stderr); results of different machines raise ``ValueError``.
    A result of ``bench/cuda_graphs.py`` among them is kept under the key
    ``"cuda_graphs"`` (the last one given, of the same machine, else
    ``ValueError``)."""
    if warn is None:
        def warn(message):
            print(f"warning: {message}", file=sys.stderr)
    merged: Optional[dict] = None
    by_name: "OrderedDict[str, dict]" = OrderedDict()
    cuda_graphs: List[Tuple[str, dict]] = []
    for path in paths:
        data = _read_benchmark_json(path, warn, cuda_graphs)
        if data is None:
            continue
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"}
        else:
            if device_kind(data) != device_kind(merged):
                raise ValueError(f"{path}: {device_kind(data)} results cannot be mixed with "
                                 f"{device_kind(merged)} results in one report")
            if _machine_name(data) != _machine_name(merged):
                raise ValueError(f"{path}: results of {_machine_name(data)!r} cannot be mixed with "
                                 f"{_machine_name(merged)!r} in one report")
        for b in data.get("benchmarks", []):
            by_name[b.get("fullname") or b["name"]] = b
    if merged is None:
        raise ValueError("no pytest-benchmark results in " + (", ".join(paths) or "no input files"))
    merged["benchmarks"] = list(by_name.values())
    for path, cg in cuda_graphs:
        _check_cuda_graphs(merged, path, cg)
    if len(cuda_graphs) > 1:
        warn("several CUDA-graph results: the report uses the last, " + cuda_graphs[-1][0])
    if cuda_graphs:
        merged["cuda_graphs"] = cuda_graphs[-1][1]
    return merged


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------

Key = Tuple[str, str, str]  # (workload, pass, dtype)


def _info(b: dict, name: str, default=None):
    return b.get("extra_info", {}).get(name, (b.get("params") or {}).get(name, default))


def collect(data: dict):
    """``(results, shapes, ops)``: results[(workload, pass, dtype)][provider] = record, in
    the order the workloads were run."""
    results: "OrderedDict[Key, Dict[str, dict]]" = OrderedDict()
    shapes: Dict[str, str] = {}
    for b in data.get("benchmarks", []):
        provider, workload = _info(b, "provider"), _info(b, "workload")
        if provider is None or workload is None:
            continue
        key = (workload, _info(b, "pass", "fwd"), _info(b, "dtype", "float32"))
        results.setdefault(key, {})[provider] = b
        if _info(b, "shape"):
            shapes[workload] = _info(b, "shape")
    return results, shapes


def _median(record: Optional[dict]) -> Optional[float]:
    if not record:
        return None
    return record.get("stats", {}).get("median")


def _spread(record: Optional[dict]) -> float:
    """Interquartile range over median of a benchmark's rounds (0 when unknown)."""
    stats = (record or {}).get("stats", {})
    if not stats.get("median") or stats.get("iqr") is None:
        return 0.0
    return stats["iqr"] / stats["median"]


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _speedup(base: Optional[float], ours: Optional[float]) -> str:
    if base is None or ours is None or ours <= 0:
        return "—"
    return f"{base / ours:.2f}×"


def _mib(record: Optional[dict]) -> str:
    if not record:
        return "—"
    peak = record.get("extra_info", {}).get("peak_mem_bytes")
    return "—" if peak is None else f"{peak / 2**20:.0f}"


def machine_line(data: dict) -> str:
    m = _machine(data)
    kind = device_kind(data)
    commit = m.get("commit") or data.get("commit_info", {}).get("id") or "unknown"
    dirty = m.get("dirty", data.get("commit_info", {}).get("dirty"))
    commit = commit[:12] + (" + uncommitted changes" if dirty else "")
    if kind == "gpu":
        dev = f"GPU: {m.get('gpu', 'unknown GPU')}"
        extras = [f"sm {m['capability']}" if m.get("capability") else None,
                  f"CUDA {m['cuda']}" if m.get("cuda") else None,
                  f"cuDNN {m['cudnn']}" if m.get("cudnn") else None]
        extras = [e for e in extras if e]
        if extras:
            dev += f" ({', '.join(extras)})"
    else:
        cpu = m.get("cpu") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "unknown CPU")
        dev = f"CPU: {cpu}, {m.get('cpu_count', '?')} cores, {m.get('torch_threads', '?')} torch threads"
    date = data.get("datetime", "")[:16].replace("T", " ")
    parts = [dev, f"torch {m.get('torch', '?')}", f"triton {m.get('triton', '?')}", f"commit {commit}"]
    if date:
        parts.append(f"{date} UTC")
    return " · ".join(parts)


def busy_warning(data: dict) -> Optional[str]:
    """A warning when other work shared the CPU: the 1-minute load average at the start
    or end of the run above the number of cores inflates CPU timings."""
    m = _machine(data)
    cores = m.get("cpu_count")
    loads = [v[0] for v in (m.get("load_average_start"), m.get("load_average")) if v]
    if device_kind(data) != "cpu" or not cores or not loads or max(loads) <= cores * 0.75:
        return None
    return (f"**Busy machine:** 1-minute load average {' → '.join(f'{v:.1f}' for v in loads)} on {cores} cores "
            "(start → end of the run): other processes shared the CPU, so these timings are inflated and noisy.")


def floor_lookup(data: dict):
    """``floor(workload, pass, dtype) -> ms or None``: the roofline floor
    (:mod:`bench.roofline`) of a benchmark row on this report's GPU, or ``None``
    (the whole function) for CPU results, GPUs the model has no numbers for, or
    when the roofline or the workloads cannot be imported. A row's floor is
    ``None`` when its workload (name and shape) is not one of bench/workloads.py's."""
    if device_kind(data) != "gpu":
        return None
    try:
        from bench import roofline
        from bench.workloads import WORKLOAD_SETS
    except Exception:  # torch or the package missing: the report still works, without floors
        return None
    device = roofline.device_for_gpu_name(_machine_name(data) or "")
    if device is None:
        return None
    _, shapes = collect(data)

    def floor(workload: str, pass_: str, dtype: str, kind: Optional[str] = None,
              fused: bool = False) -> Optional[float]:
        """Seconds, like the medians; ``kind`` "gate" or "conv": only those pieces;
        ``fused``: the fused step's floor (``ours-fused``)."""
        for ws in WORKLOAD_SETS.values():
            for w in ws:
                if w.name == workload and (workload not in shapes or shapes[workload] == w.describe()):
                    try:
                        return roofline.floor_ms(w, device, dtype, pass_, kind=kind, fused=fused) / 1e3
                    except (KeyError, ValueError):
                        return None
        return None

    floor.device = roofline.DEVICES[device].name  # type: ignore[attr-defined]
    return floor


def markdown(data: dict, title: Optional[str] = "ConvGRU benchmarks") -> str:
    """The report: machine line, one table per dtype, memory (CUDA), target check."""
    results, shapes = collect(data)
    floor = floor_lookup(data)
    kind = device_kind(data)
    present = [p for p in PROVIDERS if any(p in r for r in results.values())]
    baselines = [p for p in BASELINES if p in present]
    lines: List[str] = []
    if title:
        lines += [f"# {title} ({kind.upper()})", ""]
    lines += [machine_line(data), ""]
    busy = busy_warning(data)
    if busy:
        lines += [busy, ""]
    lines += ["Median wall-clock time per call in ms (CUDA synchronised); speed-up = baseline median / "
              "`ours` median (above 1: `ours` is faster); — = not run.", ""]
    if floor is not None:
        lines += [f"floor = the roofline floor of the call on {floor.device} (`python -m bench.roofline`: fewest "
                  "bytes of the gate kernels over copy bandwidth plus convolution FLOPs over the matrix rate, "
                  "`reset_after=False`); ours / floor = how far `ours` is from it (1.0 is the floor).", ""]
    dtypes = _dtype_order(OrderedDict.fromkeys(k[2] for k in results))
    for dtype in dtypes:
        lines += [f"**{dtype}**", ""]
        head = ["workload", "pass"] + present + [f"ours vs {b}" for b in baselines]
        if "ours-fused" in present:
            head += ["fused vs ours"]
        if floor is not None:
            head += ["floor", "ours / floor"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|"]
        for (workload, pass_, dt), recs in results.items():
            if dt != dtype:
                continue
            ours = _median(recs.get("ours"))
            cells = [workload, pass_] + [_ms(_median(recs.get(p))) for p in present]
            cells += [_speedup(_median(recs.get(b)), ours) for b in baselines]
            if "ours-fused" in present:
                cells += [_speedup(ours, _median(recs.get("ours-fused")))]
            if floor is not None:
                f = floor(workload, pass_, dtype)
                cells += [_ms(f), "—" if f is None or ours is None else f"{ours / f:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if kind == "gpu":
            lines += [f"Peak memory, MiB (`torch.cuda.max_memory_allocated` over the timed calls, "
                      f"inputs and weights included), {dtype}:", ""]
            head = ["workload", "pass"] + present
            lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["--:"] * len(present)) + "|"]
            for (workload, pass_, dt), recs in results.items():
                if dt == dtype:
                    lines.append("| " + " | ".join([workload, pass_] + [_mib(recs.get(p)) for p in present]) + " |")
            lines.append("")
    if shapes:
        lines += ["Workloads: " + "; ".join(f"`{w}` {s}" for w, s in shapes.items()) + ".", ""]
    lines += roofline_lines(data, floor)
    lines += targets(data)
    lines += fused_step_target_lines(data)
    return "\n".join(lines).rstrip() + "\n"


def roofline_lines(data: dict, floor=None) -> List[str]:
    """Per dtype, one row per workload and pass: the roofline floor (gate kernels +
    convolutions) and every provider's median over it (1.0 is the floor); nothing
    when the report has no floors (CPU results, a GPU the model does not know)."""
    floor = floor if floor is not None else floor_lookup(data)
    if floor is None:
        return []
    results, _ = collect(data)
    present = [p for p in PROVIDERS if any(p in r for r in results.values())]
    lines = [f"**Roofline** on {floor.device}: each provider's median / the floor (1.0 is the floor; "
             "floor = gate kernels' fewest bytes over copy bandwidth + convolution FLOPs over the matrix rate, "
             "`python -m bench.roofline`). `ours-fused` is measured against the fused step's own floor "
             "(the column `fused floor ms`): the forward's hidden convolution and gate kernels replaced by "
             "the fused kernels' FLOPs and unavoidable bytes (h, gx, weights in; gates, r*h, h' out: the "
             "pre-activations W_h*h never reach memory); the input convolution and the backward as on the default path.", ""]
    for dtype in _dtype_order(OrderedDict.fromkeys(k[2] for k in results)):
        fused_col = "ours-fused" in present
        head = (["workload", "pass", "floor ms (gates + convs)"] + (["fused floor ms"] if fused_col else [])
                + [f"{p} / floor" for p in present])
        lines += [f"*{dtype}*", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * 2 + ["--:"] * (len(head) - 2)) + "|"]
        for (workload, pass_, dt), recs in results.items():
            if dt != dtype:
                continue
            total = floor(workload, pass_, dtype)
            if total is None:
                cells = ["—"] * (1 + fused_col + len(present))
            else:
                gates, convs = floor(workload, pass_, dtype, "gate"), floor(workload, pass_, dtype, "conv")
                fused_floor = floor(workload, pass_, dtype, fused=True) if fused_col else None
                cells = [f"{_ms(total)} ({_ms(gates)} + {_ms(convs)})"] + ([_ms(fused_floor)] if fused_col else [])
                cells += ["—" if _median(recs.get(p)) is None or (p == "ours-fused" and not fused_floor)
                          else f"{_median(recs.get(p)) / (fused_floor if p == 'ours-fused' else total):.1f}"
                          for p in present]
            lines.append("| " + " | ".join([workload, pass_] + cells) + " |")
        lines.append("")
    return lines


def targets(data: dict) -> List[str]:
    """The benchmark targets (``GPU_TARGETS``), met or missed and by how much."""
    results, _ = collect(data)
    lines: List[str] = []
    if device_kind(data) == "cpu":
        misses, checked = [], 0
        for (workload, pass_, dtype), recs in results.items():
            ours = _median(recs.get("ours"))
            eager = [(_median(recs.get(b)), b) for b in EAGER_BASELINES if _median(recs.get(b)) is not None]
            if ours is None or not eager:
                continue
            checked += 1
            best, name = min(eager)
            if ours > best:
                spread = max(_spread(recs.get("ours")), _spread(recs.get(name)))
                slower = ours / best - 1
                note = f"; spread (IQR/median) {spread * 100:.0f}%" if spread else ""
                if spread and slower <= spread:
                    note += ", within it"
                misses.append(f"`{workload}` {pass_} {dtype}: ours {_ms(ours)} ms vs {name} {_ms(best)} ms "
                              f"({slower * 100:.0f}% slower{note})")
        if checked:
            lines.append("Target (CPU): `ours` no slower than the fastest eager baseline on every workload: "
                         + ("met." if not misses else f"missed on {len(misses)} of {checked}:"))
            lines += [f"- {m}" for m in misses]
    else:
        misses, checked = [], 0
        for (workload, pass_, dtype), recs in results.items():
            ours = _median(recs.get("ours"))
            if dtype != "bfloat16" or pass_ != "fwd+bwd" or ours is None:
                continue
            for base, goal in GPU_TARGETS.items():
                t = _median(recs.get(base))
                if t is None:
                    continue
                checked += 1
                if t / ours < goal:
                    misses.append(f"`{workload}` vs {base}: {t / ours:.2f}× (target {goal}×, "
                                  f"{(1 - (t / ours) / goal) * 100:.0f}% short)")
        if checked:
            lines.append("Target (GPU, bfloat16, fwd+bwd): `ours` ≥ 1.5× `raft` and ≥ 1.2× `compile`: "
                         + ("met." if not misses else f"missed in {len(misses)} of {checked} comparisons:"))
            lines += [f"- {m}" for m in misses]
    return lines + [""] if lines else []


def fused_step_targets(data: dict) -> List[Tuple[str, str, Optional[float], float, Optional[bool]]]:
    """The fused step's targets on the benchmark rows, bfloat16 only: ``(measure,
    provider, measured, target, met)`` per RAFT workload, pass, our provider
    (``ours-fused`` and ``ours``) and baseline (speed-up = baseline median /
    ours median, target 1.5x over ``raft``, 1.2x over ``compile``), and per
    sequence workload and pass the fused step against cuDNN + the gate kernels
    (``ours`` median / ``ours-fused`` median, target 1.0: no slower). ``measured``/``met`` are ``None`` when a
    median is missing (not run, or stopped by a cap). The one-step RAFT rows
    are one update step: RAFT's 12-step loop is 12 of them, the same ratio."""
    results, _ = collect(data)
    rows: List[Tuple[str, str, Optional[float], float, Optional[bool]]] = []

    def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
        return None if num is None or den is None or den <= 0 else num / den

    for (workload, pass_, dtype), recs in results.items():
        if dtype != "bfloat16":
            continue
        what = "training (fwd+bwd)" if pass_ == "fwd+bwd" else "inference (fwd)"
        if workload.startswith("raft-"):
            for ours in ("ours-fused", "ours"):
                for base, goal in FUSED_STEP_SPEEDUPS.items():
                    r = ratio(_median(recs.get(base)), _median(recs.get(ours)))
                    rows.append((f"`{workload}` {what} vs {base}", ours, r, goal, None if r is None else r >= goal))
        elif workload in FUSED_STEP_SEQUENCES:
            r = ratio(_median(recs.get("ours")), _median(recs.get("ours-fused")))
            rows.append((f"`{workload}` {what}: no slower than the default path (ours / fused)", "ours-fused", r, 1.0,
                         None if r is None else r >= 1.0))
    return rows


class ReplayTarget(NamedTuple):
    """The fused step's CUDA-graph target for one RAFT workload and path: ``graph_ms``
    (bench/cuda_graphs.py's replay, ms per step) over ``floor_ms`` (the roofline
    floor of the workload's inference step at the measured shape; the fused
    step's own floor for ``ours-fused``), ``ratio`` = their quotient, ``met``
    when ``ratio <= target``; ``None`` for what is not known, and ``missing``
    says what (``""`` when nothing is)."""

    workload: str
    provider: str  # "ours-fused": the row with the fused step forced; "ours": cuDNN + the gate kernels
    graph_ms: Optional[float]
    floor_ms: Optional[float]
    ratio: Optional[float]
    target: float
    met: Optional[bool]
    missing: str


def _dtype_name(text: str) -> str:
    return str(text).replace("torch.", "")


def _replay_row(cg: dict, workload: str, fused: bool) -> Optional[dict]:
    """The row of bench/cuda_graphs.py's result for ``workload`` with the fused step
    forced (``fused``) or not (a JSON whose rows name no workload: by cell name)."""
    for row in cg.get("rows", []):
        cell = str(row.get("cell", ""))
        name = row.get("workload") or CUDA_GRAPH_CELLS.get(cell[: -len(FUSED_SUFFIX)] if cell.endswith(FUSED_SUFFIX)
                                                           else cell)
        row_fused = row.get("fused_step", "1" if cell.endswith(FUSED_SUFFIX) else "0") == "1"
        if name == workload and row_fused == fused:
            return row
    return None


def _replay_floor(data: dict, cg: Optional[dict], workload: str, fused: bool) -> Tuple[Optional[float], str]:
    """``(ms, "")``: the roofline floor of one inference step of ``workload`` on the
    report's GPU, at the CUDA-graph result's batch and shape when there is one
    (bench/cuda_graphs.py runs the full size on CUDA; a JSON that records no
    shape is at the full size); ``(None, what is missing)`` else."""
    try:
        from bench import roofline
        from bench.workloads import FULL_WORKLOADS
    except Exception as exc:  # torch or the package missing
        return None, f"roofline floor (bench.roofline does not import: {type(exc).__name__})"
    gpu = (cg or {}).get("device") or _machine_name(data) or ""
    device = roofline.device_for_gpu_name(gpu)
    if device is None:
        return None, f"roofline floor (bench/roofline.py has no numbers for {gpu or 'this GPU'})"
    w = next((w for w in FULL_WORKLOADS if w.name == workload), None)
    if w is None or len(w.stages) != 1:
        return None, f"roofline floor (no one-stage workload {workload!r} in bench/workloads.py)"
    stage = w.stages[0]
    if cg is not None:
        stage = dataclasses.replace(stage, input_channels=cg.get("input_channels", stage.input_channels),
                                    hidden_channels=cg.get("hidden_channels", stage.hidden_channels),
                                    size=tuple(cg.get("size", stage.size)))
        w = dataclasses.replace(w, batch=cg.get("batch", w.batch), stages=(stage,))
    dtype = _dtype_name(cg["dtype"]) if cg is not None and cg.get("dtype") else "bfloat16"
    try:
        return roofline.floor_ms(w, device, dtype, "fwd", fused=fused), ""
    except (KeyError, ValueError) as exc:
        return None, f"roofline floor ({type(exc).__name__}: {exc})"


def replay_targets(data: dict) -> List[ReplayTarget]:
    """The fused step's "CUDA-graph replay of the inference step ≤ 2× the floor", per
    RAFT workload (``raft-convgru``, ``raft-sepconvgru``) and path (the fused
    step's row, ``ours-fused``; cuDNN + the gate kernels', ``ours``): bench/cuda_graphs.py's graph
    ms per step (``data["cuda_graphs"]``, see :func:`load`) over the roofline
    floor of that workload's inference step, ``None`` and a ``missing`` reason
    where either is not known: no CUDA-graph result, no such row, a replay that
    failed or was skipped, a result not in bfloat16, a GPU the roofline has no
    numbers for. GPU reports only (``[]`` for CPU results)."""
    if device_kind(data) != "gpu":
        return []
    cg = data.get("cuda_graphs")
    out = []
    for workload in CUDA_GRAPH_CELLS.values():
        for provider, fused in (("ours-fused", True), ("ours", False)):
            missing = []
            graph = None
            if cg is None:
                missing.append("CUDA-graph result (give bench/cuda_graphs.py's cuda_graphs-cuda.json to the report)")
            elif _dtype_name(cg.get("dtype", "")) != "bfloat16":
                missing.append(f"CUDA-graph result in bfloat16 (it ran {_dtype_name(cg.get('dtype', '?'))})")
            else:
                row = _replay_row(cg, workload, fused)
                if row is None:
                    missing.append(f"CUDA-graph replay (no row of `{workload}` with the fused step "
                                   f"{'on' if fused else 'off'})")
                elif not isinstance(row.get("graph_ms_per_step"), (int, float)):
                    why = next((f"{k}: {row[k]}" for k in ("graph", "eager") if isinstance(row.get(k), str)),
                               "no graph time")
                    missing.append(f"CUDA-graph replay ({why[:200]})")
                else:
                    graph = float(row["graph_ms_per_step"])
            floor, why_floor = _replay_floor(data, cg, workload, fused)
            if why_floor:
                missing.append(why_floor)
            ratio = graph / floor if graph is not None and floor else None
            met = None if ratio is None else ratio <= REPLAY_FLOOR_RATIO
            out.append(ReplayTarget(workload, provider, graph, floor, ratio, REPLAY_FLOOR_RATIO, met, "; ".join(missing)))
    return out


def fused_step_target_lines(data: dict) -> List[str]:
    """The two functions above, the benchmark rows' and the replay's targets, as a table (GPU results only)."""
    if device_kind(data) != "gpu":
        return []
    rows = fused_step_targets(data)
    replay = replay_targets(data)
    if not rows and not replay:
        return []
    lines = ["**Fused-step targets** (bfloat16, this run; speed-up = baseline median / provider median; "
             "replay / floor = bench/cuda_graphs.py's CUDA-graph replay, ms per step of the 12-step loop, over "
             "the roofline floor of one inference step at its shape, the fused step's own floor for "
             "`ours-fused`). Not from these rows: the gate kernels (≥ 80% of copy bandwidth: the bandwidth "
             "parts), the whole RAFT-large step.", "",
             "| measure | provider | measured | target | |", "|---|---|--:|--:|---|"]
    for measure, provider, measured, goal, met in rows:
        verdict = "not measured" if met is None else ("met" if met else "missed")
        lines.append(f"| {measure} | {provider} | {'—' if measured is None else f'{measured:.2f}×'} | "
                     f"≥ {goal:g}× | {verdict} |")
    for r in replay:
        floor_name = "fused-step floor" if r.provider == "ours-fused" else "floor"
        graph = "—" if r.graph_ms is None else f"{r.graph_ms:.3f}"
        floor = "—" if r.floor_ms is None else f"{r.floor_ms:.3f}"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        verdict = f"missing: {r.missing}" if r.met is None else ("met" if r.met else "missed")
        lines.append(f"| `{r.workload}` inference (fwd): CUDA-graph replay / {floor_name} | {r.provider} | "
                     f"{ratio} ({graph} / {floor} ms) | ≤ {r.target:g}× | {verdict} |")
    return lines + [""]


# ----------------------------------------------------------------------------
# Chart
# ----------------------------------------------------------------------------

_COLORS = {"seed": "#9e9e9e", "raft": "#5b8bd0", "compile": "#2c4f8a", "ours": "#e07b24", "ours-compile": "#a04d0c",
           "ours-fused": "#c0392b"}


def _dtype_order(dtypes):
    rank = {"float32": 0, "bfloat16": 1, "float16": 2}
    return sorted(dtypes, key=lambda d: rank.get(d, 9))


def chart(data: dict, path: str) -> None:
    """Grouped bars, one panel per dtype (rows) and pass (columns): workloads along x,
    one bar per provider, height = speed-up over the ``raft`` eager baseline
    (raft median / provider median, log axis, higher is faster). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.patches import Patch

    results, _ = collect(data)
    dtypes = _dtype_order(OrderedDict.fromkeys(k[2] for k in results))
    passes = [p for p in PASSES if any(k[1] == p for k in results)]
    present = [p for p in PROVIDERS if any(p in r for r in results.values())]
    workloads = list(OrderedDict.fromkeys(k[0] for k in results))
    fig, axes = plt.subplots(len(dtypes), len(passes), squeeze=False,
                             figsize=(max(5.0, 1.3 * len(workloads) + 1.5) * len(passes), 3.0 * len(dtypes) + 1.0))
    width = 0.8 / max(len(present), 1)
    lowest, highest = 0.5, 2.0
    for row, dtype in enumerate(dtypes):
        for col, pass_ in enumerate(passes):
            ax = axes[row, col]
            for i, provider in enumerate(present):
                xs, ys = [], []
                for j, workload in enumerate(workloads):
                    recs = results.get((workload, pass_, dtype), {})
                    base, t = _median(recs.get("raft")), _median(recs.get(provider))
                    if base is not None and t:
                        xs.append(j + (i - (len(present) - 1) / 2) * width)
                        ys.append(base / t)
                        lowest, highest = min(lowest, ys[-1]), max(highest, ys[-1])
                ax.bar(xs, ys, width, color=_COLORS.get(provider))
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.set_xticks(range(len(workloads)))
            ax.set_xticklabels(workloads, fontsize=8, rotation=15)
            ax.set_title(f"{pass_}, {dtype}", fontsize=10)
            ax.grid(axis="y", which="major", alpha=0.3)
            if col == 0:
                ax.set_ylabel("speed-up over raft (eager)")
    for ax in axes.flat:
        ax.set_ylim(lowest / 1.2, highest * 1.2)
    handles = [Patch(color=_COLORS.get(p), label=p) for p in present]
    fig.legend(handles=handles, ncol=len(present), loc="upper center", fontsize=8, bbox_to_anchor=(0.5, 0.995))
    import textwrap

    fig.text(0.5, 0.005, "\n".join(textwrap.wrap(machine_line(data), 120)), ha="center", va="bottom", fontsize=6.5)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


def default_stem(paths: Sequence[str], data: dict) -> str:
    if len(paths) == 1:
        return os.path.splitext(os.path.basename(paths[0]))[0]
    return f"{device_kind(data)}-{_slug(_machine_name(data) or 'unknown')}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json) of one machine, "
                                                "and bench/cuda_graphs.py's JSON of the same machine")
    parser.add_argument("--out", default=".", help="output directory (default: current)")
    parser.add_argument("--name", help="file stem of the outputs; must start with cpu or gpu (default: the JSON's)")
    parser.add_argument("--title", default="ConvGRU benchmarks")
    parser.add_argument("--save-json", action="store_true",
                        help="also write the merged input as DIR/STEM.json (raw data next to its report)")
    args = parser.parse_args(argv)
    try:
        data = load(args.json)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kind = device_kind(data)
    stem = args.name or default_stem(args.json, data)
    if not stem.startswith(kind):
        print(f"error: these are {kind.upper()} results; name the report {kind}-... (got {stem!r}) so that "
              "CPU and GPU results never mix", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    md_path = os.path.join(args.out, stem + ".md")
    png_path = os.path.join(args.out, stem + ".png")
    text = markdown(data, title=args.title)
    try:
        chart(data, png_path)
        text += f"\n![{stem}]({os.path.basename(png_path)})\n"
        print(f"wrote {png_path}")
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        text += "\n(No chart: matplotlib is not installed.)\n"
    with open(md_path, "w") as f:
        f.write(text)
    print(f"wrote {md_path}")
    if args.save_json:
        json_path = os.path.join(args.out, stem + ".json")
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {json_path}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
