"""Fused ConvGRU step: the Triton gate kernels and their launchers.

One step of a ConvGRU is two kinds of work: convolutions (left to cuDNN via
:mod:`torch.nn.functional`) and elementwise gate math (bias add, sigmoid, tanh,
the reset product and the interpolation of the new state), fused here into one
Triton kernel per phase. Each kernel's reference is the ``*_ref`` function of the
same name in :mod:`convgru_triton.ops.gates.naive`; the operator that runs them step
after step, with autograd, is :mod:`convgru_triton.ops.sequence.op`.

Kernels (``_fwd_kernel``/``_bwd_kernel`` pairs) and what each reads and writes,
per element of the (N, H, *S) state (``gx``/``gh`` are pre-activations, gate order
(r, z, n), ``g`` the gradient flowing into ``h'``):

``reset_after=True`` (one hidden convolution ``gh = W_h * h`` with 3H outputs):
    * ``_gru_reset_after_fwd_kernel``: gx, gh, h -> h', gates ``(r, z, n)``, aux ``gh_n + b_hn``.
    * ``_gru_reset_after_bwd_kernel``: g, gates, aux, h -> d gx, d gh, the direct part of d h.

``reset_after=False`` (``gh_rz = W_hrz * h``, then ``gh_n = W_hn * (r * h)``):
    * ``_gru_reset_gate_fwd_kernel``: gx, gh_rz, h -> gates ``(r, z)``, aux ``r * h``.
    * ``_gru_update_fwd_kernel``: gx, gh_n, z, h -> h', gates ``n``.
    * ``_gru_update_bwd_kernel``: g, z, n, h -> d a_z, d a_n, the direct part of d h.
    * ``_gru_reset_gate_bwd_kernel``: d(r * h), r, h -> d a_r, adds ``d(r * h) * r`` to d h.

The backward kernels take two incoming gradients of ``h'`` (from the state passed
on and from the output at this step) and sum them in registers.

Memory access (why the kernels look the way they do)
----------------------------------------------------
A launch works on tensors that are dense per sample in one layout, contiguous
(N, C, *S) or channels_last, with C = H, 2H or 3H channels. Each sample is a
matrix of ``rows`` x ``inner`` elements whose ``inner`` axis is the one that is
contiguous in memory: spatial for contiguous tensors (rows = channels), channels
for channels_last (rows = pixels). A program handles a ``BLOCK_R x BLOCK_I`` tile
of that matrix, ``inner`` being an explicit ``tl.arange`` axis, so the compiler
sees runs of consecutive addresses. The launcher passes ``inner`` divided by
``ALIGN``, the largest power of two (up to one 16-byte vector) dividing every
inner extent, row stride and base offset, and the kernel multiplies it back:
the compiler then knows each row starts on an ``ALIGN``-element boundary and
emits ``ALIGN``-wide vector accesses: 16 bytes when the contiguous extent is a
multiple of 8 half-precision (4 float32) elements, 8 bytes for RAFT's 46 x 62 =
2852 = 4 x 713 pixels. (The previous kernels walked a flat index split by a
division; at 46 x 62 every access compiled to a 2-byte scalar and the
reset-after forward kernel took 141 registers per thread, sm_90, Triton 3.9.)
All strides follow from (hidden, spatial) and the layout, except the sample
stride of ``gx``, which may come from a batch-major sequence: few kernel
arguments, which also keeps the launch cheap on the host. Biases are loaded
once per tile: one value per row (contiguous) or one vector over the channel
tile (channels_last). The sample offset is 64-bit, offsets within a sample are
32-bit (a sample holds fewer than 2**31 gate values, checked before launch).
Math is float32 (float64 for float64 tensors).
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ... import _settings, _tuning
from ..._layout import check_kernel_sample_size, empty_in_layout, is_channels_last

# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    # exp(-|x|) lies in (0, 1]: no overflow for any x, and full relative
    # precision for x << 0 where 1 / (1 + exp(-x)) would only round to 0.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _tanh(x):
    # exp(-2|x|) lies in (0, 1], so neither term overflows for any |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tile(rows, inner_a, ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
          CHANNELS_LAST: tl.constexpr):
    """This program's tile of one sample's ``rows x inner`` matrix.

    Returns ``(n, r, i, inner, mask, hidden, spatial, slot)``: the sample (int64,
    for the sample offset), row indices (BLOCK_R, 1), inner indices (1, BLOCK_I),
    the inner extent ``inner_a * ALIGN`` (a multiple of ALIGN the compiler can
    see), the mask, then the launch's (hidden, spatial) -- rows are channels and
    inner pixels (contiguous), or the other way round (channels_last) -- and the
    distance between two gates (r -> z -> n) of a gate tensor, in elements.
    The program id is split with scalar divisions, once per program."""
    inner = inner_a * ALIGN
    blocks_i = tl.cdiv(inner, BLOCK_I)
    per_sample = tl.cdiv(rows, BLOCK_R) * blocks_i
    pid = tl.program_id(0)
    n = pid // per_sample
    rest = pid - n * per_sample
    block_r = rest // blocks_i
    block_i = rest - block_r * blocks_i
    r = (block_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    i = (block_i * BLOCK_I + tl.arange(0, BLOCK_I))[None, :]
    mask = (r < rows) & (i < inner)
    if CHANNELS_LAST:
        hidden, spatial, slot = inner, rows, inner
    else:
        hidden, spatial, slot = rows, inner, rows * inner
    return n.to(tl.int64), r, i, inner, mask, hidden, spatial, slot


@triton.jit
def _at(ptr, n, r, i, channels, spatial, CHANNELS_LAST: tl.constexpr):
    """Pointers to the tile of sample ``n`` of a per-sample dense tensor with
    ``channels`` channels (its sample stride is ``channels * spatial``)."""
    base = ptr + n * (channels * spatial)
    if CHANNELS_LAST:
        return base + (r * channels + i)
    else:
        return base + (r * spatial + i)


@triton.jit
def _gx_at(gx_ptr, n, gx_sample_a, r, i, hidden, spatial, ALIGN: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Pointers to the tile of sample ``n`` of the input pre-activations (3H
    channels), whose sample stride ``gx_sample_a * ALIGN`` is passed in (it may
    be a frame of a batch-major sequence); the product is 64-bit (``n`` is)."""
    return _at(gx_ptr + (n * gx_sample_a) * ALIGN, 0, r, i, 3 * hidden, spatial, CHANNELS_LAST)


