"""Pure-PyTorch reference of the fused step: what its forward and backward
kernels (:mod:`.kernels`) must write, from the gate math's references
(:mod:`..gates.naive`) and 'same' convolutions: one step forward
(:func:`reference_step`), its data gradients (:func:`reference_backward_step`)
and the weight gradient of one 'same' convolution that ``_launch_wgrad``
writes (:func:`wgrad_ref`)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._conv import ConvSpec, conv_same
from ..gates import naive
from ..sequence.naive import conv_gru_cell_ref

Tensor = torch.Tensor


def reference_step(reset_after: bool, spec: ConvSpec, gx: Tensor, h: Tensor, weight_hh: Tensor,
                   bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(h_new, gates, aux)`` of one step from the ``*_ref`` functions of
    :mod:`..gates.naive` and :func:`~convgru_triton._conv.conv_same`: what
    :func:`~.kernels.forward_step` must write with ``save`` (gates (N, 3H, *S) = (r, z, n);
    aux = ``W_hn * h + b_hn`` with ``reset_after``, else ``r * h``)."""
    hidden = h.shape[1]
    if reset_after:
        h_new, r, z, n, hn = naive.gru_reset_after_fwd_ref(gx, conv_same(h, weight_hh, spec), h, bias_ih, bias_hh)
        return h_new, torch.cat([r, z, n], 1), hn
    r, z, rh = naive.gru_reset_gate_fwd_ref(gx, conv_same(h, weight_hh[: 2 * hidden], spec), h, bias_ih, bias_hh)
    h_new, n = naive.gru_update_fwd_ref(gx, conv_same(rh, weight_hh[2 * hidden:], spec), z, h, bias_ih, bias_hh)
    return h_new, torch.cat([r, z, n], 1), rh


def reference_backward_step(reset_after: bool, spec: ConvSpec, grad: Tensor, gx: Tensor, h: Tensor,
                            weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]
                            ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(d_gx, d_gh, d_h)`` that :func:`~.kernels.backward_step` must write for dL/dh' =
    ``grad``, by autograd through :func:`~..sequence.naive.conv_gru_cell_ref` (the
    ``*_ref`` functions): d_gx = dL/d gates_x, d_h = dL/dh; with
    ``reset_after`` d_gh = dL/d(W_h * h) (= d_gx with its n slot times r), else
    ``None``."""
    hidden = h.shape[1]
    gx, h = gx.detach().requires_grad_(), h.detach().requires_grad_()
    with torch.enable_grad():
        if not reset_after:
            out = conv_gru_cell_ref(gx, h, weight_hh, bias_ih, bias_hh, spec, False)
            d_gx, d_h = torch.autograd.grad(out, (gx, h), grad)
            return d_gx, None, d_h
        gh = conv_same(h, weight_hh, spec)
        out = naive.gru_reset_after_fwd_ref(gx, gh, h, bias_ih, bias_hh)[0]
        d_gx, d_gh, d_h = torch.autograd.grad(out, (gx, gh, h), grad)
    return d_gx, d_gh, d_h


def wgrad_ref(spec: ConvSpec, dy: Tensor, src: Tensor, src2: Optional[Tensor] = None, split: Optional[int] = None,
              bias: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``(d_w, d_b)`` that :func:`~.kernels._launch_wgrad` must write, by autograd
    through :func:`~convgru_triton._conv.conv_same` in ``dy``'s dtype (float64
    for a reference): d_w (O, C, kh, kw) the gradient of the weight of
    ``conv_same(src, W)`` (src (N, C, Y, X)) whose output (N, O, Y, X) has
    gradient ``dy``; with ``src2`` (N, C, Y, X), rows ``split:`` convolve
    ``src2`` instead (W_hh of a GRU: W_hrz from h, W_hn from r * h). d_b (O,)
    = ``dy`` summed over batch and space with ``bias``, else ``None``."""
    weight = torch.zeros(dy.shape[1], src.shape[1], *spec.kernel_size, dtype=dy.dtype, device=dy.device,
                         requires_grad=True)
    with torch.enable_grad():
        if src2 is None:
            out = conv_same(src.to(dy.dtype), weight, spec)
        else:
            out = torch.cat([conv_same(src.to(dy.dtype), weight[:split], spec),
                             conv_same(src2.to(dy.dtype), weight[split:], spec)], 1)
        (d_w,) = torch.autograd.grad(out, weight, dy)
    return d_w, dy.sum((0, 2, 3)) if bias else None
