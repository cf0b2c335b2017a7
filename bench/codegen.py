"""What the GPU compiler makes of the gate kernels and the fused step, read on a machine without a GPU.

    python -m bench.codegen                       # every workload, sm_90 and sm_80 -> bench/results/codegen-sm90.{md,json} (+ sm80)
    python -m bench.codegen --arch 90 --dtypes bfloat16 --layouts nchw --workloads raft-convgru
    python -m bench.codegen --shape 128,46x62 --shape 24,24x41 --json /tmp/ci.json --no-markdown
    python -m bench.codegen --arch 90 --kernels fused --out /tmp/fused    # the fused step's kernels only (~30 s)

The package runs its ordinary launch path (modules -> functional -> sequence
operator -> launchers -> ``JITFunction.run``: Triton's own argument binding and
specialization: divisibility by 16, arguments equal to 1, constexprs) on CPU
tensors, with three substitutions made in this module and nowhere else:

* Triton's active driver is a fake CUDA driver whose target is ``sm_<arch>``,
  and every kernel the launch path asks for is compiled for it and never
  launched (:func:`bench._triton_compat.compile_without_launch`);
* the package's backend choice accepts CPU tensors for ``backend="triton"``
  (``_backend._interpreter_enabled`` answers yes, the one check that refuses
  them), so the modules are built with the public ``backend="triton"``;
* the fused step's ``fused_step.supports`` answers for CPU tensors as it
  would for CUDA ones (on a CPU it accepts them only under the interpreter,
  and never in bfloat16).

Each compiled kernel is then read back: registers per thread, stack and local
memory (spills) and shared memory from ``cuobjdump --dump-resource-usage`` of its
cubin, and every global load and store in its PTX, counted by width in bytes
(a ``ld.global.v4.b32`` is 16 bytes) and classified by the pointer argument its
address derives from (a def-use trace from the ``ld.param`` of each pointer
argument): **tensor** accesses (states, gates, gradients) and **bias**
accesses (pointer arguments named ``*bias*``, or ``b_ih_ptr``/``b_hh_ptr``). Counts are static
PTX instructions of one thread: with no loops in the kernel, what each thread
executes once.

Workloads: :data:`bench.workloads.FULL_WORKLOADS` at their spatial sizes,
hidden sizes, kernel sizes, layers and time steps, in both layouts
(contiguous "nchw" and channels_last "cl"), float16/bfloat16/float32/float64,
``reset_after`` False and True, forward without autograd (what inference
compiles) and forward + backward with a random output gradient in the
output's layout. Two sizes are shrunk because they change nothing that is
compiled, only how long the CPU convolutions take: the input channels (to
:data:`INPUT_CHANNELS`: the input convolution's output has 3H channels
whatever its input) and the batch N (to the smallest divisor of N that keeps
every per-step offset ``t * N * C * S * element`` as divisible by 16 bytes as
at full N, see :func:`shrunk_batch`). float16 convolutions run in float32 and
are cast back (CPU float16 convolution backward takes ~20 s per RAFT step;
layout and dtype of the result are unchanged).

The fused step (:mod:`convgru_triton.ops.fused_step`: implicit-GEMM
convolution with the gate math in its epilogue) gets cases of its own
(``op="fused"``, :func:`fused_cases`): at the shapes of :data:`FUSED_WORKLOADS`
(RAFT's ConvGRU 3x3 and SepConvGRU 1x5 + 5x1: N=6, 46x62, hidden 128), in
:data:`FUSED_DTYPES`, both layouts and formulations, its launchers
``fused_step.forward_step`` (inference, then saving for backward) and
``fused_step.backward_step`` (the data gradient) run with
``CONVGRU_TRITON_FUSED_STEP=1`` on uninitialised frames, then the rest of the
one-step cell's fused backward as its plans launch it
(``convgru_triton._plan._step_backward``): the weight-gradient kernel
``_conv_wgrad_kernel`` for W_hh (two sources without reset_after, one with the
bias with it) and for W_ih with its bias, from an input x of the workload's own
C_in (256: the kernel's C is a constexpr, so :data:`INPUT_CHANNELS` does not
apply here), and the input's data gradient d_x through ``_conv_dgrad_bwd_kernel``
(``ACCUMULATE=False``; a separable step's first half adds into the second's
d_x, ``ACCUMULATE=True``), each kernel compiled at
the tile the package gives a CPU device (``_tuning.default_tile``). Their
report adds the tile, the pipelining stages and the tensor-core instructions
in the PTX (``wgmma.mma_async``: Hopper's warpgroup MMA; ``mma.sync``: the
Ampere path); their global accesses are counted as the gate kernels' (static
instructions: these kernels loop over taps and channel blocks, so the loop's
are executed once per iteration; operand tiles that reach shared memory by
``cp.async`` are not among them: those static ``cp.async`` instructions are
counted apart, and the channels_last wgrad kernel loads its tensors only so).
The gate cases run with the variable at ``0``, so the two sets never mix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

if __name__ == "__main__":
    # Before triton is first imported: compile, never interpret. (Only when run as
    # a program: imported into a test session, this module must not change how
    # that session's Triton works.)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from . import _triton_compat as tc  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
LAYOUTS = ("nchw", "cl")
ARCHS = (90, 80)
INPUT_CHANNELS = 4  # stand-in C_in: any value compiles the same kernels
#: Workloads whose fused step is compiled (at their full shapes): RAFT's two update cells.
FUSED_WORKLOADS = ("raft-convgru", "raft-sepconvgru")
#: The fused step's dtypes in the report: bfloat16, RAFT's training and inference dtype.
FUSED_DTYPES = ("bfloat16",)
#: Triton names of the fused step's kernels (``_tuning.FUSED_KERNELS`` are their registry names).
FUSED_KERNELS = ("_conv_rz_fwd_kernel", "_conv_n_fwd_kernel", "_conv_reset_after_fwd_kernel",
                 "_conv_dgrad_reset_gate_bwd_kernel", "_conv_dgrad_bwd_kernel", "_conv_wgrad_kernel")
#: the widest global access a thread can make (ld.global.v4.b32 / v2.b64), bytes
WIDEST_ACCESS = 16


# ----------------------------------------------------------------------------
# Cases: one ConvGRU (stage of a workload) in one dtype, layout and formulation
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One run through the package: ``hidden`` channels on ``size`` maps.

    ``op`` is ``"cell"`` (``ConvGRUCell2d``, one step; two cells ``(1, k)`` then
    ``(k, 1)`` when ``separable``), ``"sequence"`` (``ConvGRU2d`` over ``steps``
    steps, ``num_layers`` layers) or ``"fused"`` (the fused step's launchers,
    one step per kernel size: :func:`run_fused_case`). ``batch``/``input_channels``
    are the sizes actually run (see :func:`shrunk_batch`); ``full_batch`` is the workload's."""

    workload: str
    stage: int
    op: str
    hidden: int
    size: Tuple[int, ...]
    kernel_size: int
    input_channels: int
    batch: int
    steps: int
    num_layers: int
    separable: bool
    dtype: str
    layout: str
    reset_after: bool
    full_batch: int = 0
    archs: Tuple[int, ...] = ()  # the targets this case is compiled for; () = every one asked for

    @property
    def contiguous_extent(self) -> int:
        """Elements along the axis that is contiguous in memory: the spatial
        size H*W for "nchw", the hidden channels for "cl"."""
        return math.prod(self.size) if self.layout == "nchw" else self.hidden

    def label(self) -> str:
        """One token (case tags are split on spaces): the workload, its stage,
        ``:fused`` for the fused step's cases."""
        stage = f"[{self.stage}]" if self.stage else ""
        return f"{self.workload}{stage}{':fused' if self.op == 'fused' else ''}"

    def shape(self) -> str:
        return f"H={self.hidden} {'x'.join(map(str, self.size))}"


