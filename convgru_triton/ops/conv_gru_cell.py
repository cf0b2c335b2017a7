"""Fused ConvGRU step: the Triton gate kernels and their launchers.

One step of a ConvGRU is two kinds of work: convolutions (left to cuDNN via
:mod:`torch.nn.functional`) and elementwise gate math (bias add, sigmoid, tanh,
the reset product and the interpolation of the new state), fused here into one
Triton kernel per phase. Each kernel's reference is the ``*_ref`` function of the
same name in :mod:`convgru_triton.ops.naive`; the operator that runs them step
after step, with autograd, is :mod:`convgru_triton.ops.conv_gru`.

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

Every kernel works on tensors viewed as (N, C, S) with arbitrary strides, so
contiguous and channels_last tensors are read and written in place; the element
order of the launch follows the output's layout so that accesses are coalesced.
Math is float32 (float64 for float64 tensors); offsets are 64-bit.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _tuning
from .._layout import check_kernel_sample_size, empty_in_layout, is_channels_last

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
def _tile(plane_size, inner_size, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Indices (n, c, s) of this program's block of one sample's plane.

    The plane is the (C, S) part of a sample, traversed in the order of the output
    layout: ``c * S + s`` (contiguous, ``inner_size = S``) or ``s * C + c``
    (channels_last, ``inner_size = C``). n, c, s come back as int64 so that
    ``index * stride`` cannot overflow for tensors past 2**31 elements.
    """
    pid = tl.program_id(0)
    blocks_per_plane = tl.cdiv(plane_size, BLOCK)
    n = pid // blocks_per_plane
    offs = (pid - n * blocks_per_plane) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane_size
    outer = offs // inner_size
    inner = offs - outer * inner_size
    if CHANNELS_LAST:
        c = inner
        s = outer
    else:
        c = outer
        s = inner
    return n.to(tl.int64), c.to(tl.int64), s.to(tl.int64), mask


