"""The fused ConvGRU step: hidden convolution and gate math in one pass,
forward and backward (the backward's data gradient, and the one-step cell's
weight gradient; section "Backward").

Kernels, launchers and the selection
(:func:`use_fused`) live together in this file; the references they are
checked against are in :mod:`.naive`, built from the ``*_ref`` functions of
:mod:`..gates.naive`.

Selection (docs/tuning.md, "The fused step"): the sequence operator
(:mod:`..sequence.op`) asks :func:`use_fused` per step and direction.
``CONVGRU_TRITON_FUSED_STEP=1`` runs these kernels wherever :func:`supports`
holds and the plan uses the Triton gate math; ``0`` never; unset, empty or
``auto`` lets the tuning registry decide per GPU, dtype, formulation,
direction, kernel size and state size (``step_paths``, written by ``python -m
convgru_triton.tune --fused-step``), and without an entry the answer is
cuDNN's convolution followed by the gate kernels of :mod:`..gates.kernels`:
no committed GPU figure of the fused step exists yet, and the default is what
measured faster. Any other value of the variable is a ValueError at the first
call. Tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) come from the
registry too (``fused_tiles``; defaults ``_tuning.default_tile``, chosen for
registers: see there). These kernels save
exactly what the gate kernels save (``gates`` and ``aux``), so either backward
works on what either forward saved.

The equations (module docstring of :mod:`convgru_triton.functional`), gate
order (r, z, n) along the channels, ``*`` a 'same'-padded stride-1 convolution::

    r  = sigmoid(gx_r + b_ir + W_hr * h + b_hr)
    z  = sigmoid(gx_z + b_iz + W_hz * h + b_hz)
    n  = tanh(gx_n + b_in + W_hn * (r * h) + b_hn)     reset_after=False
    n  = tanh(gx_n + b_in + r * (W_hn * h + b_hn))     reset_after=True
    h' = (1 - z) * h + z * n

Kernels (2-D, zero padding, stride 1, any kernel size and dilation; ``gx``
(N, 3H, Y, X) are the input pre-activations ``W_i * x`` without bias, or,
for the one-step cell, computed in the kernel from x: see HAS_X below):

``reset_after=False``, two launches (the second convolution reads r * h of
neighbouring pixels, which the first must have finished writing):
    * ``_conv_rz_fwd_kernel``: ``acc_r, acc_z = W_hrz * h``; writes r and z into
      ``gates[:, :2H]`` and ``aux = r * h``
      (= :func:`~..gates.naive.gru_reset_gate_fwd_ref`).
    * ``_conv_n_fwd_kernel``: ``acc = W_hn * aux``; reads z from ``gates``;
      writes h' and, when saving, n into ``gates[:, 2H:]``
      (= :func:`~..gates.naive.gru_update_fwd_ref`).

``reset_after=True``, one launch:
    * ``_conv_reset_after_fwd_kernel``: ``acc_r, acc_z, acc_n = W_h * h`` for
      the same hidden channels; writes h' and, when saving, ``gates = (r, z, n)``
      and ``aux = acc_n + b_hn`` (= :func:`~..gates.naive.gru_reset_after_fwd_ref`).

Implicit GEMM: rows M = N * Y * X output pixels, columns the hidden channels
of one gate (one accumulator per gate, sharing the loaded state tile),
reduction K = C * kh * kw (C = H input channels of the hidden convolution),
walked tap by tap (kh * kw taps unrolled) and then over channel blocks. A
program owns a ``BLOCK_M x BLOCK_N`` tile of (pixels x hidden channels);
pixels outside the map read zeros (masked loads), which is the 'same' zero
padding (left/top pad ``d * (k - 1) // 2``, as :class:`~convgru_triton._conv.ConvSpec`).
Accumulation is float32 with ``tl.dot`` (float64 for float64 tensors):
``input_precision="ieee"`` for float32 inputs, so results match the
reference, not TF32; float16/bfloat16 tiles go to the tensor cores (wgmma on
sm_90 with BLOCK_M = 64 and 4 warps). Every tensor is addressed through its
four strides, so contiguous (NCHW) and channels_last (NHWC) tensors, and any
mix of them, work without copies. The sample offset is 64-bit; offsets
within a sample are 32-bit, which :func:`forward_step` checks before launch.

Backward (section "Backward" at the end, :func:`backward_step`, run from
``conv_gru._step_backward`` where :func:`use_fused` says ``"bwd"``): the
hidden convolutions' data gradient (dgrad) as the same implicit GEMM over the
transposed, flipped weight, with the gate backward in its epilogue:
``_conv_dgrad_reset_gate_bwd_kernel`` (dgrad of W_hn + the reset-gate
backward) then ``_conv_dgrad_bwd_kernel`` (dgrad of W_hrz, added to dL/dh);
with ``reset_after`` the latter alone over the 3H channels of d_gh. The
elementwise first kernel of the step (``update_bwd``/``reset_after_bwd``)
and the weight gradient (wgrad, cuDNN) are the cuDNN + gate-kernel path's.

The one-step cell's input convolution (``HAS_X``; :func:`forward_step` with
``x`` and ``weight_ih``, from ``conv_gru.fused_cell_step``): the three forward
kernels take the cell's input x (N, C_in, Y, X) and W_ih (3H, C_in, kh, kw)
as a second operand and walk its taps x channel blocks (BLOCK_KI channels at
a time) through :func:`_conv_acc`, the same reduction as the hidden
convolution's, before the hidden one: into acc_r and acc_z (W_ir, W_iz rows),
into the n accumulator with ``reset_after=False`` (W_in * x and W_hn * (r * h)
add before tanh) and into a fourth accumulator with ``reset_after=True`` (r
multiplies only the hidden part). gx is then neither made nor read. Without
HAS_X the x arguments are ``None`` (constexpr) and the branches are pruned:
the kernels' sm_90 PTX is the same as before HAS_X existed (compared with the
line info stripped, bfloat16, 3x3, both formulations; Triton 3.9). At RAFT's
bfloat16 shape (x 256 channels, hidden 128, 46x62, N=6) the HAS_X kernels
compile for sm_90 to 80-143 registers, with wgmma and no spills
(tests/test_fused_cell_input.py). The cell's backward is the step backward
(``conv_gru._backward_step``) followed by cuDNN's convolution backward for
d_x and d_W_ih; the cell plans' backward (``convgru_triton._plan``) runs it
without cuDNN: the dgrad kernels above, ``_conv_dgrad_bwd_kernel`` for d_x
(over W_ih, ``ACCUMULATE=False``, or adding into the other half's d_x of a
separable step) and ``_conv_wgrad_kernel`` for the weight gradients (W_hh in
one launch: its r/z rows from h, its candidate rows from r * h; W_ih with the
bias gradient), each launch bound to the plan.

Not built: the wgrad kernel in the sequence operator (its weight gradient
stays one batched cuDNN call over all steps), the input convolution inside
the sequence operator (likewise), a tuned or persistent grid, pre-packed
weights (the weight tile is gathered with the weight's own strides), and any
GPU measurement (of the cell's input fusion and the wgrad kernel too: their
tiles are chosen for registers).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ... import _settings, _tuning
from ..._conv import ConvSpec
from ..gates.kernels import _sigmoid, _tanh

Tensor = torch.Tensor

#: The environment variable of the ``fused_step`` setting that chooses the fused
#: step: 1, 0 or auto (:data:`MODES`). Read at import; ``override_settings(fused_step=...)``
#: changes the setting at run time.
ENV_VAR = "CONVGRU_TRITON_FUSED_STEP"

#: dtypes the fused step takes (float64 runs under the interpreter in the tests, not selected).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


#: The values ``CONVGRU_TRITON_FUSED_STEP`` takes: ``1`` force the fused step
#: where :func:`supports` holds, ``0`` force cuDNN + the gate kernels, ``auto``
#: (also unset or empty) the tuning registry decides per shape (:func:`use_fused`).
MODES = ("1", "0", "auto")


def mode(value: Optional[str] = None) -> str:
    """``"1"``, ``"0"`` or ``"auto"`` from ``value`` (default: the ``fused_step``
    setting; empty is ``"auto"``), checked as :mod:`convgru_triton._settings`
    checks it.

    Raises:
        ValueError: anything else, naming the variable, the values it takes
            and the value given.
    """
    if value is None:
        return _settings.get_settings().fused_step
    return _settings.parse("fused_step", value)


def _interpreter_enabled() -> bool:
    return _settings.peek_settings().triton_interpret


def supports(spec: ConvSpec, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused step applies: a 2-D 'same' convolution with zero
    padding (stride 1, any kernel size and dilation), float16, bfloat16 or
    float32 tensors on CUDA, or CPU tensors under the Triton interpreter (the
    tests; not bfloat16, which the interpreter lacks). Everything else keeps
    cuDNN + the gate kernels."""
    if spec.dims != 2 or spec.padding_mode != "zeros" or dtype not in DTYPES:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreter_enabled() and dtype is not torch.bfloat16


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _pixels(M, HW, Y, X, BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr):
    """This program's BLOCK_M output pixels: (sample as int64, row, column, mask).

    ``BLOCK_X == 0``: BLOCK_M consecutive pixels of the flattened (N, Y, X)
    grid, for channels_last, where the channels are the contiguous axis. Else a
    (BLOCK_M / BLOCK_X) x BLOCK_X patch of one sample, for NCHW, where the
    columns are: ``x`` is then visibly BLOCK_X-contiguous to the compiler
    (``x`` split out of a flat index by a runtime division is not, and every
    access became a 64-bit-addressed scalar gather: 255 registers and spills
    at sm_90)."""
    i = tl.arange(0, BLOCK_M)
    if BLOCK_X == 0:
        m = tl.program_id(0) * BLOCK_M + i
        m_mask = m < M
        n = m // HW
        rest = m - n * HW
        y = rest // X
        x = rest - y * X
    else:
        BLOCK_Y: tl.constexpr = BLOCK_M // BLOCK_X
        tiles_x = tl.cdiv(X, BLOCK_X)
        per_sample = tl.cdiv(Y, BLOCK_Y) * tiles_x
        pid = tl.program_id(0)
        n = pid // per_sample
        rest = pid - n * per_sample
        tile_y = rest // tiles_x
        tile_x = rest - tile_y * tiles_x
        y = tile_y * BLOCK_Y + i // BLOCK_X
        x = tile_x * BLOCK_X + i % BLOCK_X
        m_mask = (y < Y) & (x < X)
    return n.to(tl.int64), y, x, m_mask


