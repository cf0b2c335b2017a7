"""Benchmarks: ``conv_gru_cell`` (one step) and ``conv_gru`` (a sequence) of this
package against the ConvGRUs users run, on the workloads of
:mod:`bench.workloads`.

``pytest bench --benchmark-only`` (options in :mod:`bench.conftest`). One
benchmark per workload x provider x pass x dtype, grouped so that each group
compares the providers on one workload, pass and dtype.

* ``fwd``: inference, under ``torch.no_grad()``.
* ``fwd+bwd``: a training step, forward then backward of all outputs with fixed
  output gradients into the parameters and the inputs (and the initial state of
  a step); gradients are cleared outside the timed function.

CUDA work is synchronised inside the timed function (pytest-benchmark measures
wall clock). Every benchmark is warmed up first (torch.compile compiles, Triton
compiles, cuDNN picks its algorithms), and each ``ours*`` provider, run as it is timed, is
checked against the package's eager reference in float32 without TF32 (as is
the ``raft`` baseline, with the same weights, in float32) before it is timed:
:func:`check_ours`, with the tolerances of :func:`allowed_error`. The peak of
``torch.cuda.max_memory_allocated`` over the timed rounds goes into the
benchmark's ``extra_info``.
"""

from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch

from bench import workloads as wl
from bench.machine import sync

# ----------------------------------------------------------------------------
# Correctness of ``ours`` before timing
# ----------------------------------------------------------------------------

FLOAT32_TOLERANCE = 1e-3  # relative Frobenius error; the providers differ only in rounding
LOW_PRECISION_SLACK = 5e-3  # ours may be this much (plus 2x) worse than the eager reference
# float32 with TF32 (PyTorch's default for cuDNN convolutions on sm_80 and newer, so the
# baselines are timed with it): TF32 keeps float16's 10 mantissa bits (unit roundoff
# 2**-11 = 4.9e-4), so the slack is float16's. Measured on the H200 (2026-12-04):
# mmnist fwd+bwd float32, a 5x5 weight gradient, 1.37e-3 from the eager reference,
# which failed the plain float32 tolerance above.
TF32_SLACK = LOW_PRECISION_SLACK


@contextlib.contextmanager
def _exact_float32():
    """No TF32 in cuDNN or matmuls: the reference everything is measured against."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def uses_tf32(device, dtype: torch.dtype) -> bool:
    """Whether float32 convolutions or matmuls on ``device`` run as TF32 with the
    current settings (CUDA, compute capability 8.0 or newer, and
    ``torch.backends.cudnn.allow_tf32`` or ``torch.backends.cuda.matmul.allow_tf32``)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype != torch.float32:
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:  # TF32 arrived with Ampere (sm_80)
        return False
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


def allowed_error(dtype: torch.dtype, tf32: bool, reference_error: float) -> float:
    """The largest relative error a provider may have against the exact float32
    reference: twice the error of the package's eager reference run in the same
    precision (``dtype``, and TF32 as the timed runs use it), plus a slack for the
    rounding two correct implementations do differently."""
    if dtype == torch.float32:
        slack = TF32_SLACK if tf32 else FLOAT32_TOLERANCE
    else:
        slack = LOW_PRECISION_SLACK
    return 2 * reference_error + slack


def _strip(name: str) -> str:
    return name.replace("_orig_mod.", "")


def _run_once(model, workload, device, dtype, backward: bool):
    """Outputs and (with ``backward``) gradients of inputs and parameters, as float32."""
    inputs = wl.make_inputs(workload, device, dtype, requires_grad=backward)
    for p in model.parameters():
        p.grad = None
    with contextlib.nullcontext() if backward else torch.no_grad():
        outputs = model(inputs.xs, inputs.hs)
        if backward:
            torch.autograd.backward(outputs, inputs.grads)
    result = {f"output[{i}]": o.detach().float() for i, o in enumerate(outputs)}
    if backward:
        for i, t in enumerate(inputs.leaves()):
            result[f"input_grad[{i}]"] = t.grad.float()
        for name, p in model.named_parameters():
            result[f"grad {_strip(name)}"] = p.grad.float()
    return result


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def accuracy_failures(results, exact, same_precision, dtype: torch.dtype, tf32: bool):
    """``(key, error, allowed)`` of every tensor of ``results`` (a provider's
    :func:`_run_once`) further from ``exact`` (the eager reference in float32
    without TF32) than :func:`allowed_error` lets it be; ``same_precision`` is the
    eager reference run as the provider ran (``None``: it is ``exact``)."""
    failures = []
    for key, value in results.items():
        reference_error = 0.0 if same_precision is None else _error(same_precision[key], exact[key])
        allowed = allowed_error(dtype, tf32, reference_error)
        error = _error(value, exact[key])
        if not error <= allowed:
            failures.append((key, error, allowed))
    return failures


def _describe(failures, what, dtype, tf32) -> str:
    mode = f"{str(dtype).replace('torch.', '')}{', TF32' if tf32 else ''}"
    return f"{what} ({mode}): " + "; ".join(f"{k}: error {e:.3g} > allowed {a:.3g}" for k, e, a in failures)