@triton.jit
def _gru_reset_after_fwd_kernel(
    gx_ptr, gx_sn, gx_sc, gx_ss,
    gh_ptr, gh_sn, gh_sc, gh_ss,
    h_ptr, h_sn, h_sc, h_ss,
    bias_ih_ptr, bias_hh_ptr,
    h_new_ptr, hn_sn, hn_sc, hn_ss,
    gates_ptr, gt_sn, gt_sc, gt_ss,
    aux_ptr, ax_sn, ax_sc, ax_ss,
    plane_size, inner_size, hidden,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, s, mask = _tile(plane_size, inner_size, CHANNELS_LAST, BLOCK)
    gx = gx_ptr + n * gx_sn + c * gx_sc + s * gx_ss
    gh = gh_ptr + n * gh_sn + c * gh_sc + s * gh_ss
    gx_gate = hidden * gx_sc
    gh_gate = hidden * gh_sc

    a_r = tl.load(gx, mask=mask).to(COMPUTE) + tl.load(gh, mask=mask).to(COMPUTE)
    a_z = tl.load(gx + gx_gate, mask=mask).to(COMPUTE) + tl.load(gh + gh_gate, mask=mask).to(COMPUTE)
    x_n = tl.load(gx + 2 * gx_gate, mask=mask).to(COMPUTE)
    h_n = tl.load(gh + 2 * gh_gate, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        a_r += tl.load(bias_ih_ptr + c, mask=mask).to(COMPUTE) + tl.load(bias_hh_ptr + c, mask=mask).to(COMPUTE)
        a_z += (tl.load(bias_ih_ptr + hidden + c, mask=mask).to(COMPUTE)
                + tl.load(bias_hh_ptr + hidden + c, mask=mask).to(COMPUTE))
        x_n += tl.load(bias_ih_ptr + 2 * hidden + c, mask=mask).to(COMPUTE)
        h_n += tl.load(bias_hh_ptr + 2 * hidden + c, mask=mask).to(COMPUTE)
    h = tl.load(h_ptr + n * h_sn + c * h_sc + s * h_ss, mask=mask).to(COMPUTE)

    r = _sigmoid(a_r)
    z = _sigmoid(a_z)
    cand = _tanh(x_n + r * h_n)
    h_new = h + z * (cand - h)
    tl.store(h_new_ptr + n * hn_sn + c * hn_sc + s * hn_ss, h_new.to(h_new_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        gt = gates_ptr + n * gt_sn + c * gt_sc + s * gt_ss
        ty = gates_ptr.dtype.element_ty
        tl.store(gt, r.to(ty), mask=mask)
        tl.store(gt + hidden * gt_sc, z.to(ty), mask=mask)
        tl.store(gt + 2 * hidden * gt_sc, cand.to(ty), mask=mask)
        tl.store(aux_ptr + n * ax_sn + c * ax_sc + s * ax_ss, h_n.to(aux_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_reset_after_bwd_kernel(
    grad_ptr, g_sn, g_sc, g_ss,
    grad2_ptr, g2_sn, g2_sc, g2_ss,
    gates_ptr, gt_sn, gt_sc, gt_ss,
    aux_ptr, ax_sn, ax_sc, ax_ss,
    h_ptr, h_sn, h_sc, h_ss,
    d_gx_ptr, dx_sn, dx_sc, dx_ss,
    d_gh_ptr, dh_sn, dh_sc, dh_ss,
    d_h_ptr, dhp_sn, dhp_sc, dhp_ss,
    plane_size, inner_size, hidden,
    HAS_GRAD2: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, s, mask = _tile(plane_size, inner_size, CHANNELS_LAST, BLOCK)
    g = tl.load(grad_ptr + n * g_sn + c * g_sc + s * g_ss, mask=mask).to(COMPUTE)
    if HAS_GRAD2:
        g += tl.load(grad2_ptr + n * g2_sn + c * g2_sc + s * g2_ss, mask=mask).to(COMPUTE)
    gt = gates_ptr + n * gt_sn + c * gt_sc + s * gt_ss
    r = tl.load(gt, mask=mask).to(COMPUTE)
    z = tl.load(gt + hidden * gt_sc, mask=mask).to(COMPUTE)
    cand = tl.load(gt + 2 * hidden * gt_sc, mask=mask).to(COMPUTE)
    h_n = tl.load(aux_ptr + n * ax_sn + c * ax_sc + s * ax_ss, mask=mask).to(COMPUTE)
    h = tl.load(h_ptr + n * h_sn + c * h_sc + s * h_ss, mask=mask).to(COMPUTE)

    d_an = g * z * (1.0 - cand * cand)
    d_az = g * (cand - h) * z * (1.0 - z)
    d_ar = d_an * h_n * r * (1.0 - r)
    d_h = g * (1.0 - z)

    dx = d_gx_ptr + n * dx_sn + c * dx_sc + s * dx_ss
    dx_gate = hidden * dx_sc
    ty = d_gx_ptr.dtype.element_ty
    tl.store(dx, d_ar.to(ty), mask=mask)
    tl.store(dx + dx_gate, d_az.to(ty), mask=mask)
    tl.store(dx + 2 * dx_gate, d_an.to(ty), mask=mask)
    dh = d_gh_ptr + n * dh_sn + c * dh_sc + s * dh_ss
    dh_gate = hidden * dh_sc
    tl.store(dh, d_ar.to(ty), mask=mask)
    tl.store(dh + dh_gate, d_az.to(ty), mask=mask)
    tl.store(dh + 2 * dh_gate, (d_an * r).to(ty), mask=mask)
    tl.store(d_h_ptr + n * dhp_sn + c * dhp_sc + s * dhp_ss, d_h.to(d_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_reset_gate_fwd_kernel(
    gx_ptr, gx_sn, gx_sc, gx_ss,
    gh_ptr, gh_sn, gh_sc, gh_ss,
    h_ptr, h_sn, h_sc, h_ss,
    bias_ih_ptr, bias_hh_ptr,
    gates_ptr, gt_sn, gt_sc, gt_ss,
    rh_ptr, rh_sn, rh_sc, rh_ss,
    plane_size, inner_size, hidden,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, s, mask = _tile(plane_size, inner_size, CHANNELS_LAST, BLOCK)
    gx = gx_ptr + n * gx_sn + c * gx_sc + s * gx_ss
    gh = gh_ptr + n * gh_sn + c * gh_sc + s * gh_ss
    a_r = tl.load(gx, mask=mask).to(COMPUTE) + tl.load(gh, mask=mask).to(COMPUTE)
    a_z = tl.load(gx + hidden * gx_sc, mask=mask).to(COMPUTE) + tl.load(gh + hidden * gh_sc, mask=mask).to(COMPUTE)
    if HAS_BIAS:
        a_r += tl.load(bias_ih_ptr + c, mask=mask).to(COMPUTE) + tl.load(bias_hh_ptr + c, mask=mask).to(COMPUTE)
        a_z += (tl.load(bias_ih_ptr + hidden + c, mask=mask).to(COMPUTE)
                + tl.load(bias_hh_ptr + hidden + c, mask=mask).to(COMPUTE))
    h = tl.load(h_ptr + n * h_sn + c * h_sc + s * h_ss, mask=mask).to(COMPUTE)
    r = _sigmoid(a_r)
    z = _sigmoid(a_z)
    gt = gates_ptr + n * gt_sn + c * gt_sc + s * gt_ss
    ty = gates_ptr.dtype.element_ty
    tl.store(gt, r.to(ty), mask=mask)
    tl.store(gt + hidden * gt_sc, z.to(ty), mask=mask)
    tl.store(rh_ptr + n * rh_sn + c * rh_sc + s * rh_ss, (r * h).to(rh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_update_fwd_kernel(
    gx_ptr, gx_sn, gx_sc, gx_ss,
    ghn_ptr, ghn_sn, ghn_sc, ghn_ss,
    h_ptr, h_sn, h_sc, h_ss,
    bias_ih_ptr, bias_hh_ptr,
    gates_ptr, gt_sn, gt_sc, gt_ss,
    h_new_ptr, hn_sn, hn_sc, hn_ss,
    plane_size, inner_size, hidden,
    HAS_BIAS: tl.constexpr, SAVE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, s, mask = _tile(plane_size, inner_size, CHANNELS_LAST, BLOCK)
    a_n = (tl.load(gx_ptr + n * gx_sn + (2 * hidden + c) * gx_sc + s * gx_ss, mask=mask).to(COMPUTE)
           + tl.load(ghn_ptr + n * ghn_sn + c * ghn_sc + s * ghn_ss, mask=mask).to(COMPUTE))
    if HAS_BIAS:
        a_n += (tl.load(bias_ih_ptr + 2 * hidden + c, mask=mask).to(COMPUTE)
                + tl.load(bias_hh_ptr + 2 * hidden + c, mask=mask).to(COMPUTE))
    gt = gates_ptr + n * gt_sn + c * gt_sc + s * gt_ss
    z = tl.load(gt + hidden * gt_sc, mask=mask).to(COMPUTE)
    h = tl.load(h_ptr + n * h_sn + c * h_sc + s * h_ss, mask=mask).to(COMPUTE)
    cand = _tanh(a_n)
    h_new = h + z * (cand - h)
    tl.store(h_new_ptr + n * hn_sn + c * hn_sc + s * hn_ss, h_new.to(h_new_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(gt + 2 * hidden * gt_sc, cand.to(gates_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_update_bwd_kernel(
    grad_ptr, g_sn, g_sc, g_ss,
    grad2_ptr, g2_sn, g2_sc, g2_ss,
    gates_ptr, gt_sn, gt_sc, gt_ss,
    h_ptr, h_sn, h_sc, h_ss,
    d_gates_ptr, dg_sn, dg_sc, dg_ss,
    d_h_ptr, dhp_sn, dhp_sc, dhp_ss,
    plane_size, inner_size, hidden,
    HAS_GRAD2: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, s, mask = _tile(plane_size, inner_size, CHANNELS_LAST, BLOCK)
    g = tl.load(grad_ptr + n * g_sn + c * g_sc + s * g_ss, mask=mask).to(COMPUTE)
    if HAS_GRAD2:
        g += tl.load(grad2_ptr + n * g2_sn + c * g2_sc + s * g2_ss, mask=mask).to(COMPUTE)
    gt = gates_ptr + n * gt_sn + c * gt_sc + s * gt_ss
    z = tl.load(gt + hidden * gt_sc, mask=mask).to(COMPUTE)
    cand = tl.load(gt + 2 * hidden * gt_sc, mask=mask).to(COMPUTE)
    h = tl.load(h_ptr + n * h_sn + c * h_sc + s * h_ss, mask=mask).to(COMPUTE)

    d_an = g * z * (1.0 - cand * cand)
    d_az = g * (cand - h) * z * (1.0 - z)
    d_h = g * (1.0 - z)
    dg = d_gates_ptr + n * dg_sn + c * dg_sc + s * dg_ss
    ty = d_gates_ptr.dtype.element_ty
    tl.store(dg + hidden * dg_sc, d_az.to(ty), mask=mask)
    tl.store(dg + 2 * hidden * dg_sc, d_an.to(ty), mask=mask)
    tl.store(d_h_ptr + n * dhp_sn + c * dhp_sc + s * dhp_ss, d_h.to(d_h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_reset_gate_bwd_kernel(
    d_rh_ptr, drh_sn, drh_sc, drh_ss,
    gates_ptr, gt_sn, gt_sc, gt_ss,
    h_ptr, h_sn, h_sc, h_ss,
    d_gates_ptr, dg_sn, dg_sc, dg_ss,
    d_h_ptr, dhp_sn, dhp_sc, dhp_ss,
    plane_size, inner_size, hidden,
    CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, s, mask = _tile(plane_size, inner_size, CHANNELS_LAST, BLOCK)
    d_rh = tl.load(d_rh_ptr + n * drh_sn + c * drh_sc + s * drh_ss, mask=mask).to(COMPUTE)
    r = tl.load(gates_ptr + n * gt_sn + c * gt_sc + s * gt_ss, mask=mask).to(COMPUTE)
    h = tl.load(h_ptr + n * h_sn + c * h_sc + s * h_ss, mask=mask).to(COMPUTE)
    d_h = d_h_ptr + n * dhp_sn + c * dhp_sc + s * dhp_ss
    # Each element is read and written by the same program: in place is safe.
    d_h_total = tl.load(d_h, mask=mask).to(COMPUTE) + d_rh * r
    tl.store(d_h, d_h_total.to(d_h_ptr.dtype.element_ty), mask=mask)
    d_ar = d_rh * h * r * (1.0 - r)
    tl.store(d_gates_ptr + n * dg_sn + c * dg_sc + s * dg_ss, d_ar.to(d_gates_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launchers
#
# Each launcher writes into the buffers it is given (keyword arguments) so that
# the sequence operator can hand it slices of its (T, N, C, *S) outputs; a buffer
# left out is allocated. Buffers are (N, C, *S) with any strides.
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


def _ncs(t: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """``t`` (N, C, *S) viewed as (N, C, S) with its strides.

    A view for every dense layout (and expanded gradients); only a tensor whose
    spatial dims cannot be merged into one stride is copied.
    """
    n, c = t.shape[0], t.shape[1]
    spatial = math.prod(t.shape[2:])
    try:
        v = t.view(n, c, spatial)
    except RuntimeError:
        v = t.reshape(n, c, spatial)
    return (v,) + tuple(v.stride())


def _bias_args(bias_ih, bias_hh, fallback):
    """``(has_bias, bias_ih, bias_hh)`` for a launch: the kernels index a bias as
    a dense (3H,) vector, so a sliced or expanded one is made dense (a no-op for
    ordinary parameters); without biases, ``fallback`` stands in as the pointer."""
    if bias_ih is None:
        return False, fallback, fallback
    return True, bias_ih.contiguous(), bias_hh.contiguous()


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid_and_meta(kernel: str, out: torch.Tensor, hidden: int):
    """Launch grid and the layout arguments shared by every kernel, from the
    (N, H, *S) output ``out``, whose memory order the launch follows."""
    batch = out.shape[0]
    spatial = math.prod(out.shape[2:])
    plane = hidden * spatial
    check_kernel_sample_size(hidden, out.shape[2:])
    channels_last = is_channels_last(out)
    cfg = _tuning.launch_config(kernel, out.dtype, out.numel(), out.device)
    grid = (batch * triton.cdiv(plane, cfg.block_size),)
    meta = dict(
        CHANNELS_LAST=channels_last,
        COMPUTE=_compute_dtype(out.dtype),
        BLOCK=cfg.block_size,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return grid, (plane, hidden if channels_last else spatial, hidden), meta


def _reset_after_fwd(gates_x, gates_h, h, bias_ih, bias_hh, save: bool, *, h_new=None, gates=None, aux=None):
    """Launch ``_gru_reset_after_fwd_kernel``. Returns ``(h_new, saved)``: with
    ``save``, ``saved = (gates, aux)``, gates (N, 3H, *S) = (r, z, n) and aux
    (N, H, *S) = ``gh_n + b_hn``, what the backward needs; else ``None``."""
    hidden = h.shape[1]
    h_new = _empty(h.shape, h) if h_new is None else h_new
    if save:
        gates = _empty(_gates_shape(h, 3), h) if gates is None else gates
        aux = _empty(h.shape, h) if aux is None else aux
    saved = (gates, aux) if save else None
    if h.numel() == 0:
        return h_new, saved
    grid, sizes, meta = _grid_and_meta("gru_reset_after_fwd", h_new, hidden)
    has_bias, bias_ih, bias_hh = _bias_args(bias_ih, bias_hh, h)
    unused = (h_new, 0, 0, 0)
    _gru_reset_after_fwd_kernel[grid](
        *_ncs(gates_x), *_ncs(gates_h), *_ncs(h), bias_ih, bias_hh,
        *_ncs(h_new), *(_ncs(gates) if save else unused), *(_ncs(aux) if save else unused),
        *sizes, HAS_BIAS=has_bias, SAVE=save, **meta,
    )
    return h_new, saved


def _reset_after_bwd(grad, grad2, saved, h, channels_last: bool, *, d_gx=None, d_gh=None, d_h=None):
    """Launch ``_gru_reset_after_bwd_kernel``: returns ``(d_gates_x, d_gates_h,
    d_h_direct)`` from the incoming gradient ``grad + grad2`` (``grad2`` may be
    ``None``) and the ``saved`` pair of :func:`_reset_after_fwd`. Gate gradients
    it allocates are channels_last when ``channels_last``."""
    gates, aux = saved
    hidden = h.shape[1]
    d_gx = _empty(_gates_shape(h, 3), h, channels_last) if d_gx is None else d_gx
    d_gh = _empty(_gates_shape(h, 3), h, channels_last) if d_gh is None else d_gh
    d_h = _empty(h.shape, h) if d_h is None else d_h
    if h.numel() == 0:
        return d_gx, d_gh, d_h
    grid, sizes, meta = _grid_and_meta("gru_reset_after_bwd", d_h, hidden)
    _gru_reset_after_bwd_kernel[grid](
        *_ncs(grad), *(_ncs(grad2) if grad2 is not None else (grad, 0, 0, 0)),
        *_ncs(gates), *_ncs(aux), *_ncs(h), *_ncs(d_gx), *_ncs(d_gh), *_ncs(d_h),
        *sizes, HAS_GRAD2=grad2 is not None, **meta,
    )
    return d_gx, d_gh, d_h


def _reset_gate_fwd(gates_x, gates_h_rz, h, bias_ih, bias_hh, *, gates=None, rh=None):
    """Launch ``_gru_reset_gate_fwd_kernel``: returns ``(gates, rh)`` where
    ``gates`` (N, 3H, *S) holds r and z in its first two slots (n is written
    by the update kernel) and ``rh = r * h``."""
    hidden = h.shape[1]
    gates = _empty(_gates_shape(h, 3), h) if gates is None else gates
    rh = _empty(h.shape, h) if rh is None else rh
    if h.numel() == 0:
        return gates, rh
    grid, sizes, meta = _grid_and_meta("gru_reset_gate_fwd", rh, hidden)
    has_bias, bias_ih, bias_hh = _bias_args(bias_ih, bias_hh, h)
    _gru_reset_gate_fwd_kernel[grid](
        *_ncs(gates_x), *_ncs(gates_h_rz), *_ncs(h), bias_ih, bias_hh,
        *_ncs(gates), *_ncs(rh), *sizes, HAS_BIAS=has_bias, **meta,
    )
    return gates, rh


def _update_fwd(gates_x, gates_h_n, gates, h, bias_ih, bias_hh, save: bool, *, h_new=None):
    """Launch ``_gru_update_fwd_kernel``: returns ``h_new``; with ``save`` also
    writes n into the third slot of ``gates``."""
    hidden = h.shape[1]
    h_new = _empty(h.shape, h) if h_new is None else h_new
    if h.numel() == 0:
        return h_new
    grid, sizes, meta = _grid_and_meta("gru_update_fwd", h_new, hidden)
    has_bias, bias_ih, bias_hh = _bias_args(bias_ih, bias_hh, h)
    _gru_update_fwd_kernel[grid](
        *_ncs(gates_x), *_ncs(gates_h_n), *_ncs(h), bias_ih, bias_hh,
        *_ncs(gates), *_ncs(h_new), *sizes, HAS_BIAS=has_bias, SAVE=save, **meta,
    )
    return h_new


def _update_bwd(grad, grad2, gates, h, d_gates, *, d_h=None):
    """Launch ``_gru_update_bwd_kernel``: writes d a_z and d a_n into slots 1 and 2
    of ``d_gates`` and returns the direct part of d h, from ``grad + grad2``."""
    hidden = h.shape[1]
    d_h = _empty(h.shape, h) if d_h is None else d_h
    if h.numel() == 0:
        return d_h
    grid, sizes, meta = _grid_and_meta("gru_update_bwd", d_h, hidden)
    _gru_update_bwd_kernel[grid](
        *_ncs(grad), *(_ncs(grad2) if grad2 is not None else (grad, 0, 0, 0)),
        *_ncs(gates), *_ncs(h), *_ncs(d_gates), *_ncs(d_h),
        *sizes, HAS_GRAD2=grad2 is not None, **meta,
    )
    return d_h


def _reset_gate_bwd(d_rh, gates, h, d_gates, d_h):
    """Launch ``_gru_reset_gate_bwd_kernel``: writes d a_r into slot 0 of
    ``d_gates`` and adds ``d_rh * r`` to ``d_h`` in place."""
    if h.numel() == 0:
        return
    hidden = h.shape[1]
    grid, sizes, meta = _grid_and_meta("gru_reset_gate_bwd", d_h, hidden)
    _gru_reset_gate_bwd_kernel[grid](
        *_ncs(d_rh), *_ncs(gates), *_ncs(h), *_ncs(d_gates), *_ncs(d_h), *sizes, **meta,
    )