@triton.jit
def _at(ptr, n64, y, x, ch, sn, sc, sy, sx):
    """(BLOCK_M, BLOCK_N) pointers to channels ``ch`` of the tile's pixels: the
    sample offset in 64 bits, the rest within a sample in 32."""
    return ptr + (n64 * sn + (y * sy + x * sx))[:, None] + (ch * sc)[None, :]


@triton.jit
def _tap(kk, y, x, m_mask, Y, X, C: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
         PAD_Y: tl.constexpr, PAD_X: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``kk`` of the reduction loop over (tap, channel block): the tap
    (ky, kx), the input pixels (iy, ix) it reads for the tile's pixels, which
    of them lie inside the map (the rest is the zero padding), and the
    channel block ``ci``. Shared by the three kernels (inlined by Triton)."""
    tap = kk // tl.cdiv(C, BLOCK_K)
    ky = tap // KW
    kx = tap - ky * KW
    iy = y + (ky * DIL_Y - PAD_Y)
    ix = x + (kx * DIL_X - PAD_X)
    valid = m_mask & (iy >= 0) & (iy < Y) & (ix >= 0) & (ix < X)
    ci = (kk - tap * tl.cdiv(C, BLOCK_K)) * BLOCK_K + tl.arange(0, BLOCK_K)
    return ky, kx, iy, ix, valid, ci


@triton.jit
def _state_tile(x_ptr, n64, iy, ix, valid, ci, C, sn, sc, sy, sx):
    """(BLOCK_M, BLOCK_K) tile of the convolution's input at pixels (iy, ix) and
    channels ``ci``; zero outside the map (the 'same' zero padding) and past C."""
    ptrs = x_ptr + (n64 * sn + (iy * sy + ix * sx))[:, None] + (ci * sc)[None, :]
    return tl.load(ptrs, mask=valid[:, None] & (ci < C)[None, :], other=0.0)


@triton.jit
def _weight_tile(w_ptr, co, co_mask, ci, C, ky, kx, so, si, sy, sx):
    """(BLOCK_K, BLOCK_N) tile ``W[co, ci, ky, kx]`` (K rows, output channels as columns)."""
    ptrs = w_ptr + (ky * sy + kx * sx) + (ci * si)[:, None] + (co * so)[None, :]
    return tl.load(ptrs, mask=(ci < C)[:, None] & co_mask[None, :], other=0.0)


@triton.jit
def _conv_acc(src_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, row0, H, Y, X,
              s_sn, s_sc, s_sy, s_sx, w_so, w_si, w_sy, w_sx, acc_0, acc_1, acc_2,
              C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
              PAD_Y: tl.constexpr, PAD_X: tl.constexpr, BLOCK_K: tl.constexpr, GATES: tl.constexpr,
              PRECISION: tl.constexpr, COMPUTE: tl.constexpr):
    """The implicit-GEMM reduction of one convolution into up to three gate
    accumulators: ``acc_g += W[row0 + g * H + co] * src`` for g < GATES, over
    the C channels of ``src`` and the KH x KW taps (one state tile shared by
    the gates). The hidden convolution (``src`` the state or r * h, C = H) and
    the one-step cell's input convolution (``src`` the input x, C = C_in, W
    W_ih) both run through it. Returns the three accumulators (those past
    GATES unchanged: not loop-carried, so nothing is paid for them)."""
    # One flat reduction loop over (tap, channel block), not unrolled: short
    # live ranges, and one loop for the software pipeliner.
    for kk in range(KH * KW * tl.cdiv(C, BLOCK_K)):
        ky, kx, iy, ix, valid, ci = _tap(kk, y, x, m_mask, Y, X, C, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_K)
        a = _state_tile(src_ptr, n64, iy, ix, valid, ci, C, s_sn, s_sc, s_sy, s_sx)
        b_0 = _weight_tile(w_ptr, co + row0, co_mask, ci, C, ky, kx, w_so, w_si, w_sy, w_sx)
        if GATES == 2:
            # Both tiles before both products: the r/z kernel's order before this helper
            # existed, so its PTX is unchanged. (Interleaved, as for 3 gates, it took 119
            # registers instead of 128 at 3x3, sm_90: not measured on a GPU, so not made here.)
            b_1 = _weight_tile(w_ptr, co + (row0 + H), co_mask, ci, C, ky, kx, w_so, w_si, w_sy, w_sx)
        acc_0 = tl.dot(a, b_0, acc_0, input_precision=PRECISION, out_dtype=COMPUTE)
        if GATES > 1:
            if GATES == 3:
                b_1 = _weight_tile(w_ptr, co + (row0 + H), co_mask, ci, C, ky, kx, w_so, w_si, w_sy, w_sx)
            acc_1 = tl.dot(a, b_1, acc_1, input_precision=PRECISION, out_dtype=COMPUTE)
        if GATES > 2:
            b_2 = _weight_tile(w_ptr, co + (row0 + 2 * H), co_mask, ci, C, ky, kx, w_so, w_si, w_sy, w_sx)
            acc_2 = tl.dot(a, b_2, acc_2, input_precision=PRECISION, out_dtype=COMPUTE)
    return acc_0, acc_1, acc_2


@triton.jit
def _bias_pair(b_ih_ptr, b_hh_ptr, gate, H, co, co_mask, COMPUTE: tl.constexpr):
    """(b_ih + b_hh) of one gate over the tile's channels, as a (1, BLOCK_N) row."""
    b = (tl.load(b_ih_ptr + gate * H + co, mask=co_mask, other=0.0).to(COMPUTE)
         + tl.load(b_hh_ptr + gate * H + co, mask=co_mask, other=0.0).to(COMPUTE))
    return b[None, :]