@triton.jit
def _bias(ptr, gate, hidden, r, i, rows, inner, CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr):
    """Bias of gate ``gate`` for the tile's channels, shaped to broadcast over the
    tile: one value per row (contiguous) or one vector over the channels."""
    if CHANNELS_LAST:
        return tl.load(ptr + gate * hidden + i + 0 * r, mask=(i < inner) & (r >= 0)).to(COMPUTE)
    else:
        return tl.load(ptr + gate * hidden + r, mask=r < rows).to(COMPUTE)


@triton.jit
def _rz_preactivations(gx, gh, slot, mask, bias_ih_ptr, bias_hh_ptr, hidden, r, i, rows, inner,
                       HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr):
    """``(a_r, a_z)`` of the tile: gx + gh + both biases for the r and z gates
    (gates ``slot`` elements apart in gx and gh alike)."""
    a_r = tl.load(gx, mask=mask).to(COMPUTE) + tl.load(gh, mask=mask).to(COMPUTE)
    a_z = tl.load(gx + slot, mask=mask).to(COMPUTE) + tl.load(gh + slot, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        a_r += (_bias(bias_ih_ptr, 0, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE)
                + _bias(bias_hh_ptr, 0, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE))
        a_z += (_bias(bias_ih_ptr, 1, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE)
                + _bias(bias_hh_ptr, 1, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE))
    return a_r, a_z


@triton.jit
def _gru_reset_after_fwd_kernel(
    gx_ptr, gh_ptr, h_ptr, h_new_ptr, gates_ptr, aux_ptr, bias_ih_ptr, bias_hh_ptr,
    gx_sample_a, rows, inner_a,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, COMPUTE: tl.constexpr,
):
    n, r, i, inner, mask, hidden, spatial, slot = _tile(rows, inner_a, ALIGN, BLOCK_R, BLOCK_I, CHANNELS_LAST)
    gx = _gx_at(gx_ptr, n, gx_sample_a, r, i, hidden, spatial, ALIGN, CHANNELS_LAST)
    gh = _at(gh_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)

    a_r, a_z = _rz_preactivations(gx, gh, slot, mask, bias_ih_ptr, bias_hh_ptr, hidden, r, i, rows, inner,
                                  HAS_BIAS, CHANNELS_LAST, COMPUTE)
    x_n = tl.load(gx + 2 * slot, mask=mask).to(COMPUTE)
    h_n = tl.load(gh + 2 * slot, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        x_n += _bias(bias_ih_ptr, 2, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE)
        h_n += _bias(bias_hh_ptr, 2, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE)
    h = tl.load(_at(h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)

    r_gate = _sigmoid(a_r)
    z = _sigmoid(a_z)
    cand = _tanh(x_n + r_gate * h_n)
    h_new = h + z * (cand - h)
    tl.store(_at(h_new_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), h_new.to(h_new_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        gt = _at(gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
        ty = gates_ptr.dtype.element_ty
        tl.store(gt, r_gate.to(ty), mask=mask)
        tl.store(gt + slot, z.to(ty), mask=mask)
        tl.store(gt + 2 * slot, cand.to(ty), mask=mask)
        tl.store(_at(aux_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), h_n.to(aux_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_reset_after_bwd_kernel(
    grad_ptr, grad2_ptr, gates_ptr, aux_ptr, h_ptr, d_gx_ptr, d_gh_ptr, d_h_ptr,
    rows, inner_a,
    HAS_GRAD2: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, COMPUTE: tl.constexpr,
):
    n, r, i, inner, mask, hidden, spatial, slot = _tile(rows, inner_a, ALIGN, BLOCK_R, BLOCK_I, CHANNELS_LAST)
    g = tl.load(_at(grad_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    if HAS_GRAD2:
        g += tl.load(_at(grad2_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    gt = _at(gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    r_gate = tl.load(gt, mask=mask).to(COMPUTE)
    z = tl.load(gt + slot, mask=mask).to(COMPUTE)
    cand = tl.load(gt + 2 * slot, mask=mask).to(COMPUTE)
    h_n = tl.load(_at(aux_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    h = tl.load(_at(h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)

    d_an = g * z * (1.0 - cand * cand)
    d_az = g * (cand - h) * z * (1.0 - z)
    d_ar = d_an * h_n * r_gate * (1.0 - r_gate)
    d_h = g * (1.0 - z)

    ty = d_gx_ptr.dtype.element_ty
    dx = _at(d_gx_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    tl.store(dx, d_ar.to(ty), mask=mask)
    tl.store(dx + slot, d_az.to(ty), mask=mask)
    tl.store(dx + 2 * slot, d_an.to(ty), mask=mask)
    dh = _at(d_gh_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    tl.store(dh, d_ar.to(ty), mask=mask)
    tl.store(dh + slot, d_az.to(ty), mask=mask)
    tl.store(dh + 2 * slot, (d_an * r_gate).to(ty), mask=mask)
    tl.store(_at(d_h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), d_h.to(d_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_reset_gate_fwd_kernel(
    gx_ptr, gh_ptr, h_ptr, gates_ptr, rh_ptr, bias_ih_ptr, bias_hh_ptr,
    gx_sample_a, rows, inner_a,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, COMPUTE: tl.constexpr,
):
    n, r, i, inner, mask, hidden, spatial, slot = _tile(rows, inner_a, ALIGN, BLOCK_R, BLOCK_I, CHANNELS_LAST)
    gx = _gx_at(gx_ptr, n, gx_sample_a, r, i, hidden, spatial, ALIGN, CHANNELS_LAST)
    gh = _at(gh_ptr, n, r, i, 2 * hidden, spatial, CHANNELS_LAST)
    a_r, a_z = _rz_preactivations(gx, gh, slot, mask, bias_ih_ptr, bias_hh_ptr, hidden, r, i, rows, inner,
                                  HAS_BIAS, CHANNELS_LAST, COMPUTE)
    h = tl.load(_at(h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    r_gate = _sigmoid(a_r)
    z = _sigmoid(a_z)
    gt = _at(gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    ty = gates_ptr.dtype.element_ty
    tl.store(gt, r_gate.to(ty), mask=mask)
    tl.store(gt + slot, z.to(ty), mask=mask)
    tl.store(_at(rh_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), (r_gate * h).to(rh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_update_fwd_kernel(
    gx_ptr, ghn_ptr, h_ptr, gates_ptr, h_new_ptr, bias_ih_ptr, bias_hh_ptr,
    gx_sample_a, rows, inner_a,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, COMPUTE: tl.constexpr,
):
    n, r, i, inner, mask, hidden, spatial, slot = _tile(rows, inner_a, ALIGN, BLOCK_R, BLOCK_I, CHANNELS_LAST)
    gx = _gx_at(gx_ptr, n, gx_sample_a, r, i, hidden, spatial, ALIGN, CHANNELS_LAST)
    a_n = (tl.load(gx + 2 * slot, mask=mask).to(COMPUTE)
           + tl.load(_at(ghn_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE))
    if HAS_BIAS:
        a_n += (_bias(bias_ih_ptr, 2, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE)
                + _bias(bias_hh_ptr, 2, hidden, r, i, rows, inner, CHANNELS_LAST, COMPUTE))
    gt = _at(gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    z = tl.load(gt + slot, mask=mask).to(COMPUTE)
    h = tl.load(_at(h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    cand = _tanh(a_n)
    h_new = h + z * (cand - h)
    tl.store(_at(h_new_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), h_new.to(h_new_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(gt + 2 * slot, cand.to(gates_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_update_bwd_kernel(
    grad_ptr, grad2_ptr, gates_ptr, h_ptr, d_gates_ptr, d_h_ptr,
    rows, inner_a,
    HAS_GRAD2: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, COMPUTE: tl.constexpr,
):
    n, r, i, inner, mask, hidden, spatial, slot = _tile(rows, inner_a, ALIGN, BLOCK_R, BLOCK_I, CHANNELS_LAST)
    g = tl.load(_at(grad_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    if HAS_GRAD2:
        g += tl.load(_at(grad2_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    gt = _at(gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    z = tl.load(gt + slot, mask=mask).to(COMPUTE)
    cand = tl.load(gt + 2 * slot, mask=mask).to(COMPUTE)
    h = tl.load(_at(h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)

    d_an = g * z * (1.0 - cand * cand)
    d_az = g * (cand - h) * z * (1.0 - z)
    d_h = g * (1.0 - z)
    dg = _at(d_gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST)
    ty = d_gates_ptr.dtype.element_ty
    tl.store(dg + slot, d_az.to(ty), mask=mask)
    tl.store(dg + 2 * slot, d_an.to(ty), mask=mask)
    tl.store(_at(d_h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), d_h.to(d_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_reset_gate_bwd_kernel(
    d_rh_ptr, gates_ptr, h_ptr, d_gates_ptr, d_h_ptr,
    rows, inner_a,
    CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, COMPUTE: tl.constexpr,
):
    n, r, i, inner, mask, hidden, spatial, slot = _tile(rows, inner_a, ALIGN, BLOCK_R, BLOCK_I, CHANNELS_LAST)
    d_rh = tl.load(_at(d_rh_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    r_gate = tl.load(_at(gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    h = tl.load(_at(h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST), mask=mask).to(COMPUTE)
    d_h = _at(d_h_ptr, n, r, i, hidden, spatial, CHANNELS_LAST)
    # Each element is read and written by the same program: in place is safe.
    d_h_total = tl.load(d_h, mask=mask).to(COMPUTE) + d_rh * r_gate
    tl.store(d_h, d_h_total.to(d_h_ptr.dtype.element_ty), mask=mask)
    d_ar = d_rh * h * r_gate * (1.0 - r_gate)
    tl.store(_at(d_gates_ptr, n, r, i, 3 * hidden, spatial, CHANNELS_LAST),
             d_ar.to(d_gates_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launchers
#
# Each launcher writes into the buffers it is given (keyword arguments) so that
# the sequence operator can hand it slices of its (T, N, C, *S) outputs; a buffer
# left out is allocated. Buffers are (N, C, *S). A launch follows the layout of
# its output (h' or d h). The sequence operator hands over tensors that are dense
# per sample in that layout, and then a launch is: one dict look-up for what
# depends only on the output's shape (``_geometry``), a stride and dtype
# comparison per tensor, the low address bits, the kernel (the operator itself
# launches through the bound launches below, which check even less). Anything
# else (a strided view, a tensor in the other layout) is copied into a
# conforming buffer first, and outputs copied back after: correct, slower, and
# never what the package's own callers do.
# ----------------------------------------------------------------------------


def _empty(shape, like: torch.Tensor, channels_last: Optional[bool] = None) -> torch.Tensor:
    """Uninitialised kernel output of ``shape``, dtype and device of ``like``, stored
    channels_last when ``channels_last`` (default: when ``like`` is).
    The tests replace this function to poison every kernel output with NaN."""
    if channels_last is None:
        channels_last = is_channels_last(like)
    return empty_in_layout(shape, like.dtype, like.device, channels_last)


def _gates_shape(h: torch.Tensor, slots: int) -> Tuple[int, ...]:
    return (h.shape[0], slots * h.shape[1]) + tuple(h.shape[2:])


def _dense_strides(shape: Tuple[int, ...], channels_last: bool) -> Tuple[int, ...]:
    """The strides of a dense (N, C, *S) tensor, contiguous or channels_last."""
    c, spatial = shape[1], shape[2:]
    inner = [0] * len(spatial)
    step = c if channels_last else 1
    for d in range(len(spatial) - 1, -1, -1):
        inner[d] = step
        step *= spatial[d]
    channel = 1 if channels_last else math.prod(spatial)
    return (c * math.prod(spatial), channel) + tuple(inner)


def _conforms(t: torch.Tensor, strides: Tuple[int, ...], any_sample_stride: bool = False) -> bool:
    """Whether ``t`` is laid out with ``strides``; dims of size 1 may have any
    stride, and with ``any_sample_stride`` so may the batch dim."""
    return all(
        size == 1 or got == want or (d == 0 and any_sample_stride)
        for d, (size, got, want) in enumerate(zip(t.shape, t.stride(), strides))
    )


def _memory_format(dims: int, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if dims == 4 else torch.channels_last_3d


class _Geometry:
    """What a launch needs that depends only on the kernel and its output's
    (shape, strides, dtype, device): made once, then looked up (:func:`_geometry`).

    ``rows x inner`` is one sample's matrix (module docstring); ``strides[k]`` the
    strides of a per-sample dense tensor with ``k * H`` channels in the launch's
    layout; ``align`` the largest power of two (elements, at most one 16-byte
    vector) dividing the inner extent; ``grid`` and the launch keywords from the
    tuning registry's block size and warps. ``replays`` keeps the compiled
    kernels launched over this geometry (see "Replaying compiled kernels"):
    they go when the geometry goes."""

    __slots__ = ("grid", "rows", "inner", "channels_last", "strides", "gx_tail", "wants", "align", "element_size",
                 "dtype", "common", "kwargs", "generation", "replays")

    def __init__(self, out: torch.Tensor, cfg: _tuning.LaunchConfig):
        hidden = out.shape[1]
        spatial = math.prod(out.shape[2:])
        check_kernel_sample_size(hidden, out.shape[2:])
        self.channels_last = is_channels_last(out)
        self.rows, self.inner = (spatial, hidden) if self.channels_last else (hidden, spatial)
        shape = tuple(out.shape)
        self.strides = {k: _dense_strides((shape[0], k * hidden) + shape[2:], self.channels_last) for k in (1, 2, 3)}
        # gx (3H channels) may have any sample stride: the rest of its strides.
        self.gx_tail = self.strides[3][1:]
        self.wants: Dict[tuple, tuple] = {}
        self.element_size = out.element_size()
        self.dtype = out.dtype
        self.align = math.gcd(self.inner, 16 // self.element_size)
        block = cfg.block_size
        if self.align < 16 // self.element_size:
            # Rows that start off a 16-byte boundary: accesses are ALIGN elements
            # wide, and each access more per thread costs 64-bit addresses in
            # registers (bfloat16 23x17 map: 75-80 registers at 8 elements per
            # thread, 123 for 5 channels_last channels; float32 with 6 channels_last
            # channels: 72 at 2 accesses; sm_90, Triton 3.9). One access per
            # thread and tensor keeps every kernel under 64.
            block = min(block, max(16, self.align * 32 * cfg.num_warps))
        # The inner axis takes as much of the block as it can use (whole rows of
        # a small map, or of the channels); rows fill the rest.
        block_i = min(triton.next_power_of_2(self.inner), block)
        block_r = block // block_i
        self.grid = (out.shape[0] * triton.cdiv(self.rows, block_r) * triton.cdiv(self.inner, block_i),)
        self.common = dict(
            CHANNELS_LAST=self.channels_last, BLOCK_R=block_r, BLOCK_I=block_i,
            COMPUTE=tl.float64 if out.dtype == torch.float64 else tl.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        self.kwargs: Dict[tuple, dict] = {}
        self.generation = _tuning.generation
        self.replays: Dict[tuple, tuple] = {}

    def want(self, slots: Tuple[int, ...]) -> tuple:
        """The strides of each tensor of a launch, dense per sample, by its
        channel slots (gx: all but the sample stride count)."""
        want = self.wants.get(slots)
        if want is None:
            want = self.wants[slots] = tuple(self.strides[k] for k in slots)
        return want

    def launch_kwargs(self, align: int, flags: Tuple[Tuple[str, bool], ...]) -> dict:
        key = (align, flags)
        kwargs = self.kwargs.get(key)
        if kwargs is None:
            kwargs = self.kwargs[key] = dict(self.common, ALIGN=align, **dict(flags))
        return kwargs


_GEOMETRIES: Dict[tuple, _Geometry] = {}
_MAX_GEOMETRIES = 1024  # distinct (kernel, shape, layout, dtype, device); cleared when full


def _geometry(kernel: str, out: torch.Tensor) -> _Geometry:
    key = (kernel, out.shape, out.stride(), out.dtype, out.device)
    geo = _GEOMETRIES.get(key)
    # Made again when the tuning registry may answer differently (a forced or
    # newly read configuration): it takes effect at the next launch.
    if geo is None or geo.generation != _tuning.generation:
        if len(_GEOMETRIES) >= _MAX_GEOMETRIES:
            _GEOMETRIES.clear()
        cfg = _tuning.launch_config(kernel, out.dtype, out.numel(), out.device)
        geo = _GEOMETRIES[key] = _Geometry(out, cfg)
    return geo


def _conforming(geo: _Geometry, tensors, slots, n_inputs: int, with_gx: bool):
    """``(tensors, copy_back)``: the launch's tensors, each dense per sample in the
    launch's layout (inputs copied where not; outputs replaced by scratch buffers
    holding their current values), and the (output, scratch) pairs to copy back."""
    fmt = _memory_format(tensors[0].dim(), geo.channels_last)
    ready, copy_back, scratches = [], [], {}
    for index, (t, k) in enumerate(zip(tensors, slots)):
        if _conforms(t, geo.strides[k], any_sample_stride=with_gx and index == 0):
            ready.append(t)
        elif index < n_inputs:
            ready.append(t.contiguous(memory_format=fmt))
        elif id(t) in scratches:
            # The same output passed twice (h' standing in for the pointers of
            # outputs a launch does not store): one scratch, copied back once.
            ready.append(scratches[id(t)])
        else:
            # Outputs may be read (z, the carried d h) or written in part (one
            # gate slot): the scratch buffer starts from the current values.
            scratch = scratches[id(t)] = t.contiguous(memory_format=fmt)
            ready.append(scratch)
            copy_back.append((t, scratch))
    return ready, copy_back


# Per-tensor facts gathered with C-level iteration (``map``), not a Python
# loop: a launch has 5-10 tensors, and the loop's bytecode was ~2 us of a ~10 us
# launch on the host (Python 3.11, this project's CI machine).
_STRIDE = torch.Tensor.stride
_DTYPE = operator.attrgetter("dtype")
_DATA_PTR = torch.Tensor.data_ptr
_LOW_BITS = (15).__and__


def _launch(kernel, name: str, out: torch.Tensor, tensors, slots, n_inputs: int, flags,
            bias=(), with_gx: bool = False) -> Optional[tuple]:
    """Launch ``kernel`` over the tiles of ``out``.

    ``tensors`` are the kernel's tensor arguments in order, ``n_inputs`` inputs
    then the outputs, ``slots`` their channels in units of H; with ``with_gx`` the
    first is the input pre-activations, whose sample stride is passed on (it may
    be a batch-major sequence). ``bias`` are the bias pointers, ``flags`` the
    kernel's boolean constexprs as ``((name, value), ...)``.

    The common case -- every tensor dense per sample in the launch's layout, one
    dtype, a specialization launched before -- is a few C-level passes over the
    tensors and a replay of the compiled kernel; anything else
    (:func:`_launch_slow`) copies where needed and goes through the binder.
    Returns the replayed or kept compiled kernel's entry where the tensors were
    launched as given (no copies), else ``None``."""
    geo = _geometry(name, out)
    pointers = (*tensors, *bias)
    strides = tuple(map(_STRIDE, tensors))
    want = geo.wants.get(slots) or geo.want(slots)
    if with_gx:
        gx_stride = strides[0][0]
        conforming = strides[0][1:] == geo.gx_tail and strides[1:] == want[1:]
    else:
        gx_stride = 0
        conforming = strides == want
    if conforming and _DIRECT_LAUNCH and tuple(map(_DTYPE, pointers)).count(geo.dtype) == len(pointers):
        active = triton.runtime.driver.active
        device = active.get_current_device()
        # The low 4 bits of every address decide both ALIGN and the binder's
        # pointer specialization; with the gx sample stride they fix the
        # integer arguments too.
        low = bytes(map(_LOW_BITS, map(_DATA_PTR, pointers)))
        entry = geo.replays.get((id(kernel), flags, low, gx_stride, active, device))
        if entry is not None:
            _replay(entry, geo.grid, active.get_current_stream(device), pointers)
            return entry
    return _launch_slow(kernel, geo, tensors, slots, n_inputs, flags, bias, with_gx, conforming)


def _launch_slow(kernel, geo: _Geometry, tensors, slots, n_inputs: int, flags, bias, with_gx: bool,
                 conforming: bool) -> Optional[tuple]:
    """:func:`_launch` the first time for a specialization, or with tensors that
    need copies (strided views, the other layout) or mix dtypes: through the
    binder, keeping the compiled kernel for replay where it can be replayed."""
    copy_back = ()
    if not conforming:
        tensors, copy_back = _conforming(geo, tensors, slots, n_inputs, with_gx)
    pointers = (*tensors, *bias)
    size = geo.element_size
    gx_stride = tensors[0].stride(0) if with_gx else 0
    low = bytes(map(_LOW_BITS, map(_DATA_PTR, pointers)))
    # ALIGN must divide every tensor's start and the gx sample stride (elements);
    # the biases are not indexed with it.
    bits = gx_stride * size
    for b in low[:len(tensors)]:
        bits |= b
    align = geo.align
    while bits & (align * size - 1):
        align //= 2
    sizes = (geo.rows, geo.inner // align)
    if with_gx:
        sizes = (gx_stride // align,) + sizes
    kwargs = geo.launch_kwargs(align, flags)
    # Replayed only when every pointer has the launch's dtype (the binder
    # specializes on dtypes too; this package never mixes them).
    entry = None
    if not (_DIRECT_LAUNCH and all(t.dtype == geo.dtype for t in pointers)):
        kernel[geo.grid](*pointers, *sizes, **kwargs)
    else:
        active = triton.runtime.driver.active
        device = active.get_current_device()
        key = (id(kernel), flags, low, gx_stride, active, device)
        entry = geo.replays.get(key)
        if entry is not None:
            _replay(entry, geo.grid, active.get_current_stream(device), pointers)
        else:
            compiled = kernel[geo.grid](*pointers, *sizes, **kwargs)
            fn = getattr(kernel, "fn", None)  # the Python function of a JITFunction: its parameters' order
            if fn is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata",
                                                                     "launch_metadata")):
                names = [p for p in inspect.signature(fn).parameters if p in kwargs]
                # The kernel is kept with its entry: its id in the key is never reused.
                entry = geo.replays[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                                            compiled.launch_metadata, sizes + tuple(kwargs[p] for p in names), kernel,
                                            geo.grid)
    for target, scratch in copy_back:
        target.copy_(scratch)
    return None if copy_back or not conforming else entry


# ----------------------------------------------------------------------------
# Replaying compiled kernels
#
# ``kernel[grid](...)`` goes through Triton's argument binder: it specializes
# every argument (pointer alignment, integer size and divisibility), builds a
# cache key and looks the compiled kernel up: 20-25 us per launch on this
# project's 2-core CI machine (Triton 3.9, GPU work stubbed), more than the rest
# of our launcher and, at RAFT's sizes, more than the kernel's GPU time. After the
# first launch of a specialization the compiled kernel is kept in its geometry
# (``_Geometry.replays``) under the facts the binder keys on -- the kernel, the
# constexprs (ALIGN, the flags; the rest is the geometry's), the pointers'
# 16-byte alignment, the integer arguments (fixed by the geometry, ALIGN and the
# gx sample stride), dtypes (all the output's), the driver and the device -- and
# later launches call it exactly the way ``JITFunction.run`` does (Triton
# 3.4-3.9 pass the grid, stream, function, packed metadata, launch metadata,
# launch hooks, then every kernel parameter in order, constexprs included):
# launch hooks (profilers) see the same calls. tests/test_direct_launch.py
# checks the arguments against the binder's on the installed Triton. What the
# binder does besides specializing is skipped on a replay: its check that global
# constexprs did not change, ``pre_run_hooks``, and knobs it reads at every
# launch (``knobs.runtime.debug``, ``add_stages_inspection_hook``,
# ``knobs.compilation.instrumentation_mode`` and ``fpsan_homomorphic_casts`` in
# Triton 3.9) changed after the first launch; for those, the ``direct_launch``
# setting "0" (CONVGRU_TRITON_DIRECT_LAUNCH=0 at import, or
# override_settings(direct_launch="0")) turns replay off. So does the Triton
# interpreter, where kernels are not compiled.
# ----------------------------------------------------------------------------

#: Replay can work here: Triton >= 3.4 (knobs.runtime holds the launch hooks),
#: and kernels are compiled (not the interpreter).
_REPLAY_POSSIBLE = hasattr(triton, "knobs") and not _settings.peek_settings().triton_interpret


def _direct_launch_wanted(settings: "_settings.Settings") -> bool:
    return _REPLAY_POSSIBLE and settings.direct_launch != "0"


#: Whether launches replay compiled kernels: a plain global, read at every
#: launch, kept in step with the ``direct_launch`` setting by the listener
#: below (tests set it directly to force either way).
_DIRECT_LAUNCH = _direct_launch_wanted(_settings.peek_settings())


@_settings.on_change
def _direct_launch_changed(old: "_settings.Settings", new: "_settings.Settings") -> None:
    global _DIRECT_LAUNCH
    if old.direct_launch != new.direct_launch:
        _DIRECT_LAUNCH = _direct_launch_wanted(new)


def _replay(entry: tuple, grid: tuple, stream, pointers: tuple) -> None:
    """Launch a kept compiled kernel: ``entry`` is (run, function, packed
    metadata, launch_metadata, the integer and constexpr arguments, the kernel,
    the grid)."""
    run, function, packed_metadata, launch_metadata, tail, _, _ = entry
    every = pointers + tail
    runtime = triton.knobs.runtime
    run(grid[0], 1, 1, stream, function, packed_metadata, launch_metadata(grid, stream, *every),
        runtime.launch_enter_hook, runtime.launch_exit_hook, *every)


# ----------------------------------------------------------------------------
# The gate launches: each kernel's launch written once
#
# :class:`GateLaunches` has one method per launch, with the signatures of the
# references in ``sequence.op._TorchGateMath``: the kernel, its registry name,
# its tensors in the kernel's argument order with their channel slots (units of
# H), how many are inputs, its flags and whether the first tensor is gx are
# stated there and nowhere else. A method hands them to ``self._go``: the
# general instance (:data:`_GENERAL`) launches through :func:`_launch` with the
# call's own biases; the instances :meth:`GateLaunches.bind` makes for one call
# of the sequence operator (:class:`_Bound`) replay the kernels compiled for
# that call's step geometry. The launcher functions at the end of this module
# allocate the outputs a caller leaves out, then call the general instance.
# ----------------------------------------------------------------------------


def _biases(bias_ih, bias_hh, fallback) -> tuple:
    """The bias pointers of a launch: the kernels index a bias as a dense (3H,)
    vector, so a sliced or expanded one is made dense (a no-op for ordinary
    parameters); without biases, ``fallback`` stands in for both pointers."""
    if bias_ih is None:
        return fallback, fallback
    return bias_ih.contiguous(), bias_hh.contiguous()


class GateLaunches:
    """The six gate launches. Outputs are the keyword-only buffers the kernels
    write; each method returns what :func:`_launch` returns (the compiled
    kernel's replay entry, or ``None``). The general instance (:data:`_GENERAL`)
    launches every call through :func:`_launch`; :meth:`bind` gives the
    launches bound to one call where they can be."""

    __slots__ = ()

    @staticmethod
    def bind(out: torch.Tensor, bias_ih, bias_hh, others) -> "GateLaunches":
        """The launches of one call of the sequence operator, whose outputs and
        carried states are laid out like ``out``; ``others`` are the call's
        other tensors (checked for dtype). Bound ones (:func:`_bind`) where
        they can be, else the general instance."""
        return _bind(out, bias_ih, bias_hh, others) or _GENERAL

    def _go(self, kernel, name: str, out, tensors, slots, n_inputs: int, flags, bias, with_gx: bool):
        """One launch through :func:`_launch`, none for an empty state;
        ``bias`` is ``(bias_ih, bias_hh)`` for a kernel that reads biases,
        else ``()``."""
        if out.numel() == 0:
            return None
        if bias:
            bias = _biases(bias[0], bias[1], out)
        return _launch(kernel, name, out, tensors, slots, n_inputs, flags, bias, with_gx)

    def reset_after_fwd(self, gx, gh, h, bias_ih, bias_hh, *, h_new, gates, aux):
        """h' into ``h_new``; with ``gates`` (not ``None``) also (r, z, n) and
        ``aux`` = ``gh_n + b_hn`` for the backward."""
        if gates is None:  # nothing saved: h_new stands in for the pointers of gates and aux
            gates = aux = h_new
            save, slots = False, (3, 3, 1, 1, 1, 1)
        else:
            save, slots = True, (3, 3, 1, 1, 3, 1)
        return self._go(_gru_reset_after_fwd_kernel, "gru_reset_after_fwd", h_new, (gx, gh, h, h_new, gates, aux),
                        slots, 3, (("HAS_BIAS", bias_ih is not None), ("SAVE", save)), (bias_ih, bias_hh), True)

    def reset_after_bwd(self, grad, grad2, gates, aux, h, *, d_gx, d_gh, d_h):
        """d gx, d gh and the direct part of d h from ``grad + grad2`` (``grad2``
        may be ``None``)."""
        return self._go(_gru_reset_after_bwd_kernel, "gru_reset_after_bwd", d_h,
                        (grad, grad if grad2 is None else grad2, gates, aux, h, d_gx, d_gh, d_h),
                        (1, 1, 3, 1, 1, 3, 3, 1), 5, (("HAS_GRAD2", grad2 is not None),), (), False)

    def reset_gate_fwd(self, gx, gh_rz, h, bias_ih, bias_hh, *, gates, rh):
        """r and z into the first two slots of ``gates``, ``r * h`` into ``rh``."""
        return self._go(_gru_reset_gate_fwd_kernel, "gru_reset_gate_fwd", rh, (gx, gh_rz, h, gates, rh),
                        (3, 2, 1, 3, 1), 3, (("HAS_BIAS", bias_ih is not None),), (bias_ih, bias_hh), True)

    def update_fwd(self, gx, gh_n, gates, h, bias_ih, bias_hh, save, *, h_new):
        """h' into ``h_new`` from z (slot 1 of ``gates``); with ``save`` n into slot 2."""
        return self._go(_gru_update_fwd_kernel, "gru_update_fwd", h_new, (gx, gh_n, h, gates, h_new),
                        (3, 1, 1, 3, 1), 3, (("HAS_BIAS", bias_ih is not None), ("SAVE", save)), (bias_ih, bias_hh),
                        True)

    def update_bwd(self, grad, grad2, gates, h, d_gates, *, d_h):
        """d a_z and d a_n into slots 1 and 2 of ``d_gates``, the direct part of
        d h into ``d_h``, from ``grad + grad2``."""
        return self._go(_gru_update_bwd_kernel, "gru_update_bwd", d_h,
                        (grad, grad if grad2 is None else grad2, gates, h, d_gates, d_h), (1, 1, 3, 1, 3, 1), 4,
                        (("HAS_GRAD2", grad2 is not None),), (), False)

    def reset_gate_bwd(self, d_rh, gates, h, d_gates, d_h):
        """d a_r into slot 0 of ``d_gates``; adds ``d_rh * r`` to ``d_h`` in place."""
        return self._go(_gru_reset_gate_bwd_kernel, "gru_reset_gate_bwd", d_h, (d_rh, gates, h, d_gates, d_h),
                        (1, 3, 1, 3, 1), 3, (), (), False)


#: The general launches: every call through :func:`_launch`.
_GENERAL = GateLaunches()


# ----------------------------------------------------------------------------
# Launches bound to one step geometry (the sequence operator's fast path)
#
# The sequence operator (and the cell, one step of it) allocates every output
# and carries every state in the layout and dtype of its initial state, so
# within one of its calls every launch has the same geometry and dtype. It binds
# the launches once per call (:func:`_bind`); each launch then checks only the
# tensors that come from outside (its inputs: pre-activations, convolution
# outputs, the initial state, incoming gradients) against the strides the
# kernel reads, takes the low bits of every address, and replays the kernel
# compiled for them. Anything else goes through :func:`_launch` (and so does
# the first launch of a specialization, keeping what it compiled). Measured
# with the kernels stubbed (bench/host_overhead.py, the "inside" column): a
# no-grad ConvGRUCell2d step spent 73 us in its two launches with the general
# launches alone, 37 us with the bound launches, the bind included.
# ----------------------------------------------------------------------------


class _BoundKernel:
    """One kernel's launches over one step geometry and flags: the strides its
    inputs must have, its grid, and the compiled kernels it replays, keyed by
    (low address bits, gx sample stride, driver, device)."""

    __slots__ = ("want", "gx_tail", "grid", "replays")

    def __init__(self, geo: _Geometry, slots, n_inputs: int, with_gx: bool):
        want = geo.want(slots)[:n_inputs]
        # gx is checked but for its sample stride (a frame of a batch-major sequence).
        self.want, self.gx_tail = (want[1:], geo.gx_tail) if with_gx else (want, None)
        self.grid = geo.grid
        self.replays: Dict[tuple, tuple] = {}


#: (state shape, strides, dtype, device, biases or not, tuning generation) -> {(kernel name, flags): _BoundKernel}
_STEPS: Dict[tuple, Dict[tuple, _BoundKernel]] = {}


class _Bound(GateLaunches):
    """:class:`GateLaunches` for one call of the sequence operator, bound by
    :func:`_bind`: the call's biases (dense, checked once) and the kernels of
    its step geometry, replayed where a launch's tensors fit."""

    __slots__ = ("kernels", "bias", "active", "device", "stream")

    def _go(self, kernel, name: str, out, tensors, slots, n_inputs: int, flags, bias, with_gx: bool):
        if bias:
            bias = self.bias
        bound = self.kernels.get((name, flags))
        key = None
        if bound is not None:
            strides = tuple(map(_STRIDE, tensors[:n_inputs]))
            if with_gx:
                gx_stride = strides[0][0]
                fits = strides[0][1:] == bound.gx_tail and strides[1:] == bound.want
            else:
                gx_stride = 0
                fits = strides == bound.want
            if fits:
                pointers = tensors + bias
                key = (bytes(map(_LOW_BITS, map(_DATA_PTR, pointers))), gx_stride, self.active, self.device)
                entry = bound.replays.get(key)
                if entry is not None:
                    _replay(entry, bound.grid, self.stream, pointers)
                    return entry
        entry = _launch(kernel, name, out, tensors, slots, n_inputs, flags, bias, with_gx)
        if bound is None:
            geo = _geometry(name, out)
            self.kernels[name, flags] = _BoundKernel(geo, slots, n_inputs, with_gx)
        elif key is not None and entry is not None:
            bound.replays[key] = entry
        return entry


def _bind(out: torch.Tensor, bias_ih, bias_hh, others) -> Optional[_Bound]:
    """The gate launches of one call of the sequence operator, whose every
    output and carried state is laid out like ``out`` (a state frame it
    allocated), or ``None`` where the general launches must run (replay off,
    an empty state, tensors of another dtype among ``others`` and the biases,
    biases that are not dense vectors)."""
    if not _DIRECT_LAUNCH or out.numel() == 0:
        return None
    dtype = out.dtype
    if bias_ih is None:
        has_bias, bias = False, (out, out)  # never read: a stand-in pointer
    else:
        has_bias, bias = True, (bias_ih, bias_hh)
        if bias_ih.stride() != (1,) or bias_hh.stride() != (1,):
            return None
    others = bias + others
    if tuple(map(_DTYPE, others)).count(dtype) != len(others):
        return None
    key = (out.shape, out.stride(), dtype, out.device, has_bias, _tuning.generation)
    kernels = _STEPS.get(key)
    if kernels is None:
        if len(_STEPS) >= _MAX_GEOMETRIES:
            _STEPS.clear()
        kernels = _STEPS[key] = {}
    bound = _Bound()
    bound.kernels, bound.bias = kernels, bias
    active = bound.active = triton.runtime.driver.active
    device = bound.device = active.get_current_device()
    bound.stream = active.get_current_stream(device)
    return bound


# ----------------------------------------------------------------------------
# Launcher functions: the general launches, with the outputs a caller leaves
# out allocated (the tuner, the tests)
# ----------------------------------------------------------------------------


def _reset_after_fwd(gates_x, gates_h, h, bias_ih, bias_hh, save: bool, *, h_new=None, gates=None, aux=None):
    """:meth:`GateLaunches.reset_after_fwd`. Returns ``(h_new, saved)``: with
    ``save``, ``saved = (gates, aux)``, gates (N, 3H, *S) = (r, z, n) and aux
    (N, H, *S) = ``gh_n + b_hn``, what the backward needs; else ``None``."""
    h_new = _empty(h.shape, h) if h_new is None else h_new
    if save:
        gates = _empty(_gates_shape(h, 3), h) if gates is None else gates
        aux = _empty(h.shape, h) if aux is None else aux
    saved = (gates, aux) if save else None
    _GENERAL.reset_after_fwd(gates_x, gates_h, h, bias_ih, bias_hh, h_new=h_new, gates=gates if save else None,
                             aux=aux)
    return h_new, saved


def _reset_after_bwd(grad, grad2, saved, h, channels_last: bool, *, d_gx=None, d_gh=None, d_h=None):
    """:meth:`GateLaunches.reset_after_bwd`: returns ``(d_gates_x, d_gates_h,
    d_h_direct)`` from the incoming gradient ``grad + grad2`` (``grad2`` may be
    ``None``) and the ``saved`` pair of :func:`_reset_after_fwd`. Gate gradients
    it allocates are channels_last when ``channels_last``."""
    gates, aux = saved
    d_gx = _empty(_gates_shape(h, 3), h, channels_last) if d_gx is None else d_gx
    d_gh = _empty(_gates_shape(h, 3), h, channels_last) if d_gh is None else d_gh
    d_h = _empty(h.shape, h) if d_h is None else d_h
    _GENERAL.reset_after_bwd(grad, grad2, gates, aux, h, d_gx=d_gx, d_gh=d_gh, d_h=d_h)
    return d_gx, d_gh, d_h


def _reset_gate_fwd(gates_x, gates_h_rz, h, bias_ih, bias_hh, *, gates=None, rh=None):
    """:meth:`GateLaunches.reset_gate_fwd`: returns ``(gates, rh)`` where
    ``gates`` (N, 3H, *S) holds r and z in its first two slots (n is written
    by the update kernel) and ``rh = r * h``."""
    gates = _empty(_gates_shape(h, 3), h) if gates is None else gates
    rh = _empty(h.shape, h) if rh is None else rh
    _GENERAL.reset_gate_fwd(gates_x, gates_h_rz, h, bias_ih, bias_hh, gates=gates, rh=rh)
    return gates, rh


def _update_fwd(gates_x, gates_h_n, gates, h, bias_ih, bias_hh, save: bool, *, h_new=None):
    """:meth:`GateLaunches.update_fwd`: returns ``h_new``; with ``save`` also
    writes n into the third slot of ``gates`` (whose slot z it reads)."""
    h_new = _empty(h.shape, h) if h_new is None else h_new
    _GENERAL.update_fwd(gates_x, gates_h_n, gates, h, bias_ih, bias_hh, save, h_new=h_new)
    return h_new


def _update_bwd(grad, grad2, gates, h, d_gates, *, d_h=None):
    """:meth:`GateLaunches.update_bwd`: writes d a_z and d a_n into slots 1 and 2
    of ``d_gates`` and returns the direct part of d h, from ``grad + grad2``."""
    d_h = _empty(h.shape, h) if d_h is None else d_h
    _GENERAL.update_bwd(grad, grad2, gates, h, d_gates, d_h=d_h)
    return d_h


def _reset_gate_bwd(d_rh, gates, h, d_gates, d_h) -> None:
    """:meth:`GateLaunches.reset_gate_bwd`: writes d a_r into slot 0 of
    ``d_gates`` and adds ``d_rh * r`` to ``d_h`` in place."""
    _GENERAL.reset_gate_bwd(d_rh, gates, h, d_gates, d_h)