def check_ours(model, case, master, device):
    """Assert that ``model`` (ours, ours-compile or ours-fused), run exactly as it is timed,
    computes what the package's eager reference (backend="torch") computes in
    float32 without TF32, within :func:`allowed_error`; in float32 the raft
    baseline, run as it is timed, too (all providers compute one function)."""
    workload, dtype = case.workload, wl.DTYPES[case.dtype]
    backward = case.pass_ == "fwd+bwd"
    tf32 = uses_tf32(device, dtype)
    reference = wl.build_model(workload, "ours", master, torch.float32, backend="torch")
    with _exact_float32():
        exact = _run_once(reference, workload, device, torch.float32, backward)
    # As timed: in float32 on CUDA that is with TF32, as the baselines run (PyTorch's default).
    ours = _run_once(model, workload, device, dtype, backward)
    if dtype == torch.float32:
        same = _run_once(reference, workload, device, dtype, backward) if tf32 else None
    else:
        same = _run_once(wl.build_model(workload, "ours", master, dtype, backend="torch"),
                         workload, device, dtype, backward)
    failures = accuracy_failures(ours, exact, same, dtype, tf32)
    assert not failures, _describe(failures, f"{case.id} vs the eager reference", dtype, tf32)
    if dtype == torch.float32:
        raft = _run_once(wl.build_model(workload, "raft", master, torch.float32), workload, device,
                         torch.float32, backward)
        # outputs and input gradients; raft's parameters are laid out differently
        raft = {k: v for k, v in raft.items() if k in exact and not k.startswith("grad ")}
        failures = accuracy_failures(raft, exact, same, dtype, tf32)
        assert not failures, _describe(failures, f"{case.id}: the raft baseline vs the eager reference", dtype, tf32)


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _fused_launches(provider: str):
    """:func:`bench.workloads.count_fused_launches`, or ``None`` where Triton
    cannot be imported (ours then runs the eager backend: nothing to count;
    ours-fused was skipped by :func:`bench.workloads.unavailable`)."""
    try:
        counter = wl.count_fused_launches()
        launches = counter.__enter__()
    except ImportError:
        if provider in wl.FUSED:
            raise
        yield None
        return
    try:
        yield launches
    finally:
        counter.__exit__(None, None, None)


def run_benchmark(benchmark, case, device):
    workload, provider = case.workload, case.provider
    dtype = wl.DTYPES[case.dtype]
    backward = case.pass_ == "fwd+bwd"
    benchmark.group = case.group
    reason = wl.unavailable(provider, device, dtype)
    if reason:  # never cuDNN + the gate kernels under the fused step's name
        pytest.skip(reason)
    if provider in wl.COMPILED:
        torch._dynamo.reset()  # a fresh cache per benchmark: no recompile limit, no stale graphs
    master = wl.make_master(workload, device)
    model = wl.build_model(workload, provider, master, dtype)
    inputs = wl.make_inputs(workload, device, dtype, requires_grad=backward)
    leaves = inputs.leaves()
    params = list(model.parameters())

    def clear_grads():
        for t in params + leaves:
            t.grad = None

    if backward:
        def step():
            outputs = model(inputs.xs, inputs.hs)
            torch.autograd.backward(outputs, inputs.grads)
            sync(device)
    else:
        def step():
            with torch.no_grad():
                model(inputs.xs, inputs.hs)
            sync(device)

    rounds = 1
    try:
        if provider in wl.OURS:
            # Which path ran: the fused step's kernels for ours-fused, none for ours.
            with _fused_launches(provider) as launches:
                check_ours(model, case, master, device)
            if launches is not None:
                wl.check_path(provider, launches[0])
                benchmark.extra_info["fused_launches_checked"] = launches[0]
        if not benchmark.disabled:
            warmup = 3 if provider in wl.COMPILED else 2
            start = time.perf_counter()
            for _ in range(warmup):
                clear_grads()
                last = time.perf_counter()
                step()
            end = time.perf_counter()
            benchmark.extra_info["warmup_s"] = round(end - start, 3)
            per_call = max(end - last, 1e-6)
            max_time = getattr(benchmark, "_max_time", 1.0)
            min_rounds = getattr(benchmark, "_min_rounds", 5)
            rounds = int(min(max(math.ceil(max_time / per_call), min_rounds), 10_000))
    except AssertionError:
        raise
    except Exception as exc:
        if provider in wl.COMPILED:  # report it and go on with the suite
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        raise
    if device.type == "cuda":
        clear_grads()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        benchmark.extra_info["mem_base_bytes"] = torch.cuda.memory_allocated(device)

    benchmark.pedantic(step, setup=clear_grads, rounds=rounds, iterations=1, warmup_rounds=0)

    benchmark.extra_info.update(
        op=workload.op,
        workload=workload.name,
        shape=workload.describe(),
        provider=provider,
        **{"pass": case.pass_},
        dtype=case.dtype,
        device=device.type,
        state_bytes=wl.state_bytes(workload, dtype),
        checked=provider in wl.OURS,
        fused_step=wl.FUSED_SWITCH.get(provider),  # CONVGRU_TRITON_FUSED_STEP during its calls (None: untouched)
    )
    if provider in wl.OURS:
        from convgru_triton import explain_backend

        module = next(m for m in model.modules() if hasattr(m, "backend") and hasattr(m, "hidden_channels"))
        benchmark.extra_info["backend"] = str(explain_backend(module, device))
    if device.type == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)


def test_conv_gru_cell(benchmark, case, device):
    """One step (RAFT's update block): the input of the next step depends on the state."""
    run_benchmark(benchmark, case, device)


def test_conv_gru(benchmark, case, device):
    """A whole input sequence through stacked ConvGRU layers."""
    run_benchmark(benchmark, case, device)
