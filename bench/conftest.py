"""pytest set-up of the benchmark suite (``pytest bench --benchmark-only``).

Options (all optional; the defaults pick the device and its workload sizes):

``--bench-device auto|cpu|cuda``
    auto: CUDA when available.
``--bench-size auto|full|cpu|tiny``
    auto: the full workloads on CUDA, the scaled-down ones on CPU.
``--bench-dtypes float32,bfloat16``
    auto: float32 on CPU; float32 and bfloat16 on CUDA.
``--bench-providers seed,raft,compile,ours,ours-compile,ours-fused``
    which providers run (default all; ``ours-fused`` is skipped, with the
    reason, where the Triton kernels cannot run: :func:`bench.workloads.unavailable`).
``--bench-workloads raft-convgru,...``
    which workloads run (default all).
``--bench-passes fwd,fwd+bwd``
    which passes run (default both).
``--bench-host-overhead``
    also run the ``host-overhead`` group: host time per step with the GPU work
    stubbed (:mod:`bench.host_overhead`); off by default.
``--bench-order given|target``
    given: the order of the parametrization (workload, provider, pass, dtype);
    target: bfloat16 training steps first, then bfloat16 forward, float32
    training, float32 forward (the GPU check's order: when its time runs out,
    the numbers of the target are the ones already taken).
``--bench-json PATH``
    pytest-benchmark's JSON (what ``--benchmark-json`` writes), rewritten after
    every benchmark (each write whole: a new file replaces the old), so a run
    stopped at any point keeps what it measured. The writes during the run carry
    each benchmark's statistics; the one at the end of the session (also after
    Ctrl-C) adds every round's time. ``--benchmark-json`` opens its file when
    pytest starts and writes it at the end only: a run killed before leaves it
    empty.
``--bench-compile auto|all|step|none``
    where the ``torch.compile`` providers run: every workload, only the
    one-step (``conv_gru_cell``, RAFT) workloads, or nowhere. auto: all on CUDA,
    step on CPU (compiling on two CPU cores takes 5-20 s per graph).

The number of timed rounds follows pytest-benchmark's ``--benchmark-max-time``
(seconds per benchmark, default 1.0) and ``--benchmark-min-rounds`` (default 5).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from bench import workloads as wl
from bench.machine import convgru_machine_info

@dataclass(frozen=True)
class Case:
    workload: wl.Workload
    provider: str
    pass_: str
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.workload.name}-{self.provider}-{self.pass_}-{self.dtype}"

    @property
    def group(self) -> str:
        return f"{self.workload.op} {self.workload.name} {self.pass_} {self.dtype}"


def pytest_addoption(parser):
    group = parser.getgroup("convgru benchmarks")
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))
    group.addoption("--bench-size", default="auto", choices=("auto", "full", "cpu", "tiny"))
    group.addoption("--bench-dtypes", default="auto")
    group.addoption("--bench-providers", default=",".join(wl.PROVIDERS))
    group.addoption("--bench-workloads", default="all")
    group.addoption("--bench-passes", default=",".join(wl.PASSES))
    group.addoption("--bench-compile", default="auto", choices=("auto", "all", "step", "none"))
    group.addoption("--bench-host-overhead", action="store_true",
                    help="also run the host-overhead group (bench/test_bench_host_overhead.py)")
    group.addoption("--bench-order", default="given", choices=("given", "target"),
                    help="target: bfloat16 fwd+bwd first, then bfloat16 fwd, float32 fwd+bwd, float32 fwd")
    group.addoption("--bench-json", default=None, metavar="PATH",
                    help="pytest-benchmark JSON, rewritten after every benchmark (kept when the run is stopped)")


def bench_device(config) -> torch.device:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device=cuda but torch.cuda.is_available() is False")
    return torch.device(choice)


def _split(value: str):
    return [v.strip() for v in value.split(",") if v.strip()]


def selected_cases(config):
    device = bench_device(config)
    size = config.getoption("--bench-size")
    if size == "auto":
        size = "full" if device.type == "cuda" else "cpu"
    dtypes = config.getoption("--bench-dtypes")
    dtypes = (["float32", "bfloat16"] if device.type == "cuda" else ["float32"]) if dtypes == "auto" else _split(dtypes)
    for d in dtypes:
        if d not in wl.DTYPES:
            raise pytest.UsageError(f"--bench-dtypes: unknown dtype {d!r}, choose from {sorted(wl.DTYPES)}")
    providers = _split(config.getoption("--bench-providers"))
    for p in providers:
        if p not in wl.PROVIDERS:
            raise pytest.UsageError(f"--bench-providers: unknown provider {p!r}, choose from {wl.PROVIDERS}")
    passes = _split(config.getoption("--bench-passes"))
    for p in passes:
        if p not in wl.PASSES:
            raise pytest.UsageError(f"--bench-passes: unknown pass {p!r}, choose from {wl.PASSES}")
    compile_where = config.getoption("--bench-compile")
    if compile_where == "auto":
        compile_where = "all" if device.type == "cuda" else "step"
    workloads = wl.WORKLOAD_SETS[size]
    names = config.getoption("--bench-workloads")
    if names != "all":
        wanted = _split(names)
        unknown = set(wanted) - {w.name for w in workloads}
        if unknown:
            raise pytest.UsageError(f"--bench-workloads: unknown {sorted(unknown)}")
        workloads = [w for w in workloads if w.name in wanted]
    cases = []
    for w in workloads:
        for provider in providers:
            if provider in wl.COMPILED and (
                compile_where == "none" or (compile_where == "step" and w.op != "conv_gru_cell")
            ):
                continue
            for pass_ in passes:
                for dtype in dtypes:
                    cases.append(Case(w, provider, pass_, dtype))
    return cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        op = metafunc.function.__name__[len("test_"):]
        cases = [c for c in selected_cases(metafunc.config) if c.workload.op == op]
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


DTYPE_RANK = {"bfloat16": 0, "float16": 1, "float32": 2}  # --bench-order=target
PASS_RANK = {"fwd+bwd": 0, "fwd": 1}


def _case(item):
    case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
    return case if isinstance(case, Case) else None


def target_order(case: Case):
    """Sort key of ``--bench-order=target``: the benchmark target (bfloat16 training
    step) first; within one dtype and pass the parametrization's order stays."""
    return DTYPE_RANK.get(case.dtype, 9), PASS_RANK.get(case.pass_, 9)