def shrunk_batch(batch: int, hidden: int, size: Sequence[int], dtype: torch.dtype) -> int:
    """The smallest batch (at least 2) that Triton specializes exactly as ``batch``.

    N enters a launch only through the base addresses of per-step slices of
    (T, N, C, *S) buffers, ``t * N * C * S * element`` bytes from an allocation
    (aligned to 16+ bytes), and Triton specializes a pointer on divisibility by
    16. With ``K = H * S * element`` (C = 2H or 3H add only factors of 2 and 3,
    so H is the least divisible), ``N * K`` is a multiple of 16 exactly when
    ``m = 16 / gcd(16, K)`` divides N, so any n with ``gcd(n, m) == gcd(N, m)``
    specializes alike. Never 1 when N > 1: a (1, C, *S) frame of a channels_last
    (T * N, C, *S) buffer has batch stride C, for which CPU convolutions return
    contiguous outputs where they return channels_last ones for N > 1."""
    k = hidden * math.prod(size) * torch.empty((), dtype=dtype).element_size()
    m = 16 // math.gcd(16, k)
    for n in range(min(2, batch), batch + 1):
        if math.gcd(n, m) == math.gcd(batch, m):
            return n
    return batch


def workload_cases(workloads=None, dtypes: Sequence[str] = tuple(DTYPES), layouts: Sequence[str] = LAYOUTS,
                   formulations: Sequence[bool] = (False, True), full_batch: bool = False) -> List[Case]:
    """Cases for every stage of ``workloads`` (default :data:`bench.workloads.FULL_WORKLOADS`)."""
    from .workloads import FULL_WORKLOADS

    out = []
    for w in FULL_WORKLOADS if workloads is None else workloads:
        for i, st in enumerate(w.stages):
            for dtype in dtypes:
                n = w.batch if full_batch else shrunk_batch(w.batch, st.hidden_channels, st.size, DTYPES[dtype])
                for layout in layouts:
                    for ra in formulations:
                        out.append(Case(
                            w.name, i, "cell" if w.op == "conv_gru_cell" else "sequence", st.hidden_channels,
                            tuple(st.size), st.kernel_size,
                            st.input_channels if full_batch else min(st.input_channels, INPUT_CHANNELS),
                            n, w.steps, st.num_layers, w.separable, dtype, layout, ra, w.batch))
    return out


def fused_cases(workloads=None, dtypes: Sequence[str] = FUSED_DTYPES, layouts: Sequence[str] = LAYOUTS,
                formulations: Sequence[bool] = (False, True)) -> List[Case]:
    """The fused step's cases (``op="fused"``) of ``workloads`` (default: those of
    :data:`bench.workloads.FULL_WORKLOADS` named in :data:`FUSED_WORKLOADS`), one
    per stage, dtype, layout and formulation, at the workload's own N: nothing
    is computed on the CPU (the launchers only allocate), and M = N * Y * X is
    an argument Triton specializes on (divisibility by 16), which a shrunk N
    would not keep in general."""
    from .workloads import FULL_WORKLOADS

    chosen = [w for w in FULL_WORKLOADS if w.name in FUSED_WORKLOADS] if workloads is None else workloads
    out = []
    for w in chosen:
        for i, st in enumerate(w.stages):
            for dtype in dtypes:
                for layout in layouts:
                    for ra in formulations:
                        out.append(Case(w.name, i, "fused", st.hidden_channels, tuple(st.size), st.kernel_size,
                                        st.input_channels, w.batch, 1, 1, w.separable, dtype, layout, ra, w.batch))
    return out


def shape_cases(shapes: Sequence[Tuple[int, Tuple[int, ...]]], dtypes: Sequence[str] = tuple(DTYPES),
                layouts: Sequence[str] = LAYOUTS, formulations: Sequence[bool] = (False, True),
                steps: int = 2, kernel_size: int = 3, archs: Sequence[Sequence[int]] = ()) -> List[Case]:
    """Small cases of given ``(hidden, (H, W))``: a 2-step ``ConvGRU2d`` (the first
    step of the backward takes a second incoming gradient, the last none, and
    the second step's slices start ``N*C*S`` elements into their buffers), N=2
    (see :func:`shrunk_batch` for why not 1)."""
    out = []
    for i, (hidden, size) in enumerate(shapes):
        only = tuple(archs[i]) if i < len(archs) else ()
        label = f"H{hidden}@{'x'.join(map(str, size))}"
        for dtype in dtypes:
            for layout in layouts:
                for ra in formulations:
                    out.append(Case(label, 0, "sequence", hidden, tuple(size), kernel_size, INPUT_CHANNELS, 2,
                                    steps, 1, False, dtype, layout, ra, 2, only))
    return out


# ----------------------------------------------------------------------------
# Running a case through the package
# ----------------------------------------------------------------------------


