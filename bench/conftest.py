"""pytest set-up of the benchmark suite (``pytest bench --benchmark-only``).

Options (all optional; the defaults pick the device and its workload sizes):

``--bench-device auto|cpu|cuda``
    auto: CUDA when available.
``--bench-size auto|full|cpu|tiny``
    auto: the full workloads on CUDA, the scaled-down ones on CPU.
``--bench-dtypes float32,bfloat16``
    auto: float32 on CPU; float32 and bfloat16 on CUDA.
``--bench-providers seed,raft,compile,ours,ours-compile``
    which providers run (default all).
``--bench-workloads raft-convgru,...``
    which workloads run (default all).
``--bench-passes fwd,fwd+bwd``
    which passes run (default both).
``--bench-host-overhead``
    also run the ``host-overhead`` group: host time per step with the GPU work
    stubbed (:mod:`bench.host_overhead`); off by default.
``--bench-compile auto|all|step|none``
    where the ``torch.compile`` providers run: every workload, only the
    one-step (``conv_gru_cell``, RAFT) workloads, or nowhere. auto: all on CUDA,
    step on CPU (compiling on two CPU cores takes 5-20 s per graph).

The number of timed rounds follows pytest-benchmark's ``--benchmark-max-time``
(seconds per benchmark, default 1.0) and ``--benchmark-min-rounds`` (default 5).
"""

from __future__ import annotations

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


def pytest_collection_modifyitems(config, items):
    # An op with no selected case (e.g. only compile providers on CPU, which compile the
    # one-step workloads only) is left out rather than reported as skipped.
    empty = [item for item in items if "case" in getattr(item, "fixturenames", ()) and
             not isinstance(getattr(getattr(item, "callspec", None), "params", {}).get("case"), Case)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [item for item in items if item not in empty]


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


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's tables: one comparison table, ``ours`` against each baseline."""
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