def pytest_collection_modifyitems(config, items):
    # An op with no selected case (e.g. only compile providers on CPU, which compile the
    # one-step workloads only) is left out rather than reported as skipped.
    empty = [item for item in items if "case" in getattr(item, "fixturenames", ()) and _case(item) is None]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]
    if config.getoption("--bench-order") == "target":
        items.sort(key=lambda item: target_order(_case(item)) if _case(item) else (99, 99))  # stable


def pytest_configure(config):
    # torch.compile's internals warn about their own deprecated helpers; not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:torch")
    config.addinivalue_line("filterwarnings", "ignore::FutureWarning:torch")


@pytest.fixture
def device(request) -> torch.device:
    return bench_device(request.config)


# ----------------------------------------------------------------------------
# Machine information: stored in the JSON, shown in every report.
# ----------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config, machine_info):
    info = convgru_machine_info(bench_device(config))
    info["load_average_start"] = getattr(config, "_convgru_load_start", None)
    machine_info["convgru"] = info


def pytest_sessionstart(session):
    try:
        session.config._convgru_load_start = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        session.config._convgru_load_start = None
    # Narrower default columns, so that each group's comparison fits a terminal.
    bs = getattr(session.config, "_benchmarksession", None)
    args = " ".join(session.config.invocation_params.args)
    if bs is not None and "--benchmark-columns" not in args:
        bs.columns = ["median", "iqr", "min", "max", "rounds"]


# ----------------------------------------------------------------------------
# --bench-json: the results so far, after every benchmark
# ----------------------------------------------------------------------------


def write_bench_json(config, final: bool) -> None:
    """Write pytest-benchmark's JSON of the benchmarks run so far to
    ``--bench-json`` (whole: written beside it, then renamed over it)."""
    path = config.getoption("--bench-json")
    bs = getattr(config, "_benchmarksession", None)
    if not path or bs is None or not bs.benchmarks:
        return
    infos = getattr(config, "_convgru_json_infos", None)
    if infos is None or final:  # machine info again at the end: its load average is the end's
        commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
        config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        infos = config._convgru_json_infos = (bs.get_machine_info(), commit_info)
    output = config.hook.pytest_benchmark_generate_json(
        config=config, benchmarks=bs.benchmarks, include_data=final, machine_info=infos[0], commit_info=infos[1])
    config.hook.pytest_benchmark_update_json(config=config, benchmarks=bs.benchmarks, output_json=output)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    part = path + ".part"
    with open(part, "w") as f:
        json.dump(output, f, indent=1, default=str)
    os.replace(part, path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if item.config.getoption("--bench-json"):
        write_bench_json(item.config, final=False)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--bench-json"):
        write_bench_json(session.config, final=True)


def skip_groups(reports):
    """Skipped tests grouped by their reason: ``[(count, reason, files)]``,
    largest group first. Each reason says what would run them (a flag such as
    ``--bench-host-overhead``, or what the machine lacks)."""
    groups = {}
    for report in reports:
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reason = str(longrepr[2])
        else:
            reason = str(longrepr)
        reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
        path = report.nodeid.split("::", 1)[0]
        count, files = groups.get(reason, (0, set()))
        groups[reason] = (count + 1, files | {path})
    return sorted(((count, reason, sorted(files)) for reason, (count, files) in groups.items()),
                  key=lambda group: (-group[0], group[1]))


def _write_skip_summary(terminalreporter) -> None:
    """One line per group of skipped benchmarks, so that a run says what it
    left out and how to run it without ``-rs``."""
    groups = skip_groups(terminalreporter.stats.get("skipped", []))
    if not groups:
        return
    terminalreporter.section("skipped benchmarks, by reason")
    for count, reason, files in groups:
        terminalreporter.write_line(f"{count} skipped ({', '.join(files)}): {reason}")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's tables: one comparison table, ``ours`` against
    each baseline; then the skipped benchmarks, one line per reason."""
    try:
        _write_comparison(terminalreporter, config)
    finally:
        _write_skip_summary(terminalreporter)


def _write_comparison(terminalreporter, config) -> None:
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    from bench import report

    records = [b.as_dict(include_data=False) for b in bs.benchmarks if not b.has_error]
    if not records:
        return
    info = convgru_machine_info(bench_device(config))
    info["load_average_start"] = getattr(config, "_convgru_load_start", None)
    data = {"machine_info": {"convgru": info}, "benchmarks": records}
    terminalreporter.section("ConvGRU comparison (median ms; speed-up = baseline / ours)")
    terminalreporter.write_line(report.markdown(data, title=None))
