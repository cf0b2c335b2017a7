"""Benchmark group ``host-overhead``: host time per step with the GPU work stubbed.

The rows and providers of :mod:`bench.host_overhead` (the package's Triton
launch path on a fake sm_90 target with no-op launches, the same with the
launchers' interface stubbed for sequences, the eager backend, RAFT's and the
seed's eager cells; RAFT's 12-step update loop in its four modes on both step
paths against RAFT's eager cell), as pytest-benchmark benchmarks grouped per
row so that each group compares the providers on one row. Off by default
(they measure Python, not the workloads); run them with::

    pytest bench --benchmark-only --bench-host-overhead

pytest-benchmark times wall clock; ``python -m bench.host_overhead`` measures
thread CPU time, interleaved, which holds on a busy machine (the committed
results come from it).
"""

from __future__ import annotations

import pytest
import torch

from bench import host_overhead as ho


def _triton_fakeable() -> bool:
    try:
        import triton  # noqa: F401
        from triton.runtime.jit import JITFunction

        from convgru_triton.ops.gates import kernels as conv_gru_cell

        return isinstance(conv_gru_cell._gru_update_fwd_kernel, JITFunction)  # not the interpreter
    except Exception:
        return False


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if not request.config.getoption("--bench-host-overhead"):
        pytest.skip("host-overhead group: pass --bench-host-overhead")


@pytest.mark.parametrize("provider", ho.PROVIDERS)
@pytest.mark.parametrize("row", ho.ROWS, ids=[r.label.replace(" ", "_") for r in ho.ROWS])
def test_host_overhead(benchmark, row, provider):
    benchmark.group = f"host-overhead {row.label}"
    if provider in ("ours", "ours (above launchers)", "ours (compiled)") and not _triton_fakeable():
        pytest.skip("needs Triton in compiled mode (TRITON_INTERPRET unset before triton is imported)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tensors = ho.make_tensors(row.backward)
        with ho.provider_context(provider) as launches:
            step = ho._step_function(row, provider, tensors)
            if step is None:
                pytest.skip(f"{provider} has no {row.label} row (see bench.host_overhead's docstring)")
            for _ in range(20):
                step()
            if provider == "ours":
                assert launches[0] > 0, "the Triton path was not taken"
            benchmark.pedantic(step, rounds=200, iterations=5, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(host_overhead_row=row.label, host_provider=provider,
                                cell_steps=ho.steps_of(row))


@pytest.mark.parametrize("provider", list(ho.LOOP_PROVIDERS))
@pytest.mark.parametrize("row", ho.LOOP_ROWS, ids=[r.label.replace(" ", "_") for r in ho.LOOP_ROWS])
def test_host_overhead_raft_loop(benchmark, row, provider):
    """One RAFT update loop (12 steps) per call; the fused path's row fails if
    no fused kernel ran."""
    benchmark.group = f"host-overhead {row.label}"
    if ho.LOOP_PROVIDERS[provider] is not None and not _triton_fakeable():
        pytest.skip("needs Triton in compiled mode (TRITON_INTERPRET unset before triton is imported)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ho.loop_context(provider):
            loop = ho._loop_function(row, provider)
            for _ in range(5):
                loop()
            before = ho.kernel_launches()
            loop()
            launched = ho.kernel_launches() - before
            fused = sum(n for k, n in launched.items() if k in ho.fused_kernel_names())
            if ho.LOOP_PROVIDERS[provider] is not None:
                ho._check_launches(row.label, provider, fused, sum(launched.values()) - fused)
            benchmark.pedantic(loop, rounds=20, iterations=2, warmup_rounds=0)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(host_overhead_row=row.label, host_provider=provider, cell_steps=ho.UPDATES)