@triton.jit
def _conv_rz_fwd_kernel(
    x_ptr, w_ptr, gx_ptr, h_ptr, gates_ptr, aux_ptr, b_ih_ptr, b_hh_ptr, in_ptr, wi_ptr,
    M, HW, Y, X, H,
    x_sn, x_sc, x_sy, x_sx,
    w_so, w_si, w_sy, w_sx,
    gx_sn, gx_sc, gx_sy, gx_sx,
    h_sn, h_sc, h_sy, h_sx,
    g_sn, g_sc, g_sy, g_sx,
    a_sn, a_sc, a_sy, a_sx,
    i_sn, i_sc, i_sy, i_sx,
    wi_so, wi_si, wi_sy, wi_sx,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
    PAD_Y: tl.constexpr, PAD_X: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_X: tl.constexpr = False, C_IN: tl.constexpr = 0, BLOCK_KI: tl.constexpr = 16,
):
    """r, z = sigmoid(gx_rz + b_ih_rz + W_hrz * h + b_hh_rz); gates[:, :2H] = (r, z); aux = r * h.
    ``x`` is the convolution's input (the state h, C = H channels), ``w`` W_hrz (2H, C, KH, KW).
    HAS_X: gx_rz is W_irz * ``in`` computed here (``in`` (N, C_IN, Y, X), ``wi`` W_ih (3H, C_IN, KH, KW))."""
    n64, y, x, m_mask = _pixels(M, HW, Y, X, BLOCK_M, BLOCK_X)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < H
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    acc_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    if HAS_X:  # the cell's input convolution W_irz * x into the same accumulators; gx is not read
        acc_r, acc_z, _ = _conv_acc(in_ptr, wi_ptr, n64, y, x, m_mask, co, co_mask, 0, H, Y, X,
                                    i_sn, i_sc, i_sy, i_sx, wi_so, wi_si, wi_sy, wi_sx, acc_r, acc_z, acc_z,
                                    C_IN, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_KI, 2, PRECISION, COMPUTE)
    # One state tile, two gates: the r and z weight rows are H apart.
    acc_r, acc_z, _ = _conv_acc(x_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, 0, H, Y, X,
                                x_sn, x_sc, x_sy, x_sx, w_so, w_si, w_sy, w_sx, acc_r, acc_z, acc_z,
                                C, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_K, 2, PRECISION, COMPUTE)

    mask = m_mask[:, None] & co_mask[None, :]
    if HAS_X:
        a_r = acc_r
        a_z = acc_z
    else:
        gx = _at(gx_ptr, n64, y, x, co, gx_sn, gx_sc, gx_sy, gx_sx)
        a_r = acc_r + tl.load(gx, mask=mask).to(COMPUTE)
        a_z = acc_z + tl.load(gx + H * gx_sc, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        a_r += _bias_pair(b_ih_ptr, b_hh_ptr, 0, H, co, co_mask, COMPUTE)
        a_z += _bias_pair(b_ih_ptr, b_hh_ptr, 1, H, co, co_mask, COMPUTE)
    r = _sigmoid(a_r)
    z = _sigmoid(a_z)
    h = tl.load(_at(h_ptr, n64, y, x, co, h_sn, h_sc, h_sy, h_sx), mask=mask).to(COMPUTE)
    gt = _at(gates_ptr, n64, y, x, co, g_sn, g_sc, g_sy, g_sx)
    ty = gates_ptr.dtype.element_ty
    tl.store(gt, r.to(ty), mask=mask)
    tl.store(gt + H * g_sc, z.to(ty), mask=mask)
    tl.store(_at(aux_ptr, n64, y, x, co, a_sn, a_sc, a_sy, a_sx), (r * h).to(aux_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_n_fwd_kernel(
    x_ptr, w_ptr, gx_ptr, h_ptr, gates_ptr, h_new_ptr, b_ih_ptr, b_hh_ptr, in_ptr, wi_ptr,
    M, HW, Y, X, H,
    x_sn, x_sc, x_sy, x_sx,
    w_so, w_si, w_sy, w_sx,
    gx_sn, gx_sc, gx_sy, gx_sx,
    h_sn, h_sc, h_sy, h_sx,
    g_sn, g_sc, g_sy, g_sx,
    o_sn, o_sc, o_sy, o_sx,
    i_sn, i_sc, i_sy, i_sx,
    wi_so, wi_si, wi_sy, wi_sx,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
    PAD_Y: tl.constexpr, PAD_X: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_X: tl.constexpr = False, C_IN: tl.constexpr = 0, BLOCK_KI: tl.constexpr = 16,
):
    """n = tanh(gx_n + b_in + W_hn * (r * h) + b_hn); h' = h + z (n - h); with SAVE gates[:, 2H:] = n.
    ``x`` is aux = r * h (C = H channels), ``w`` W_hn (H, C, KH, KW); z is read from ``gates``.
    HAS_X: gx_n is W_in * ``in`` computed here, into the same accumulator (``wi`` W_ih, rows 2H:3H)."""
    n64, y, x, m_mask = _pixels(M, HW, Y, X, BLOCK_M, BLOCK_X)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    if HAS_X:  # the cell's W_in * x: it adds to W_hn * (r * h) before tanh, so the same accumulator
        acc, _, _ = _conv_acc(in_ptr, wi_ptr, n64, y, x, m_mask, co, co_mask, 2 * H, H, Y, X,
                              i_sn, i_sc, i_sy, i_sx, wi_so, wi_si, wi_sy, wi_sx, acc, acc, acc,
                              C_IN, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_KI, 1, PRECISION, COMPUTE)
    acc, _, _ = _conv_acc(x_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, 0, H, Y, X,
                          x_sn, x_sc, x_sy, x_sx, w_so, w_si, w_sy, w_sx, acc, acc, acc,
                          C, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_K, 1, PRECISION, COMPUTE)

    mask = m_mask[:, None] & co_mask[None, :]
    if HAS_X:
        a_n = acc
    else:
        gx = _at(gx_ptr, n64, y, x, co, gx_sn, gx_sc, gx_sy, gx_sx)
        a_n = acc + tl.load(gx + 2 * H * gx_sc, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        a_n += _bias_pair(b_ih_ptr, b_hh_ptr, 2, H, co, co_mask, COMPUTE)
    cand = _tanh(a_n)
    gt = _at(gates_ptr, n64, y, x, co, g_sn, g_sc, g_sy, g_sx)
    z = tl.load(gt + H * g_sc, mask=mask).to(COMPUTE)
    h = tl.load(_at(h_ptr, n64, y, x, co, h_sn, h_sc, h_sy, h_sx), mask=mask).to(COMPUTE)
    h_new = h + z * (cand - h)
    tl.store(_at(h_new_ptr, n64, y, x, co, o_sn, o_sc, o_sy, o_sx), h_new.to(h_new_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(gt + 2 * H * g_sc, cand.to(gates_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_reset_after_fwd_kernel(
    x_ptr, w_ptr, gx_ptr, h_new_ptr, gates_ptr, aux_ptr, b_ih_ptr, b_hh_ptr, in_ptr, wi_ptr,
    M, HW, Y, X, H,
    x_sn, x_sc, x_sy, x_sx,
    w_so, w_si, w_sy, w_sx,
    gx_sn, gx_sc, gx_sy, gx_sx,
    o_sn, o_sc, o_sy, o_sx,
    g_sn, g_sc, g_sy, g_sx,
    a_sn, a_sc, a_sy, a_sx,
    i_sn, i_sc, i_sy, i_sx,
    wi_so, wi_si, wi_sy, wi_sx,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
    PAD_Y: tl.constexpr, PAD_X: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr,
    HAS_X: tl.constexpr = False, C_IN: tl.constexpr = 0, BLOCK_KI: tl.constexpr = 16,
):
    """acc_r, acc_z, acc_n = W_h * h for the same hidden channels; hn = acc_n + b_hn;
    r, z = sigmoid(gx + b_ih + acc + b_hh); n = tanh(gx_n + b_in + r * hn); h' = h + z (n - h).
    With SAVE: gates = (r, z, n), aux = hn. ``x`` is the state h (C = H), ``w`` W_h (3H, C, KH, KW).
    HAS_X: gx is W_i * ``in`` computed here (``wi`` W_ih (3H, C_IN, KH, KW)), gx_n in an accumulator of its own."""
    n64, y, x, m_mask = _pixels(M, HW, Y, X, BLOCK_M, BLOCK_X)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < H
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    acc_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    acc_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    if HAS_X:
        # The cell's input convolution W_i * x: r and z into their accumulators,
        # W_in * x into one of its own (r multiplies only the hidden part); gx is not read.
        x_n = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
        acc_r, acc_z, x_n = _conv_acc(in_ptr, wi_ptr, n64, y, x, m_mask, co, co_mask, 0, H, Y, X,
                                      i_sn, i_sc, i_sy, i_sx, wi_so, wi_si, wi_sy, wi_sx, acc_r, acc_z, x_n,
                                      C_IN, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_KI, 3, PRECISION, COMPUTE)
    acc_r, acc_z, acc_n = _conv_acc(x_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, 0, H, Y, X,
                                    x_sn, x_sc, x_sy, x_sx, w_so, w_si, w_sy, w_sx, acc_r, acc_z, acc_n,
                                    C, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_K, 3, PRECISION, COMPUTE)

    mask = m_mask[:, None] & co_mask[None, :]
    if HAS_X:
        a_r = acc_r
        a_z = acc_z
    else:
        gx = _at(gx_ptr, n64, y, x, co, gx_sn, gx_sc, gx_sy, gx_sx)
        a_r = acc_r + tl.load(gx, mask=mask).to(COMPUTE)
        a_z = acc_z + tl.load(gx + H * gx_sc, mask=mask).to(COMPUTE)
        x_n = tl.load(gx + 2 * H * gx_sc, mask=mask).to(COMPUTE)
    h_n = acc_n
    if HAS_BIAS:
        a_r += _bias_pair(b_ih_ptr, b_hh_ptr, 0, H, co, co_mask, COMPUTE)
        a_z += _bias_pair(b_ih_ptr, b_hh_ptr, 1, H, co, co_mask, COMPUTE)
        x_n += tl.load(b_ih_ptr + 2 * H + co, mask=co_mask, other=0.0).to(COMPUTE)[None, :]
        h_n += tl.load(b_hh_ptr + 2 * H + co, mask=co_mask, other=0.0).to(COMPUTE)[None, :]
    r = _sigmoid(a_r)
    z = _sigmoid(a_z)
    cand = _tanh(x_n + r * h_n)
    # The state at the tile's own pixels and channels: the convolution's input.
    h = tl.load(_at(x_ptr, n64, y, x, co, x_sn, x_sc, x_sy, x_sx), mask=mask).to(COMPUTE)
    h_new = h + z * (cand - h)
    tl.store(_at(h_new_ptr, n64, y, x, co, o_sn, o_sc, o_sy, o_sx), h_new.to(h_new_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        gt = _at(gates_ptr, n64, y, x, co, g_sn, g_sc, g_sy, g_sx)
        ty = gates_ptr.dtype.element_ty
        tl.store(gt, r.to(ty), mask=mask)
        tl.store(gt + H * g_sc, z.to(ty), mask=mask)
        tl.store(gt + 2 * H * g_sc, cand.to(ty), mask=mask)
        tl.store(_at(aux_ptr, n64, y, x, co, a_sn, a_sc, a_sy, a_sx), h_n.to(aux_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------

# Tiles: ``_tuning.tile_config`` (a tuning file's ``fused_tiles``, else ``_tuning.default_tile``).

#: Each kernel's name in the tuning registry (``fused_tiles``), by its Triton function.
_REGISTRY_NAMES = {"_conv_rz_fwd_kernel": "conv_rz_fwd", "_conv_n_fwd_kernel": "conv_n_fwd",
                   "_conv_reset_after_fwd_kernel": "conv_reset_after_fwd"}


def _blocks(hidden: int, channels: int, tile: "_tuning.TileConfig") -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_K): hidden channels per program and input channels per
    reduction step, the tile's (default: up to 32 and up to 64, 32 in float32)
    capped at the next power of two of the channels, at least 16 (tl.dot's
    smallest). BLOCK_N 64 with up to three float32 accumulators took 239-255
    registers per thread and spilled at sm_90 (bfloat16, RAFT's hidden 128 on
    46x62, Triton 3.9); 32 compiles to 72-168 with no spills."""
    block_n = max(16, min(tile.block_n, triton.next_power_of_2(hidden)))
    block_k = max(16, min(tile.block_k, triton.next_power_of_2(channels)))
    return block_n, block_k


# (settings generation, direction, reset_after, spec, device, dtype, shape, strides) -> whether the fused path runs
_DECISIONS: dict = {}


def use_fused(direction: str, reset_after: bool, spec: ConvSpec, h: Tensor) -> bool:
    """Whether a step in ``direction`` (``"fwd"`` or ``"bwd"``) on the state
    ``h`` (N, H, Y, X) runs the fused kernels, per the ``fused_step`` setting
    (``CONVGRU_TRITON_FUSED_STEP``):
    ``1`` yes where :func:`supports` holds; ``0`` no; ``auto`` (or unset) as the
    tuning registry says for this GPU, dtype, formulation, direction, kernel
    size and state size (``step_paths``; without an entry cuDNN + the gate
    kernels, the path the committed GPU figures measured: no figure of the
    fused step exists yet). :func:`forward_step` (and the fused backward)
    consult it and decline when it is False. Cached per (settings generation,
    direction, formulation, spec, device, dtype, shape, strides): after the
    first call a dict look-up. Raises ValueError on a bad
    ``CONVGRU_TRITON_FUSED_STEP`` or ``direction``."""
    # _settings.generation moves when a setting changes and when a tuning file
    # may have changed (clear_cache, forced_step_path).
    key = (_settings.generation, direction, reset_after, spec, h.device, h.dtype, tuple(h.shape), h.stride())
    decision = _DECISIONS.get(key)
    if decision is None:
        if direction not in _tuning.DIRECTIONS:
            raise ValueError(f"direction must be one of {_tuning.DIRECTIONS}, got {direction!r}")
        m = mode()
        if m == "0" or h.dim() != 4 or not supports(spec, h.dtype, h.device):
            decision = False
        elif m == "1":
            decision = True
        else:
            decision = _tuning.step_path(h.device, h.dtype, reset_after, direction, spec.kernel_size,
                                         h.numel()) == "fused"
        if len(_DECISIONS) > 4096:  # many shapes (a sweep): start over rather than grow without bound
            _DECISIONS.clear()
        _DECISIONS[key] = decision
    return decision


def clear_decisions() -> None:
    """Forget :func:`use_fused`'s cached decisions (after a tuning file changed)."""
    _DECISIONS.clear()


def _within_sample_32bit(t: Tensor) -> bool:
    """Every offset within one sample of ``t`` fits 32 bits (the kernels'
    assumption; the sample offset itself is 64-bit)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:])) < 2**31


def _strides(t: Tensor) -> Tuple[int, ...]:
    # A dim of size 1 may carry any stride: 0 keeps the index math exact whatever it is.
    return tuple(s if n > 1 else 0 for n, s in zip(t.shape, t.stride()))


def _constexprs(spec: ConvSpec, dtype: torch.dtype, channels: int, has_bias: bool, block_n: int,
                block_k: int, tile: "_tuning.TileConfig") -> dict:
    (pad_y, _), (pad_x, _) = spec.pad_per_dim
    return dict(
        C=channels, KH=spec.kernel_size[0], KW=spec.kernel_size[1], DIL_Y=spec.dilation[0], DIL_X=spec.dilation[1],
        PAD_Y=pad_y, PAD_X=pad_x, HAS_BIAS=has_bias, BLOCK_M=tile.block_m, BLOCK_N=block_n,
        BLOCK_K=block_k,
        # IEEE float32 products (not TF32): the results match the reference.
        PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )


def _pixel_tiles(t: Tensor, block_m: int) -> Tuple[int, int]:
    """``(BLOCK_X, tiles)``: how the BLOCK_M-pixel tiles of ``t`` (N, C, Y, X)
    are cut (see :func:`_pixels`): BLOCK_X 0, consecutive pixels, where the
    channels are the contiguous axis (channels_last); else patches of whole
    column runs, BLOCK_X columns wide."""
    batch, channels, height, width = t.shape
    if t.stride(1) == 1 and channels > 1:
        return 0, triton.cdiv(batch * height * width, block_m)
    block_x = max(8, min(block_m, triton.next_power_of_2(width)))
    return block_x, batch * triton.cdiv(height, block_m // block_x) * triton.cdiv(width, block_x)


def _launch(kernel, spec: ConvSpec, h: Tensor, has_bias: bool, args: tuple,
            inputs: Optional[Tuple[Tensor, Tensor]] = None, **extra) -> None:
    """Launch one fused kernel over the state ``h``'s pixels with the tile the
    registry gives it (``_tuning.tile_config``: a dict look-up after the first).
    ``inputs``: ``(x, W_ih)`` ((N, C_in, Y, X), (3H, C_in, kh, kw)) for the
    one-step cell's input convolution inside the kernel (HAS_X), else ``None``:
    the kernel's x arguments are then ``None`` (constexpr), which compiles to
    the kernel without them."""
    batch, hidden, height, width = h.shape
    dtype = h.dtype
    tile = _tuning.tile_config(_REGISTRY_NAMES[kernel.__name__], dtype, h.numel(), h.device)
    block_n, block_k = _blocks(hidden, hidden, tile)
    m = batch * height * width
    block_x, tiles = _pixel_tiles(h, tile.block_m)
    grid = (tiles, triton.cdiv(hidden, block_n))
    kw = _constexprs(spec, dtype, hidden, has_bias, block_n, block_k, tile)
    kw["BLOCK_X"] = block_x
    if inputs is None:
        x_args, x_strides = (None, None), (None,) * 8
    else:
        x, w_ih = inputs
        x_args, x_strides = (x, w_ih), _strides(x) + _strides(w_ih)
        kw.update(HAS_X=True, C_IN=x.shape[1], BLOCK_KI=_blocks(hidden, x.shape[1], tile)[1])
    positional = (*args[:8], *x_args, m, height * width, height, width, hidden, *args[8:], *x_strides)
    kw.update(extra)
    _run(kernel, grid, positional, kw)


def _run(kernel, grid: tuple, positional: tuple, kw: dict) -> None:
    """``kernel[grid](*positional, **kw)``, the compiled kernel handed to
    :data:`_COMPILED` and the launch to :data:`_RECORD` where they are set."""
    compiled = kernel[grid](*positional, **kw)
    if _COMPILED is not None:  # the tuner reads n_regs/n_spills of what ran
        _COMPILED.append(compiled)
    if _RECORD is not None:  # a cell plan binding its launches (convgru_triton._plan)
        _RECORD.append((kernel, grid, positional, kw, compiled))


#: ``None``, or a list the launcher appends each launch's compiled kernel to
#: (``python -m convgru_triton.tune --fused-step`` drops tiles that spill).
_COMPILED: Optional[list] = None

#: ``None``, or a list the launchers append ``(kernel, grid, positional
#: arguments, keyword arguments, compiled kernel)`` of each launch to: a cell
#: plan records its first step's launches and replays them after.
_RECORD: Optional[list] = None


def forward_step(reset_after: bool, spec: ConvSpec, gx: Optional[Tensor], h: Tensor, weights: Sequence[Tensor],
                 bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], state: Tensor, gates: Optional[Tensor],
                 aux: Optional[Tensor], save: bool, x: Optional[Tensor] = None,
                 weight_ih: Optional[Tensor] = None) -> bool:
    """One fused forward step into the operator's buffers, the contract of
    ``conv_gru._step_forward``: ``gx`` (N, 3H, Y, X), ``h`` (N, H, Y, X),
    ``weights`` ``(W_h,)`` (3H, H, kh, kw) with ``reset_after``, else ``(W_hrz,
    W_hn)`` ((2H, H, kh, kw), (H, H, kh, kw)); biases (3H,) or ``None``.
    Writes h' into ``state``; ``gates`` (N, 3H, Y, X) and ``aux`` (N, H, Y, X)
    receive (r, z, n) and aux as the gate kernels write them (with
    ``reset_after`` and not ``save`` they are ``None``; without ``reset_after``
    they are needed within the step: scratch when not ``save``, and n is then
    not stored). All tensors of one dtype, any strides. Tiles (BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages) come from the tuning registry
    (``_tuning.tile_config``; default ``_tuning.default_tile``).

    Returns ``False``, having written nothing, where these kernels do not
    apply or are not chosen (:func:`use_fused` with ``"fwd"``: the mode,
    :func:`supports`, the registry's decision; mixed dtypes, a sample too
    large for 32-bit offsets): the caller then runs cuDNN + the gate kernels.

    The one-step cell (:func:`convgru_triton.functional.conv_gru_cell`) passes
    its input ``x`` (N, C_in, Y, X) and ``weight_ih`` (3H, C_in, kh, kw; the
    spec's kernel size) instead of ``gx`` (then ``None``): the input
    convolution runs inside the same kernels, into the gates' accumulators,
    and gx is never made. Declines as above, and also for an ``x`` or
    ``weight_ih`` of another shape, dtype or device."""
    if h.dim() != 4 or not use_fused("fwd", reset_after, spec, h):
        return False
    dtype = h.dtype
    if x is None:
        first = [gx]
    elif (x.dim() != 4 or weight_ih is None or x.shape[0] != h.shape[0] or x.shape[2:] != h.shape[2:]
          or tuple(weight_ih.shape) != (3 * h.shape[1], x.shape[1], *spec.kernel_size)):
        return False
    else:
        first = [x, weight_ih]
    others = first + [state, *weights] + [t for t in (gates, aux, bias_ih, bias_hh) if t is not None]
    if any(t.dtype != dtype or t.device != h.device for t in others):
        return False
    if not all(_within_sample_32bit(t) for t in [first[0], h, state] + ([gates, aux] if gates is not None else [])):
        return False
    if h.numel() == 0:
        return True
    has_bias = bias_ih is not None
    # Dense (3H,) vectors, as the kernels index them; without biases any pointer stands in (never read).
    b_ih, b_hh = (bias_ih.contiguous(), bias_hh.contiguous()) if has_bias else (h, h)
    # With the cell's input the kernels never read gx: None (constexpr) for it and its strides.
    inputs, gx_strides = (None, _strides(gx)) if x is None else ((x, weight_ih), (None,) * 4)
    if reset_after:
        w = weights[0]
        if gates is None:  # nothing saved: h' stands in for the pointers of gates and aux (SAVE=False)
            gates_t, aux_t = state, state
        else:
            gates_t, aux_t = gates, aux
        _launch(_conv_reset_after_fwd_kernel, spec, h, has_bias, (
            h, w, gx, state, gates_t, aux_t, b_ih, b_hh,
            *_strides(h), *_strides(w), *gx_strides, *_strides(state), *_strides(gates_t), *_strides(aux_t)),
            inputs, SAVE=gates is not None)
        return True
    w_rz, w_n = weights
    _launch(_conv_rz_fwd_kernel, spec, h, has_bias, (
        h, w_rz, gx, h, gates, aux, b_ih, b_hh,
        *_strides(h), *_strides(w_rz), *gx_strides, *_strides(h), *_strides(gates), *_strides(aux)), inputs)
    _launch(_conv_n_fwd_kernel, spec, h, has_bias, (
        aux, w_n, gx, h, gates, state, b_ih, b_hh,
        *_strides(aux), *_strides(w_n), *gx_strides, *_strides(h), *_strides(gates), *_strides(state)),
        inputs, SAVE=save)
    return True


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------
#
# The data gradient (dgrad) of a stride-1 'same' convolution y = W * x is a
# 'same'-style correlation of dy with W transposed (in/out channels swapped)
# and flipped (tap ky -> KH - 1 - ky), padded on the mirrored side: the left/top
# pad becomes d (k - 1) - pad_left, which is the forward's right/bottom pad
# (equal for odd k). The kernels below run that correlation as the forward's
# implicit GEMM (the same _pixels/_tap/_state_tile/_weight_tile, the weight read
# through its own strides at the flipped tap: no weight copy) with the step's
# gate backward in the epilogue:
#
#   reset_after=False  update_bwd (gate kernel, elementwise: d_az, d_an, d_h = g (1 - z))
#                      _conv_dgrad_reset_gate_bwd_kernel: acc = dgrad(d_n, W_hn) = dL/d(r h);
#                          d_gx[:, :H] = acc h r (1 - r); d_h += acc r
#                      _conv_dgrad_bwd_kernel: d_h += dgrad(d_rz, W_hrz)     (reads d_ar at neighbours)
#   reset_after=True   reset_after_bwd (gate kernel, elementwise: d_gx, d_gh, d_h)
#                      _conv_dgrad_bwd_kernel: d_h += dgrad(d_gh, W_h)
#
# replacing, per step, cuDNN's dgrad + reset_gate_bwd (and the d_rh round trip
# through memory) and cuDNN's dgrad + d_h.add_ (the d_h_conv round trip). The
# elementwise first kernel stays: its outputs are read at neighbouring pixels.
# Counted, not measured (one (N, H, Y, X) plane = P; compulsory traffic, weights
# and halo re-reads aside): reset_after=False moves 10 P instead of 14 P in 2
# launches instead of 4 (cuDNN's NCHW<->NHWC transposes aside), reset_after=True
# 5 P instead of 7 P in 1 launch instead of 2. RAFT's shape (N=6, 46x62, H=128,
# bfloat16: P = 4.38 MB): 17.5 MB and 2 launches less per ConvGRU step, twice
# that per SepConvGRU step.
# The sequence operator's weight gradients (wgrad) stay on cuDNN (one batched
# call over all T in conv_gru._backward). A cell stepped by its plan pays a
# host call per convolution backward at every step (three per cell update,
# ~15 us each on the CI machine's host proxy: bench/host_overhead), so its
# fused backward takes them from _conv_wgrad_kernel, launched bound like the
# others. Counted, not measured: at RAFT-large's half step (N=6, 46x62,
# W_ih 384x256 and W_hh 384x128, 1x5, bfloat16) the wgrad is 25.2 GFLOP, a
# floor of 36 us at ~700 TFLOP/s, against 31 MB of compulsory reads (7 us at
# 4.2 TB/s); the kernel re-reads dy once per tap and input-channel block
# (through L2) and is not split over pixels: its programs are row tiles x taps x
# channel blocks (270 for W_ih there, 246 with work), each walking all 17,112 pixels.


@triton.jit
def _dgrad_acc(dy_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, Y, X,
               dy_sn, dy_sc, dy_sy, dy_sx, w_so, w_si, w_sy, w_sx,
               C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
               PAD_Y: tl.constexpr, PAD_X: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, COMPUTE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) dgrad tile: ``sum_{o, ky, kx} W[o, co, KH-1-ky, KW-1-kx] *
    dy[o, y + ky d - PAD_Y, x + kx d - PAD_X]`` over the C = ``o`` channels of
    ``dy`` (PAD_* the mirrored pads). ``w_so``/``w_si``: W's strides along its
    dim 0 (``o``, the reduction here) and dim 1 (``co``, the output here)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    # One flat loop over (tap, channel block), as the forward kernels.
    for kk in range(KH * KW * tl.cdiv(C, BLOCK_K)):
        ky, kx, iy, ix, valid, ci = _tap(kk, y, x, m_mask, Y, X, C, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_K)
        a = _state_tile(dy_ptr, n64, iy, ix, valid, ci, C, dy_sn, dy_sc, dy_sy, dy_sx)
        # Transposed: rows the reduction channels o (W's dim 0), columns the
        # output channels (W's dim 1); flipped: tap (KH-1-ky, KW-1-kx).
        b = _weight_tile(w_ptr, co, co_mask, ci, C, KH - 1 - ky, KW - 1 - kx, w_si, w_so, w_sy, w_sx)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=COMPUTE)
    return acc


@triton.jit
def _conv_dgrad_reset_gate_bwd_kernel(
    dy_ptr, w_ptr, gates_ptr, h_ptr, d_gx_ptr, d_h_ptr,
    M, HW, Y, X, H,
    dy_sn, dy_sc, dy_sy, dy_sx,
    w_so, w_si, w_sy, w_sx,
    g_sn, g_sc, g_sy, g_sx,
    h_sn, h_sc, h_sy, h_sx,
    dg_sn, dg_sc, dg_sy, dg_sx,
    dh_sn, dh_sc, dh_sy, dh_sx,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
    PAD_Y: tl.constexpr, PAD_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr,
):
    """d_rh = dgrad(d_n, W_hn) (= dL/d(r * h)); d_gx[:, :H] = d_rh h r (1 - r); d_h += d_rh r
    (= :func:`~..gates.naive.gru_reset_gate_bwd_ref`). ``dy`` is d_n = d_gx[:, 2H:] (C = H
    channels), ``w`` W_hn (H, H, KH, KW); r is read from ``gates``."""
    n64, y, x, m_mask = _pixels(M, HW, Y, X, BLOCK_M, BLOCK_X)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < H
    d_rh = _dgrad_acc(dy_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, Y, X, dy_sn, dy_sc, dy_sy, dy_sx,
                      w_so, w_si, w_sy, w_sx, C, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_M, BLOCK_N, BLOCK_K,
                      PRECISION, COMPUTE)
    mask = m_mask[:, None] & co_mask[None, :]
    r = tl.load(_at(gates_ptr, n64, y, x, co, g_sn, g_sc, g_sy, g_sx), mask=mask).to(COMPUTE)
    h = tl.load(_at(h_ptr, n64, y, x, co, h_sn, h_sc, h_sy, h_sx), mask=mask).to(COMPUTE)
    dh = _at(d_h_ptr, n64, y, x, co, dh_sn, dh_sc, dh_sy, dh_sx)
    d_h = tl.load(dh, mask=mask).to(COMPUTE)
    tl.store(dh, (d_h + d_rh * r).to(d_h_ptr.dtype.element_ty), mask=mask)
    tl.store(_at(d_gx_ptr, n64, y, x, co, dg_sn, dg_sc, dg_sy, dg_sx),
             (d_rh * h * r * (1.0 - r)).to(d_gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_dgrad_bwd_kernel(
    dy_ptr, w_ptr, d_h_ptr,
    M, HW, Y, X, H,
    dy_sn, dy_sc, dy_sy, dy_sx,
    w_so, w_si, w_sy, w_sx,
    dh_sn, dh_sc, dh_sy, dh_sx,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
    PAD_Y: tl.constexpr, PAD_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr, ACCUMULATE: tl.constexpr = True,
):
    """d_h += dgrad(dy, W) over the C channels of ``dy``: d_rz = d_gx[:, :2H] with
    W_hrz (2H, H, KH, KW), or d_gh (3H) with W_h (3H, H, KH, KW) (reset_after);
    for the one-step cell's input, d_x (+)= dgrad(d_gx, W_ih) (H = C_in here).
    ``ACCUMULATE=False`` writes the result without reading the output first."""
    n64, y, x, m_mask = _pixels(M, HW, Y, X, BLOCK_M, BLOCK_X)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = co < H
    acc = _dgrad_acc(dy_ptr, w_ptr, n64, y, x, m_mask, co, co_mask, Y, X, dy_sn, dy_sc, dy_sy, dy_sx,
                     w_so, w_si, w_sy, w_sx, C, KH, KW, DIL_Y, DIL_X, PAD_Y, PAD_X, BLOCK_M, BLOCK_N, BLOCK_K,
                     PRECISION, COMPUTE)
    mask = m_mask[:, None] & co_mask[None, :]
    dh = _at(d_h_ptr, n64, y, x, co, dh_sn, dh_sc, dh_sy, dh_sx)
    if ACCUMULATE:
        acc += tl.load(dh, mask=mask).to(COMPUTE)
    tl.store(dh, acc.to(d_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr, src_ptr, src2_ptr, dw_ptr, db_ptr,
    N, P, HW, X, Y, O, SPLIT,
    dy_sn, dy_sc, dy_sy, dy_sx,
    s_sn, s_sc, s_sy, s_sx,
    s2_sn, s2_sc, s2_sy, s2_sx,
    dw_so, dw_si, dw_sy, dw_sx,
    C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DIL_Y: tl.constexpr, DIL_X: tl.constexpr,
    PAD_Y: tl.constexpr, PAD_X: tl.constexpr, HAS_BIAS: tl.constexpr, TWO_SOURCES: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE: tl.constexpr,
):
    """The weight gradient (wgrad) of a stride-1 'same' convolution ``y = W * s``:
    ``dW[o, c, ky, kx] = sum_{n, y, x} dy[n, o, y, x] * s[n, c, y + ky d - PAD_Y, x + kx d - PAD_X]``
    (zero outside the map), and with ``HAS_BIAS`` ``db[o] = sum_{n, y, x} dy[n, o, y, x]``.
    A GEMM per tap: rows the O output channels, columns the C input channels,
    reduction the P = N * Y * X pixels, walked BLOCK_P at a time by every
    program, whole: no split over pixels, so no atomics and the same sums in
    the same order at every run. ``TWO_SOURCES``: rows ``o >= SPLIT`` read
    ``src2`` instead (the candidate rows W_hn, whose input is r * h, beside
    W_hrz's h: one launch for the whole W_hh); row tiles do not straddle
    SPLIT. Grid: (row tiles x taps, cdiv(C + HAS_BIAS, BLOCK_C)). The pixels are walked as
    :func:`_pixels` tiles them: ``BLOCK_X == 0`` BLOCK_P consecutive pixels of
    the flattened (N, Y, X) grid (channels_last), else (BLOCK_P / BLOCK_X) x
    BLOCK_X patches of one sample, whose columns are visibly contiguous to the
    compiler (NCHW: at sm_90, bfloat16, RAFT's x, 232 registers per thread
    with flat pixels, 136-144 with patches; Triton 3.9, docs/codegen.md)."""
    pid = tl.program_id(0)
    tap = pid % (KH * KW)
    tile = pid // (KH * KW)
    ky = tap // KW
    kx = tap - ky * KW
    first_tiles = tl.cdiv(SPLIT, BLOCK_O)
    o_start = tile * BLOCK_O
    o_end = SPLIT
    src, sn, sc, sy, sx = src_ptr, s_sn, s_sc, s_sy, s_sx
    if TWO_SOURCES:
        if tile >= first_tiles:
            o_start = SPLIT + (tile - first_tiles) * BLOCK_O
            o_end = O
            src, sn, sc, sy, sx = src2_ptr, s2_sn, s2_sc, s2_sy, s2_sx
    o = o_start + tl.arange(0, BLOCK_O)
    o_mask = o < o_end
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    # With HAS_BIAS, column C is a channel of ones at every pixel (not shifted
    # by the tap): the product sums dy over the pixels into it, the bias
    # gradient on the tensor cores instead of a reduction per step.
    ones = (c == C)[None, :] if HAS_BIAS else None
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=COMPUTE)
    i = tl.arange(0, BLOCK_P)
    if BLOCK_X == 0:
        steps = tl.cdiv(P, BLOCK_P)
    else:
        BLOCK_Y: tl.constexpr = BLOCK_P // BLOCK_X
        tiles_x = tl.cdiv(X, BLOCK_X)
        per_sample = tl.cdiv(Y, BLOCK_Y) * tiles_x
        steps = N * per_sample
    if HAS_BIAS:
        if (tl.program_id(1) * BLOCK_C >= C) & (tap != 0):
            steps = 0  # a block of the ones column alone: only the first tap's is stored
    for kk in range(steps):
        if BLOCK_X == 0:
            p = kk * BLOCK_P + i
            p_mask = p < P
            n = p // HW
            rest = p - n * HW
            y = rest // X
            x = rest - y * X
        else:
            n = kk // per_sample
            rest = kk - n * per_sample
            tile_y = rest // tiles_x
            y = tile_y * BLOCK_Y + i // BLOCK_X
            x = (rest - tile_y * tiles_x) * BLOCK_X + i % BLOCK_X
            p_mask = (y < Y) & (x < X)
        n64 = n.to(tl.int64)
        a = tl.load(dy_ptr + (n64 * dy_sn + (y * dy_sy + x * dy_sx))[None, :] + (o * dy_sc)[:, None],
                    mask=o_mask[:, None] & p_mask[None, :], other=0.0)
        iy = y + (ky * DIL_Y - PAD_Y)
        ix = x + (kx * DIL_X - PAD_X)
        valid = p_mask & (iy >= 0) & (iy < Y) & (ix >= 0) & (ix < X)
        b = tl.load(src + (n64 * sn + (iy * sy + ix * sx))[:, None] + (c * sc)[None, :],
                    mask=valid[:, None] & c_mask[None, :], other=0.0)
        if HAS_BIAS:
            b = tl.where(ones, p_mask[:, None].to(b.dtype), b)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=COMPUTE)
    tl.store(dw_ptr + (ky * dw_sy + kx * dw_sx) + (o * dw_so)[:, None] + (c * dw_si)[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=o_mask[:, None] & c_mask[None, :])
    if HAS_BIAS:
        if tap == 0:  # column C of the first tap's programs (every tap's holds the same sum)
            tl.store(db_ptr + o[:, None] + 0 * c[None, :], acc.to(db_ptr.dtype.element_ty),
                     mask=o_mask[:, None] & ones)


#: Each backward kernel's name in the tuning registry (``fused_tiles``).
_BWD_REGISTRY_NAMES = {"_conv_dgrad_reset_gate_bwd_kernel": "conv_dgrad_reset_gate_bwd",
                       "_conv_dgrad_bwd_kernel": "conv_dgrad_bwd", "_conv_wgrad_kernel": "conv_wgrad"}


def _launch_dgrad(kernel, spec: ConvSpec, d_h: Tensor, channels: int, pointers: tuple, strides: tuple,
                  **extra) -> None:
    """Launch one dgrad kernel over the pixels and channels of ``d_h`` (N, H, Y,
    X), reducing over ``channels`` (C) channels of the output gradient and the
    kernel's taps, with the mirrored 'same' pads; ``pointers`` and ``strides``
    are the kernel's tensor and stride arguments, in its order; ``extra``: more
    of its constexprs (``ACCUMULATE``)."""
    batch, hidden, height, width = d_h.shape
    dtype = d_h.dtype
    # The registry's tile (``_tuning.tile_config``; one float32 accumulator: 4 warps by default).
    tile = _tuning.tile_config(_BWD_REGISTRY_NAMES[kernel.__name__], dtype, d_h.numel(), d_h.device)
    block_n, block_k = _blocks(hidden, channels, tile)
    m = batch * height * width
    block_x, tiles = _pixel_tiles(d_h, tile.block_m)
    (_, pad_bottom), (_, pad_right) = spec.pad_per_dim
    grid = (tiles, triton.cdiv(hidden, block_n))
    positional = (*pointers, m, height * width, height, width, hidden, *strides)
    kw = dict(
        C=channels, KH=spec.kernel_size[0], KW=spec.kernel_size[1], DIL_Y=spec.dilation[0],
        DIL_X=spec.dilation[1], PAD_Y=pad_bottom, PAD_X=pad_right,
        BLOCK_M=tile.block_m, BLOCK_X=block_x, BLOCK_N=block_n, BLOCK_K=block_k,
        # IEEE float32 products (not TF32), as the forward: results match the reference.
        PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages, **extra)
    _run(kernel, grid, positional, kw)


def _launch_wgrad(spec: ConvSpec, dy: Tensor, src: Tensor, d_w: Tensor, d_b: Optional[Tensor],
                  src2: Optional[Tensor] = None, split: Optional[int] = None) -> None:
    """Launch :func:`_conv_wgrad_kernel`: ``d_w`` (O, C, kh, kw) = the weight
    gradient of the 'same' convolution of ``src`` (N, C, Y, X) whose output
    gradient is ``dy`` (N, O, Y, X), and ``d_b`` (O,) = ``dy`` summed over
    batch and space (``None``: no bias), a dense vector. With ``src2``, rows
    ``split:`` of ``d_w`` come from ``src2`` (N, C, Y, X) instead. One dtype
    for all; any strides otherwise. Tiles from the registry (``conv_wgrad``,
    looked up by ``dy``'s element count): rows BLOCK_M, columns BLOCK_N,
    pixels per reduction step BLOCK_K.

    Raises:
        ValueError: ``src2`` without ``split`` or the other way round."""
    batch, rows, height, width = dy.shape
    channels = src.shape[1]
    dtype = dy.dtype
    tile = _tuning.tile_config("conv_wgrad", dtype, dy.numel(), dy.device)
    block_o = max(16, min(tile.block_m, triton.next_power_of_2(rows)))
    block_c, _ = _blocks(channels, channels, tile)
    block_p = max(16, min(tile.block_k, triton.next_power_of_2(batch * height * width)))
    two = src2 is not None
    if two != (split is not None):
        raise ValueError(f"src2 and split come together: got src2 {'a tensor' if two else None}, split {split!r}")
    split = split if two else rows
    row_tiles = triton.cdiv(split, block_o) + (triton.cdiv(rows - split, block_o) if two else 0)
    kh, kw_ = spec.kernel_size
    block_x = _pixel_tiles(dy, block_p)[0]  # the pixel blocks the reduction walks
    # With a bias, one column more: the channel of ones (see the kernel).
    grid = (row_tiles * kh * kw_, triton.cdiv(channels + (d_b is not None), block_c))
    (pad_y, _), (pad_x, _) = spec.pad_per_dim
    # Without a bias or a second source any tensor stands in for their pointers (never read).
    positional = (dy, src, src2 if two else src, d_w, d_w if d_b is None else d_b,
                  batch, batch * height * width, height * width, width, height, rows, split,
                  *_strides(dy), *_strides(src), *_strides(src2 if two else src), *_strides(d_w))
    kw = dict(
        C=channels, KH=kh, KW=kw_, DIL_Y=spec.dilation[0], DIL_X=spec.dilation[1], PAD_Y=pad_y, PAD_X=pad_x,
        HAS_BIAS=d_b is not None, TWO_SOURCES=two, BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_P=block_p,
        BLOCK_X=block_x,
        # IEEE float32 products (not TF32), as the other kernels: results match the reference.
        PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    _run(_conv_wgrad_kernel, grid, positional, kw)


def backward_step(reset_after: bool, spec: ConvSpec, math, grad: Tensor, grad2: Optional[Tensor], h: Tensor,
                  weights: Sequence[Tensor], gates: Tensor, aux: Tensor, d_gx: Tensor, d_gh: Optional[Tensor],
                  d_h: Tensor) -> bool:
    """One backward step's data gradients into the operator's buffers, the
    contract of ``conv_gru._step_backward`` without the weight gradients:
    from dL/dh' = ``grad`` + ``grad2`` (``grad2`` may be ``None``), the saved
    ``gates`` (N, 3H, Y, X) = (r, z, n) and ``aux`` (N, H, Y, X) and the step's
    input state ``h`` (N, H, Y, X), writes ``d_gx`` (N, 3H, Y, X), ``d_gh``
    (N, 3H, Y, X; ``reset_after`` only, else ``None``) and ``d_h`` (N, H, Y, X)
    = dL/dh. ``weights``: ``(W_h,)`` (3H, H, kh, kw) with ``reset_after``, else
    ``(W_hrz, W_hn)``. ``math``: the bound gate math of the call (its
    elementwise first kernel, update_bwd or reset_after_bwd, runs here). All
    tensors of one dtype, any strides.

    Returns ``False``, having written nothing, where these kernels do not apply
    or are not chosen (:func:`use_fused` with ``"bwd"``: the mode,
    :func:`supports`, the registry; mixed dtypes or devices, a sample too large
    for 32-bit offsets): the caller then runs cuDNN + the gate kernels."""
    if h.dim() != 4 or not use_fused("bwd", reset_after, spec, h):
        return False
    dtype, device = h.dtype, h.device
    others = [grad, gates, aux, d_gx, d_h, *weights] + [t for t in (grad2, d_gh) if t is not None]
    if any(t.dtype != dtype or t.device != device for t in others):
        return False
    if not all(_within_sample_32bit(t) for t in [h, gates, d_gx, d_h] + ([d_gh] if reset_after else [])):
        return False
    hidden = h.shape[1]
    if reset_after:
        math.reset_after_bwd(grad, grad2, gates, aux, h, d_gx=d_gx, d_gh=d_gh, d_h=d_h)
        if h.numel():
            w = weights[0]
            _launch_dgrad(_conv_dgrad_bwd_kernel, spec, d_h, 3 * hidden, (d_gh, w, d_h),
                          (*_strides(d_gh), *_strides(w), *_strides(d_h)))
        return True
    math.update_bwd(grad, grad2, gates, h, d_gx, d_h=d_h)
    if not h.numel():
        return True
    w_rz, w_n = weights
    d_rz, d_n = d_gx.split_with_sizes((2 * hidden, hidden), 1)
    _launch_dgrad(_conv_dgrad_reset_gate_bwd_kernel, spec, d_h, hidden, (d_n, w_n, gates, h, d_gx, d_h),
                  (*_strides(d_n), *_strides(w_n), *_strides(gates), *_strides(h), *_strides(d_gx), *_strides(d_h)))
    # After the first: it reads d_ar, which the first wrote, at neighbouring pixels.
    _launch_dgrad(_conv_dgrad_bwd_kernel, spec, d_h, 2 * hidden, (d_rz, w_rz, d_h),
                  (*_strides(d_rz), *_strides(w_rz), *_strides(d_h)))
    return True