class _Float32CpuConvolutions(TorchDispatchMode):
    """float16 convolutions (forward and backward) on CPU tensors run in float32
    and come back as float16, in the same layout: ATen's float16 CPU convolution
    took ~120 s per nowcast case (96x96, hidden 64) against ~2 s in float32, and
    only the gate kernels' compilation is measured here."""

    _OPS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        half = [isinstance(a, torch.Tensor) and a.dtype == torch.float16 and a.device.type == "cpu" for a in args]
        if func not in self._OPS or not any(half):
            return func(*args, **kwargs)
        up = [a.float() if h else a for a, h in zip(args, half)]
        out = func(*up, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.half()
        return tuple(t.half() if isinstance(t, torch.Tensor) else t for t in out)


@contextlib.contextmanager
def _package_on_cpu_compiling() -> Iterator[None]:
    """Let ``backend="triton"`` and the fused step run on CPU tensors (the
    package allows them only under the interpreter, which this pretends to be,
    and the fused step not in bfloat16 there), every launch through Triton's
    binder, float16 convolutions computed in float32."""
    from convgru_triton import _backend

    if not hasattr(_backend, "_interpreter_enabled"):
        raise RuntimeError("convgru_triton._backend._interpreter_enabled is gone: adapt "
                           "bench.codegen._package_on_cpu_compiling to where the package now refuses CPU tensors "
                           "for backend='triton'")
    from convgru_triton.ops.fused_step import kernels as fused_step
    from convgru_triton.ops.gates import kernels as conv_gru_cell

    if not hasattr(fused_step, "supports") or not hasattr(fused_step, "clear_decisions"):
        raise RuntimeError("convgru_triton.ops.fused_step.kernels.supports/clear_decisions are gone: adapt "
                           "bench.codegen._package_on_cpu_compiling to where the fused step now refuses CPU tensors")
    saved_enabled, saved_direct = _backend._interpreter_enabled, conv_gru_cell._DIRECT_LAUNCH
    saved_supports = fused_step.supports
    cuda = torch.device("cuda")  # never allocated on: the device whose rules the CPU tensors get

    def supports(spec, dtype, device):
        return saved_supports(spec, dtype, cuda if device.type == "cpu" else device)

    _backend._interpreter_enabled = lambda: True
    # Every launch through Triton's binder, where the compile hook sees it (the
    # launchers otherwise replay a kept kernel after its first launch).
    conv_gru_cell._DIRECT_LAUNCH = False
    fused_step.supports = supports
    # use_fused caches its answers per device: none from before (a CPU "no"), none kept after (a CPU "yes").
    fused_step.clear_decisions()
    try:
        with _Float32CpuConvolutions():
            yield
    finally:
        _backend._interpreter_enabled = saved_enabled
        conv_gru_cell._DIRECT_LAUNCH = saved_direct
        fused_step.supports = saved_supports
        fused_step.clear_decisions()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return t.contiguous()
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return torch.stack([f.contiguous(memory_format=torch.channels_last) for f in t])  # (T, N, C, H, W)


def run_case(case: Case, seed: int = 0) -> None:
    """Forward without autograd, then forward + backward, through the public
    modules (the fused step's cases: :func:`run_fused_case`), with
    the ``fused_step`` setting (``CONVGRU_TRITON_FUSED_STEP``) at ``1`` for the
    fused step's cases and ``0`` for the others, whatever the caller's says."""
    from .workloads import fused_switch

    with fused_switch("1" if case.op == "fused" else "0"):
        if case.op == "fused":
            run_fused_case(case)
        else:
            _run_modules(case, seed)


def run_fused_case(case: Case) -> None:
    """The fused step's launchers, as the sequence operator's step hooks call
    them (``conv_gru._step_forward``/``_step_backward``), for each kernel size
    of ``case`` (``(k, k)``, or ``(1, k)`` then ``(k, 1)`` when separable):
    ``forward_step`` without saving (inference), then saving (training), then
    ``backward_step`` (the update/reset-after gate kernel and the data-gradient
    kernels), on uninitialised (N, C, Y, X) frames in the case's layout and a
    contiguous weight (the modules' ``weight_hh``); then the one-step cell's
    other backward launches (:func:`_cell_backward_launches`). Raises
    RuntimeError when a launcher declines (the kernels would silently not be
    in the report)."""
    from convgru_triton._conv import ConvSpec
    from convgru_triton.ops.fused_step import kernels as fused_step
    from convgru_triton.ops.sequence import op as conv_gru

    dtype, hidden, k = DTYPES[case.dtype], case.hidden, case.kernel_size

    def frame(channels: int) -> torch.Tensor:
        return _layout(torch.empty(case.batch, channels, *case.size, dtype=dtype), case.layout)

    ra = case.reset_after
    for kernel in [(1, k), (k, 1)] if case.separable else [(k, k)]:
        spec = ConvSpec(kernel, (1,) * len(kernel))
        plan = conv_gru.plan(spec, ra, False, True)
        if not plan.fused_step:
            raise RuntimeError(f"{case}: the operator's plan for {kernel} does not take the fused step")
        weights = conv_gru._hidden_weights(plan, torch.empty(3 * hidden, hidden, *kernel, dtype=dtype))
        bias = torch.empty(3 * hidden, dtype=dtype)
        gx, h, state, gates, aux = frame(3 * hidden), frame(hidden), frame(hidden), frame(3 * hidden), frame(hidden)
        # Inference keeps nothing: reset_after passes no gates/aux, the other needs them as scratch.
        ran = [fused_step.forward_step(ra, spec, gx, h, weights, bias, bias, state, None if ra else gates,
                                       None if ra else aux, False),
               fused_step.forward_step(ra, spec, gx, h, weights, bias, bias, state, gates, aux, True)]
        grad, grad2, d_gx, d_h = frame(hidden), frame(hidden), frame(3 * hidden), frame(hidden)
        d_gh = frame(3 * hidden) if ra else None
        math = plan.math.bind(d_h, None, None, (grad, h, gates, aux))
        ran.append(fused_step.backward_step(ra, spec, math, grad, grad2, h, weights, gates, aux, d_gx, d_gh, d_h))
        if not all(ran):
            raise RuntimeError(f"{case}: the fused step declined {kernel} (forward, forward saving, backward: "
                               f"{ran}); see fused_step.use_fused")
        # A separable step's backward runs its halves in reverse: the second, (k, 1), writes d_x, the first adds.
        accumulate = case.separable and kernel == (1, k)
        _cell_backward_launches(spec, ra, frame, h, aux, d_gx, d_gh, case.input_channels, accumulate)


def _cell_backward_launches(spec, reset_after: bool, frame, h, aux, d_gx, d_gh, input_channels: int,
                            accumulate: bool) -> None:
    """The one-step cell's fused backward launches beyond ``backward_step``'s,
    as ``convgru_triton._plan._step_backward`` and ``_fused_input_backward``
    make them with every gradient needed and the biases on: W_hh's gradient
    (without ``reset_after`` its r/z rows from ``h`` and its candidate rows
    from ``aux`` = r * h, in one launch, no bias: both biases' gradient is the
    input convolution's; with it from ``h``, ``d_b_hh`` with it), W_ih's from x
    (``input_channels`` channels) with ``d_b_ih``, and d_x = dgrad(d_gx, W_ih),
    written (``accumulate`` false) or added to. Gradient buffers as the plan
    allocates them: the weights' in the weights' (contiguous) layout, d_x in
    x's."""
    from convgru_triton.ops.fused_step import kernels as fused_step

    hidden = h.shape[1]
    dtype = h.dtype
    x = frame(input_channels)
    w_ih = torch.empty(3 * hidden, input_channels, *spec.kernel_size, dtype=dtype)
    d_w_hh = torch.empty(3 * hidden, hidden, *spec.kernel_size, dtype=dtype)
    d_w_ih, d_b = torch.empty_like(w_ih), torch.empty(3 * hidden, dtype=dtype)
    if reset_after:
        fused_step._launch_wgrad(spec, d_gh, h, d_w_hh, d_b)
    else:
        fused_step._launch_wgrad(spec, d_gx, h, d_w_hh, None, aux, 2 * hidden)
    fused_step._launch_wgrad(spec, d_gx, x, d_w_ih, d_b)
    d_x = frame(input_channels)
    tensors = (d_gx, w_ih, d_x)
    fused_step._launch_dgrad(fused_step._conv_dgrad_bwd_kernel, spec, d_x, 3 * hidden, tensors,
                             tuple(s for t in tensors for s in fused_step._strides(t)), ACCUMULATE=accumulate)


def _run_modules(case: Case, seed: int) -> None:
    import convgru_triton as cg

    torch.manual_seed(seed)
    dtype = DTYPES[case.dtype]
    kw = dict(reset_after=case.reset_after, backend="triton", dtype=dtype)
    k = case.kernel_size
    if case.op == "cell":
        kernels = [(1, k), (k, 1)] if case.separable else [(k, k)]
        cells = [cg.ConvGRUCell2d(case.input_channels, case.hidden, kk, **kw) for kk in kernels]
        x = _layout(torch.randn(case.batch, case.input_channels, *case.size, dtype=dtype), case.layout)
        h0 = _layout(torch.tanh(torch.randn(case.batch, case.hidden, *case.size, dtype=dtype)), case.layout)

        def forward(x, h):
            for cell in cells:
                h = cell(x, h)
            return h

        with torch.no_grad():
            forward(x, h0)
        x.requires_grad_()
        h0.requires_grad_()
        out = forward(x, h0)
    else:
        gru = cg.ConvGRU2d(case.input_channels, case.hidden, k, num_layers=case.num_layers, **kw)
        x = _layout(torch.randn(case.steps, case.batch, case.input_channels, *case.size, dtype=dtype), case.layout)
        with torch.no_grad():
            gru(x)
        x.requires_grad_()
        out = gru(x)[0]
    out.backward(torch.randn_like(out))  # randn_like keeps the output's layout


# ----------------------------------------------------------------------------
# Reading PTX: global accesses by width, traced to the pointer they use
# ----------------------------------------------------------------------------

_REG = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"\[\s*(\w+?)_param_(\d+)\s*\]")
_PARAM_SYMBOL = re.compile(r"\b\w+?_param_(\d+)\b")


@dataclass(frozen=True)
class Access:
    """One global load or store instruction of a thread: ``op`` "ld"/"st",
    ``width`` bytes, ``pointers``: the pointer arguments its address derives from."""

    op: str
    width: int
    pointers: Tuple[str, ...]

    @property
    def kind(self) -> str:
        """"bias" when every pointer it uses is a bias, "tensor" when any is not,
        "unknown" when no argument pointer was traced to it."""
        if not self.pointers:
            return "unknown"
        return "bias" if all(is_bias_pointer(p) for p in self.pointers) else "tensor"


def is_bias_pointer(name: str) -> bool:
    """A bias argument: the gate kernels name theirs ``*bias*``, the fused step's ``b_ih_ptr``/``b_hh_ptr``."""
    return "bias" in name or re.fullmatch(r"b_[a-z]+_ptr", name) is not None


def _split_operands(rest: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def _instructions(ptx: str) -> List[Tuple[str, List[str]]]:
    out = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip()
        if not line or line.startswith((".", "$", "{", "}", "@@")) or not line.endswith(";"):
            continue
        line = re.sub(r"^@!?%p\d+\s+", "", line[:-1].strip())
        op, _, rest = line.partition(" ")
        if op.startswith("."):
            continue
        out.append((op, _split_operands(rest)))
    return out


def _width(op: str) -> Optional[int]:
    vec, bits = 1, None
    for token in op.split(".")[1:]:
        if re.fullmatch(r"v\d", token):
            vec = int(token[1:])
        elif re.fullmatch(r"[bfsu](8|16|32|64|128)", token):
            bits = int(token[1:])
    return None if bits is None else vec * bits // 8


def global_accesses(ptx: str, param_names: Sequence[Optional[str]]) -> List[Access]:
    """Every ``ld.global``/``st.global`` of ``ptx``, with its width and the
    pointer arguments (names from ``param_names``, by PTX parameter index; a
    ``None`` name is not a pointer of interest) its address is computed from.
    A parameter may also be loaded through a register holding its address
    (``mov.b32 %r1, k_param_2; selp.b32 %r3, %r1, %r2, %p1; ld.param.b64 %rd1,
    [%r3]``: a pointer chosen at run time, as the wgrad kernel's second
    source): the load then derives from every parameter that register may hold."""
    instrs = _instructions(ptx)
    taint: Dict[str, frozenset] = {}
    # register -> names of the pointer parameters whose address (not value) it may hold
    param_addr: Dict[str, frozenset] = {}

    def name_of(idx: int) -> Optional[str]:
        return param_names[idx] if idx < len(param_names) else None

    def regs(text: str) -> List[str]:
        return _REG.findall(text)

    def sources(ops: Sequence[str]) -> frozenset:
        out: frozenset = frozenset()
        for o in ops:
            for r in regs(o):
                out |= taint.get(r, frozenset())
        return out

    for _ in range(8):  # to a fixed point: registers may be redefined in later blocks
        changed = False
        for op, ops in instrs:
            if not ops or op.startswith(("st.", "red.", "bra", "ret", "bar", "setp")):
                continue
            if op.startswith("ld.param"):
                m = _PARAM.search(ops[-1])
                if m is None:  # through a register holding parameter addresses
                    new = frozenset(n for r in regs(ops[-1]) for n in param_addr.get(r, ()))
                else:
                    name = name_of(int(m.group(2)))
                    new = frozenset([name]) if name else frozenset()
            elif op.startswith(("ld.", "atom.")):
                continue  # loaded data is not an address of interest
            else:
                new = sources(ops[1:])
                addr = frozenset(n for o in ops[1:] for i in _PARAM_SYMBOL.findall(o) if (n := name_of(int(i))))
                addr |= frozenset(n for o in ops[1:] for r in regs(o) for n in param_addr.get(r, ()))
                for r in regs(ops[0]):
                    if not addr <= param_addr.get(r, frozenset()):
                        param_addr[r] = param_addr.get(r, frozenset()) | addr
                        changed = True
            for r in regs(ops[0]):
                if not new <= taint.get(r, frozenset()):
                    taint[r] = taint.get(r, frozenset()) | new
                    changed = True
        if not changed:
            break
    accesses = []
    for op, ops in instrs:
        if op.startswith(("ld.global", "st.global")):
            width = _width(op)
            if width is None:
                continue
            address = next((o for o in ops if o.startswith("[")), "")
            accesses.append(Access(op[:2], width, tuple(sorted(sources([address])))))
    return accesses


def pointer_param_names(signature: Dict[str, str]) -> List[Optional[str]]:
    """PTX parameter index -> argument name for pointer arguments (``None`` for
    the others). Triton drops constexprs (and arguments specialized to 1, which
    it turns into constexprs) from the PTX parameters and keeps the order."""
    out: List[Optional[str]] = []
    for name, ty in signature.items():
        if ty == "constexpr":
            continue
        out.append(name if isinstance(ty, str) and ty.startswith("*") else None)
    return out


# ----------------------------------------------------------------------------
# Collecting and summarising
# ----------------------------------------------------------------------------


def _spec_summary(rec: "tc.Compiled") -> str:
    """Which non-constexpr arguments Triton specialized as divisible by 16."""
    names = [n for n, t in rec.signature.items() if t != "constexpr"]
    div = []
    for path, attrs in rec.attrs.items():
        index = path[0] if isinstance(path, tuple) else path
        if any("divisibility" in str(a) for a in (attrs or [])) and isinstance(index, int):
            full = list(rec.signature)[index] if index < len(rec.signature) else str(index)
            div.append(full)
    return ",".join(n for n in names if n in div)


def _variant(constexprs: Dict[str, object]) -> str:
    """The constexprs that select code (booleans, layout, block sizes), compactly."""
    keep = []
    for k, v in constexprs.items():
        if isinstance(v, bool) or (isinstance(v, int) and k.isupper()):
            keep.append(f"{k}={int(v) if isinstance(v, bool) else v}")
    return " ".join(keep)


def summarize(rec: "tc.Compiled", arch: int) -> Dict:
    """The numbers of one compiled kernel (see the module docstring)."""
    res = tc.resource_usage(rec.kernel)
    acc = global_accesses(tc.ptx(rec.kernel), pointer_param_names(rec.signature))
    by = {}
    for op in ("ld", "st"):
        for kind in ("tensor", "bias", "unknown"):
            c = Counter(a.width for a in acc if a.op == op and a.kind == kind)
            if c:
                by[f"{op}_{kind}"] = {str(w): n for w, n in sorted(c.items())}
    ptrs = {n for n in pointer_param_names(rec.signature) if n}
    dtype = next((t[1:] for t in rec.signature.values() if isinstance(t, str) and t.startswith("*")), "?")
    instrs = _instructions(tc.ptx(rec.kernel))
    ops = Counter(op.split(".", 2)[0] + "." + op.split(".", 2)[1] for op, _ in instrs
                  if op.startswith(("wgmma.mma_async", "mma.sync")))
    # Asynchronous copies global -> shared (the fused kernels' operand tiles): not in ``accesses``.
    cp_async = sum(1 for op, _ in instrs if op.startswith("cp.async") and ".shared.global" in op)
    return dict(
        arch=arch, kernel=rec.name, dtype=dtype, variant=_variant(rec.constexprs),
        constexprs={k: str(v) for k, v in rec.constexprs.items()}, divisible_by_16=_spec_summary(rec),
        num_warps=rec.num_warps, regs=res["regs"], stack=res["stack"], local=res["local"],
        shared=max(res["shared"], tc.shared_bytes(rec.kernel)), accesses=by, pointers=sorted(ptrs),
        launches=rec.launches, cases=[], fused=rec.name in FUSED_KERNELS,
        # Static tensor-core instructions: Hopper's asynchronous warpgroup MMA, the Ampere-style MMA.
        wgmma=ops["wgmma.mma_async"], mma_sync=ops["mma.sync"], cp_async=cp_async,
        # Optional: the compiled kernel's metadata (None where a Triton version lacks the field).
        num_stages=getattr(getattr(rec.kernel, "metadata", None), "num_stages", None),
    )


def collect(cases: Sequence[Case], arch: int, log=None) -> List[Dict]:
    """Run ``cases`` for ``sm_<arch>``; one summary per distinct compiled kernel
    (a kernel compiled once and launched by several cases lists them all in
    ``cases``, as ``"label H=.. HxW dtype layout reset_after=.."``). A case that
    fails (a kernel that does not compile) is reported in ``errors`` and the
    others still run. Returns ``(kernels, errors, tags)``, tags of the cases run."""
    records: List[tc.Compiled] = []
    errors: List[Dict] = []
    tags: List[str] = []
    used: Dict[int, set] = {}
    launches: List = []
    with tc.compile_without_launch(arch, records, launches), _package_on_cpu_compiling():
        for case in cases:
            if case.archs and arch not in case.archs:
                continue
            start, t0 = len(launches), time.perf_counter()
            tag = (f"{case.label()} {case.shape()} {case.dtype} {case.layout} "
                   f"reset_after={case.reset_after}")
            tags.append(tag)
            try:
                run_case(case)
            except Exception as exc:  # a kernel that does not compile for this target, typically
                errors.append(dict(arch=arch, case=tag, error=f"{type(exc).__name__}: {exc}"[-3000:]))
                if log:
                    log(f"sm_{arch} {tag}: FAILED {type(exc).__name__}: {str(exc)[-500:]}")
                continue
            if len(launches) == start:
                raise RuntimeError(f"{case}: no Triton kernel was launched: the package did not take its Triton "
                                   "path (see bench.codegen._package_on_cpu_compiling)")
            for rec in launches[start:]:
                used.setdefault(id(rec), set()).add(tag)
            if log:
                log(f"sm_{arch} {tag}: {len(launches) - start} launches, {len(records)} kernels so far "
                    f"({time.perf_counter() - t0:.1f} s)")
    out = []
    for rec in records:
        s = summarize(rec, arch)
        s["cases"] = sorted(used.get(id(rec), ()))
        out.append(s)
    return out, errors, tags


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _widths(d: Optional[Dict[str, int]]) -> str:
    if not d:
        return "—"
    return " ".join(f"{n}×{w}" for w, n in sorted(d.items(), key=lambda kv: -int(kv[0])))


def narrowest(summary: Dict, kind: str = "tensor") -> Optional[int]:
    """The narrowest global access (bytes) of ``kind`` in a kernel, ``None`` if none."""
    widths = [int(w) for op in ("ld", "st") for w in summary["accesses"].get(f"{op}_{kind}", {})]
    return min(widths) if widths else None


def count(summary: Dict, kind: str, below: int = 10**9, op: str = "ldst") -> int:
    """Accesses of ``kind`` narrower than ``below`` bytes."""
    return sum(n for o in ("ld", "st") if o in op
               for w, n in summary["accesses"].get(f"{o}_{kind}", {}).items() if int(w) < below)


def _meta() -> Dict[str, str]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    commit = os.environ.get("COMMIT") or git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "convgru_triton"))
    return dict(triton=tc.triton_version(), torch=torch.__version__, commit=commit, dirty=dirty,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def _case_key(tag: str) -> Tuple[str, str]:
    """``("raft-convgru H=128 46x62", "bfloat16 nchw")`` from a case tag."""
    parts = tag.split()
    return " ".join(parts[:3]), " ".join(parts[3:5])


def is_fused(summary: Dict) -> bool:
    """Whether a kernel summary is one of the fused step's kernels (a saved report
    without the ``fused`` field: by name)."""
    return bool(summary.get("fused", summary["kernel"] in FUSED_KERNELS))


def _short(name: str) -> str:
    return name.strip("_").replace("_kernel", "")


def markdown(result: Dict) -> str:
    """Per arch: one table of the gate kernels and one of the fused step's
    kernels, one line per distinct compiled kernel."""
    meta = result["meta"]
    lines = [f"# Codegen: the gate kernels and the fused step as the GPU compiler builds them", "",
             f"Triton {meta['triton']} · torch {meta['torch']} · commit {meta['commit'][:12]}"
             f"{' + uncommitted kernel changes' if meta.get('dirty') else ''} · {meta['date']} · "
             f"`python -m bench.codegen` on a CPU (fake CUDA target, the package's own launch path).", "",
             "Per kernel and thread: registers; spills (bytes of stack frame + local memory: a spill shows as a stack frame, "
             "`STL`/`LDL` in SASS; cuobjdump's LOCAL counts only declared local arrays); shared memory (bytes); global "
             "loads (`ld`) and stores (`st`) as `count×bytes`, split into **tensor** accesses (states, gates, "
             "gradients) and **bias** accesses, traced from the pointer argument each address is computed from. "
             "Static PTX counts: the gate kernels have no loops, so each thread runs each once. "
             f"{result.get('note', '')}", ""]
    for arch in result["archs"]:
        every = [k for k in result["kernels"] if k["arch"] == arch]
        rows = [k for k in every if not is_fused(k)]
        lines += [f"## sm_{arch}", ""]
        worst = max((k["regs"] for k in rows), default=0)
        spills = sum(k["local"] + k["stack"] for k in rows)
        lines += [f"{len(rows)} compiled gate kernels; most registers {worst}; "
                  f"{'no spills (stack or local memory)' if not spills else f'{spills} bytes of stack/local memory (spills) in total'}.", ""]
        failed = [e for e in result.get("errors", []) if e["arch"] == arch]
        if failed:
            lines += [f"**{len(failed)} cases failed to compile:**", ""]
            lines += [f"- {e['case']}: `{e['error'].splitlines()[-1][:300] if e['error'] else ''}`" for e in failed]
            lines.append("")
        if rows:
            head = ["kernel", "variant", "dtype", "layout", "shape (workloads)", "warps", "regs", "spills", "shared",
                    "tensor ld", "tensor st", "bias ld", "narrowest tensor B"]
            lines += ["| " + " | ".join(head) + " |",
                      "|" + "|".join(["---"] * 5 + ["--:"] * 4 + ["---"] * 3 + ["--:"]) + "|"]
        for k in sorted(rows, key=lambda k: (k["kernel"], k["dtype"], k["cases"][:1])):
            shapes = sorted({_case_key(c)[0] for c in k["cases"]})
            layouts = sorted({c.split()[4] for c in k["cases"]})
            lines.append("| " + " | ".join([
                _short(k["kernel"]), k["variant"].replace("CHANNELS_LAST", "CL"),
                k["dtype"], "/".join(layouts), "; ".join(shapes), str(k["num_warps"]), str(k["regs"]),
                str(k["local"] + k["stack"]), str(k["shared"]), _widths(k["accesses"].get("ld_tensor")),
                _widths(k["accesses"].get("st_tensor")), _widths(k["accesses"].get("ld_bias")),
                str(narrowest(k) or "—")]) + " |")
        lines.append("")
        fused = [k for k in every if is_fused(k)]
        if fused:
            lines += fused_lines(fused, arch)
    return "\n".join(lines)


def fused_lines(kernels: Sequence[Dict], arch: int) -> List[str]:
    """The fused step's kernels of one arch: one line per compiled kernel (see
    :func:`fused_cases` for what ran)."""
    spills = sum(k["local"] + k["stack"] for k in kernels)
    no_wgmma = sum(1 for k in kernels if not k.get("wgmma"))
    lines = [f"### sm_{arch}: the fused step", "",
             f"{len(kernels)} compiled kernels (`convgru_triton/ops/fused_step/kernels.py`: implicit-GEMM convolution, the "
             "gate math in the epilogue; forward without and with saving, backward = the data gradients (dgrad, "
             "d_x included) and the one-step cell's weight gradients (wgrad)); most "
             f"registers {max(k['regs'] for k in kernels)}; "
             + ("no spills" if not spills else f"{spills} bytes of stack/local memory (spills) in total") + "; "
             + (f"wgmma in {len(kernels) - no_wgmma} of {len(kernels)}" if arch >= 90 else
                f"mma.sync in {sum(1 for k in kernels if k.get('mma_sync'))} of {len(kernels)}")
             + ". Tile: the package's default for the kernel (`_tuning.default_tile`); C = the channels the "
             "reduction runs over (wgrad: the weight's input channels, its reduction runs over the pixels); "
             "variant: the constexprs that select code (SAVE: the forward saves for backward; ACCUMULATE: the "
             "dgrad adds to its output; TWO_SOURCES: wgrad's candidate rows from a second source; HAS_BIAS: wgrad "
             "sums the bias gradient too); tile M×N×K: pixels × output channels × reduction channels, wgrad's "
             "output channels × input channels × pixels; wgmma / mma.sync: static tensor-core instructions in the "
             "PTX; accesses: static instructions (the reduction loop's run once per tap and channel block, "
             "wgrad's once per pixel block); cp.async: static global-to-shared copies (operand tiles), not in "
             "the ld columns.", "",
             "| kernel | kernel size | layout | formulation | C | variant | tile M×N×K (BLOCK_X) | warps | stages | "
             "regs | spills | shared | wgmma | mma.sync | cp.async | tensor ld | tensor st | bias ld | workloads |",
             "|---|---|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|---|---|"]

    def key(k):
        c = k["constexprs"]
        return (_short(k["kernel"]), c.get("KH", ""), c.get("KW", ""), c.get("BLOCK_X", "") == "0",
                c.get("C", ""), _fused_variant(k))

    for k in sorted(kernels, key=key):
        c = k["constexprs"]
        layouts = sorted({t.split()[4] for t in k["cases"]})
        forms = sorted({"reset_after" if t.split()[5] == "reset_after=True" else "reset_before" for t in k["cases"]})
        workloads = sorted({t.split()[0].replace(":fused", "") for t in k["cases"]})
        m, n, kk = (("BLOCK_O", "BLOCK_C", "BLOCK_P") if "BLOCK_O" in c else ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        tile = f"{c.get(m, '?')}×{c.get(n, '?')}×{c.get(kk, '?')} ({c.get('BLOCK_X', '?')})"
        lines.append("| " + " | ".join([
            _short(k["kernel"]), f"{c.get('KH', '?')}×{c.get('KW', '?')}", "/".join(layouts), "/".join(forms),
            c.get("C", "?"), _fused_variant(k) or "—", tile, str(k["num_warps"]), str(k.get("num_stages") or "—"),
            str(k["regs"]),
            str(k["local"] + k["stack"]), str(k["shared"]), str(k.get("wgmma", "—")), str(k.get("mma_sync", "—")),
            str(k.get("cp_async", "—")), _widths(k["accesses"].get("ld_tensor")),
            _widths(k["accesses"].get("st_tensor")), _widths(k["accesses"].get("ld_bias")),
            ", ".join(workloads)]) + " |")
    return lines + [""]


#: The fused kernels' constexprs that select code beside the shape and tile (the report's "variant").
FUSED_VARIANT_FLAGS = ("SAVE", "ACCUMULATE", "TWO_SOURCES", "HAS_BIAS")


def _fused_variant(summary: Dict) -> str:
    """``"SAVE=1"``, ``"ACCUMULATE=0"``, ``"TWO_SOURCES=1 HAS_BIAS=0"``: the
    :data:`FUSED_VARIANT_FLAGS` a fused kernel has (HAS_BIAS of the wgrad
    kernel only: the forward kernels' is on in every case run)."""
    c = summary["constexprs"]
    wgrad = summary["kernel"] == "_conv_wgrad_kernel"
    flags = [f for f in FUSED_VARIANT_FLAGS if f in c and (f != "HAS_BIAS" or wgrad)]
    return " ".join(f"{f}={int(c[f] == 'True')}" for f in flags)


def summary_table(result: Dict, arch: int = 90) -> str:
    """One line per gate kernel (name): builds, worst registers (half/single precision
    and float64 apart), spills, the narrowest tensor access at RAFT's map
    (46x62, contiguous and channels_last) and the most bias loads per thread;
    then, when it was compiled, one line per kernel of the fused step
    (:func:`fused_summary`)."""
    rows = [k for k in result["kernels"] if k["arch"] == arch and not is_fused(k)]
    names = sorted({k["kernel"] for k in rows})
    head = ["kernel", "builds", "max regs fp16/bf16/fp32", "max regs fp64", "spills (B)",
            "narrowest tensor access, RAFT 46×62 NCHW (B)", "… channels_last (B)", "bias loads/thread (max)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)] if rows else []
    for name in names:
        ks = [k for k in rows if k["kernel"] == name]

        def raft(layout):
            sel = [k for k in ks if any("46x62" in c and f" {layout} " in c for c in k["cases"])]
            vals = [narrowest(k) for k in sel if narrowest(k) is not None]
            return str(min(vals)) if vals else "—"

        def most(sel):
            return str(max(k["regs"] for k in sel)) if sel else "—"

        lines.append("| " + " | ".join([
            _short(name), str(len(ks)), most([k for k in ks if k["dtype"] != "fp64"]),
            most([k for k in ks if k["dtype"] == "fp64"]), str(sum(k["local"] + k["stack"] for k in ks)),
            raft("nchw"), raft("cl"), str(max(count(k, "bias", op="ld") for k in ks))]) + " |")
    fused = fused_summary(result, arch)
    return "\n".join(lines) + ("\n\n" if lines and fused else "\n" if lines else "") + fused


def fused_summary(result: Dict, arch: int = 90) -> str:
    """One line per kernel of the fused step (name): builds, registers (fewest
    and most), spills, and the fewest tensor-core instructions of any build
    (a build with none runs its products off the tensor cores); ``""`` when
    none was compiled for ``arch``."""
    rows = [k for k in result["kernels"] if k["arch"] == arch and is_fused(k)]
    if not rows:
        return ""
    mma = "wgmma" if arch >= 90 else "mma_sync"
    head = ["fused-step kernel", "builds", "regs (fewest–most)", "spills (B)",
            f"fewest {'wgmma' if arch >= 90 else 'mma.sync'} per build"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 1)]
    for name in [n for n in FUSED_KERNELS if any(k["kernel"] == n for k in rows)]:
        ks = [k for k in rows if k["kernel"] == name]
        regs = sorted(k["regs"] for k in ks)
        lines.append("| " + " | ".join([
            _short(name), str(len(ks)), f"{regs[0]}–{regs[-1]}", str(sum(k["local"] + k["stack"] for k in ks)),
            str(min(k.get(mma, 0) for k in ks))]) + " |")
    return "\n".join(lines) + "\n"


def write_reports(result: Dict, out: str, markdown_too: bool = True, log=print) -> None:
    """``out/codegen-sm<arch>.json`` (and ``.md``) for each arch of ``result``."""
    os.makedirs(out, exist_ok=True)
    for arch in result["archs"]:
        part = dict(result, archs=[arch], kernels=[k for k in result["kernels"] if k["arch"] == arch],
                    errors=[e for e in result.get("errors", []) if e["arch"] == arch])
        stem = os.path.join(out, f"codegen-sm{arch}")
        with open(stem + ".json", "w") as f:
            json.dump(part, f, indent=1)
        if markdown_too:
            with open(stem + ".md", "w") as f:
                f.write(markdown(part) + "\n## Summary (one line per kernel)\n\n" + summary_table(part, arch))
        log(f"wrote {stem}.json" + (f" and {stem}.md" if markdown_too else ""))


class BackendUnavailable(RuntimeError):
    """Triton's NVIDIA backend (ptxas, cuobjdump) is not usable on this machine."""


#: exit status of ``python -m bench.codegen`` when the NVIDIA backend is unavailable (the CI tests skip)
EXIT_NO_BACKEND = 3


def run(cases: Sequence[Case], archs: Sequence[int], log=print, note: str = "") -> Dict:
    error = tc.nvidia_backend_error()
    if error:
        raise BackendUnavailable(f"cannot compile for a GPU here: {error}")
    kernels: List[Dict] = []
    errors: List[Dict] = []
    ran: Dict[str, List[str]] = {}
    t0 = time.perf_counter()
    for arch in archs:
        k, e, tags = collect(cases, arch, log=log)
        kernels += k
        errors += e
        ran[str(arch)] = tags
    return dict(meta=_meta(), archs=list(archs), note=note, seconds=round(time.perf_counter() - t0, 1),
                cases=[dataclasses.asdict(c) for c in cases], ran=ran, errors=errors, kernels=kernels)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.codegen", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90 (H100/H200) or 80 (A100)")
    p.add_argument("--workloads", default="all", help="names from bench/workloads.py FULL_WORKLOADS, or all")
    p.add_argument("--shape", action="append", default=[], metavar="HIDDEN,HxW[@ARCH,..][/DTYPE,..]",
                   help="instead of the workloads: a 2-step ConvGRU2d of this hidden size and map, N=2 "
                        "(repeatable; @90 compiles it for sm_90 only, /float16 in float16 only)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--formulations", default="both", choices=("both", "reset_after", "reset_before"))
    p.add_argument("--kernels", default="all", choices=("all", "gates", "fused"),
                   help="the gate kernels' cases (--workloads or --shape), the fused step's (--fused-workloads), "
                        "or both (default)")
    p.add_argument("--fused-workloads", default=",".join(FUSED_WORKLOADS),
                   help="workloads whose fused step is compiled, at their full shapes (default: RAFT's two)")
    p.add_argument("--fused-dtypes", default=",".join(FUSED_DTYPES), help="dtypes of the fused step's cases")
    p.add_argument("--full-batch", action="store_true", help="run the workloads' own N and C_in (slow on a CPU)")
    p.add_argument("--out", default="bench/results", help="folder of codegen-sm<arch>.{md,json}")
    p.add_argument("--json", help="write the whole result as one JSON here instead")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the convolutions (default 2)")
    p.add_argument("--render", metavar="JSON", nargs="+",
                   help="no compiling: rewrite the markdown (and JSON) into --out from saved codegen JSON files")
    args = p.parse_args(argv)
    if args.render:
        parts = []
        for path in args.render:
            with open(path) as f:
                parts.append(json.load(f))
        result = dict(parts[0], archs=[a for r in parts for a in r["archs"]],
                      kernels=[k for r in parts for k in r["kernels"]],
                      errors=[e for r in parts for e in r.get("errors", [])])
        write_reports(result, args.out)
        return 0
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    forms = {"both": (False, True), "reset_after": (True,), "reset_before": (False,)}[args.formulations]
    fused_dtypes = [d.strip() for d in args.fused_dtypes.split(",") if d.strip()]
    for d in dtypes + fused_dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    from .workloads import FULL_WORKLOADS

    fused_names = [n for n in args.fused_workloads.split(",") if n.strip()]
    fused_chosen = [w for w in FULL_WORKLOADS if w.name in fused_names]
    if args.kernels != "gates" and len(fused_chosen) != len(set(fused_names)):
        p.error(f"unknown workload in --fused-workloads {args.fused_workloads!r}")
    if args.kernels == "fused":
        cases = []
        note = ""
    elif args.shape:
        cases = []
        for spec in args.shape:
            spec, _, only_dtypes = spec.partition("/")
            spec, _, at = spec.partition("@")
            hidden, hw = spec.split(",")
            shape = (int(hidden), tuple(int(v) for v in hw.split("x")))
            only = tuple(int(a) for a in at.split(",") if a.strip())
            chosen = [d for d in only_dtypes.split(",") if d] or dtypes
            cases += shape_cases([shape], chosen, layouts, forms, archs=[only])
        note = ""
    else:
        chosen = [w for w in FULL_WORKLOADS if args.workloads == "all" or w.name in args.workloads.split(",")]
        if not chosen:
            p.error(f"no workload matches {args.workloads!r}")
        cases = workload_cases(chosen, dtypes, layouts, forms, full_batch=args.full_batch)
        note = ("Workloads of `bench/workloads.py` (FULL) at their spatial sizes, hidden sizes, kernels, layers "
                "and steps; " + ("their own N and C_in." if args.full_batch else
                                 f"run with C_in={INPUT_CHANNELS} and N shrunk to the smallest divisor that keeps "
                                 "every pointer's divisibility by 16 (neither changes what is compiled)."))
    if args.kernels != "gates":
        cases += fused_cases(fused_chosen, fused_dtypes, layouts, forms)
        note += (" The fused step: " + ", ".join(f"`{w.name}` ({w.describe()})" for w in fused_chosen)
                 + f", {', '.join(fused_dtypes)}, its launchers on uninitialised frames (nothing is computed).")
    if not cases:
        p.error("nothing to compile (no workload, shape or fused-step workload chosen)")
    log = (lambda *a: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        result = run(cases, archs, log=log, note=note.strip())
    except BackendUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_BACKEND
    except (RuntimeError, tc.TritonInternalsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    else:
        write_reports(result, args.out, not args.no_markdown, log)
    if not args.quiet:
        for arch in archs:
            print(f"sm_{arch}:")
            print(summary_table(result, arch))
    for e in result["errors"]:
        print(f"error: sm_{e['arch']} {e['case']}: {e['error'][-300:]}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
