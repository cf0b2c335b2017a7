"""Pure-PyTorch reference of the ConvGRU step: the one definition of the math.

Every fused Triton kernel in :mod:`convgru_triton.ops.conv_gru_cell` has a
``*_ref`` twin here computing the same outputs from the same inputs; the eager
backend (CPU, or wherever Triton is missing) runs these functions, and the
tests compare the kernels against them. Autograd differentiates them, which
gives the reference gradients.

Shapes: ``N`` batch, ``H`` hidden channels, ``S`` spatial dims (1, 2 or 3 of
them). Gate order along the channel dim is ``(r, z, n)`` as in
:class:`torch.nn.GRU`:

* ``gates_x`` (N, 3H, *S): the input convolution ``W_i* x`` without bias.
* ``gates_h`` (N, 3H or 2H, *S): the hidden convolution ``W_h* h`` without bias.
* ``bias_ih``, ``bias_hh`` (3H,) or ``None``.

Update convention (z weights the new candidate, as in RAFT):
``h' = (1 - z) * h + z * n``. :class:`torch.nn.GRU` uses the mirror image,
``h' = (1 - z_gru) * n + z_gru * h``, i.e. ``z = 1 - z_gru``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._conv import ConvSpec, conv_same


def _channel_bias(bias: Optional[torch.Tensor], gate_slice: slice, ndim: int) -> Optional[torch.Tensor]:
    """Bias entries of a gate slice, shaped to broadcast over (N, C, *S)."""
    if bias is None:
        return None
    b = bias[gate_slice]
    return b.view(1, -1, *([1] * (ndim - 2)))


def _add_bias(t: torch.Tensor, *biases: Optional[torch.Tensor]) -> torch.Tensor:
    for b in biases:
        if b is not None:
            t = t + b
    return t


def gru_gates_reset_after_ref(
    gates_x: torch.Tensor,
    gates_h: torch.Tensor,
    h: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
) -> torch.Tensor:
    """Gate math of the ``reset_after=True`` (cuDNN-style) step.

    ``gates_h`` holds all three hidden pre-activations (N, 3H, *S)::

        r  = sigmoid(gx_r + b_ir + gh_r + b_hr)
        z  = sigmoid(gx_z + b_iz + gh_z + b_hz)
        n  = tanh(gx_n + b_in + r * (gh_n + b_hn))
        h' = (1 - z) * h + z * n
    """
    hidden = h.shape[1]
    r_, z_, n_ = slice(0, hidden), slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden)
    nd = h.dim()
    r = torch.sigmoid(_add_bias(gates_x[:, r_] + gates_h[:, r_], _channel_bias(bias_ih, r_, nd), _channel_bias(bias_hh, r_, nd)))
    z = torch.sigmoid(_add_bias(gates_x[:, z_] + gates_h[:, z_], _channel_bias(bias_ih, z_, nd), _channel_bias(bias_hh, z_, nd)))
    hn = _add_bias(gates_h[:, n_], _channel_bias(bias_hh, n_, nd))
    n = torch.tanh(_add_bias(gates_x[:, n_], _channel_bias(bias_ih, n_, nd)) + r * hn)
    return h + z * (n - h)


def gru_reset_gate_ref(
    gates_x: torch.Tensor,
    gates_h_rz: torch.Tensor,
    h: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of the ``reset_after=False`` step: returns ``(r, z, r * h)``.

    ``gates_h_rz`` (N, 2H, *S) holds the hidden pre-activations of r and z::

        r = sigmoid(gx_r + b_ir + gh_r + b_hr)
        z = sigmoid(gx_z + b_iz + gh_z + b_hz)
    """
    hidden = h.shape[1]
    r_, z_ = slice(0, hidden), slice(hidden, 2 * hidden)
    nd = h.dim()
    r = torch.sigmoid(_add_bias(gates_x[:, r_] + gates_h_rz[:, r_], _channel_bias(bias_ih, r_, nd), _channel_bias(bias_hh, r_, nd)))
    z = torch.sigmoid(_add_bias(gates_x[:, z_] + gates_h_rz[:, z_], _channel_bias(bias_ih, z_, nd), _channel_bias(bias_hh, z_, nd)))
    return r, z, r * h


def gru_update_ref(
    gates_x: torch.Tensor,
    gates_h_n: torch.Tensor,
    z: torch.Tensor,
    h: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
) -> torch.Tensor:
    """Second half of the ``reset_after=False`` step.

    ``gates_h_n`` (N, H, *S) is ``W_hn * (r * h)``::

        n  = tanh(gx_n + b_in + gh_n + b_hn)
        h' = (1 - z) * h + z * n
    """
    hidden = h.shape[1]
    n_ = slice(2 * hidden, 3 * hidden)
    nd = h.dim()
    n = torch.tanh(_add_bias(gates_x[:, n_] + gates_h_n, _channel_bias(bias_ih, n_, nd), _channel_bias(bias_hh, n_, nd)))
    return h + z * (n - h)


def conv_gru_cell_ref(
    gates_x: torch.Tensor,
    h: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    spec: ConvSpec,
    reset_after: bool,
) -> torch.Tensor:
    """One ConvGRU step after the input convolution.

    Args:
        gates_x: (N, 3H, *S) input pre-activations ``W_i * x`` (no bias).
        h: (N, H, *S) previous state.
        weight_hh: (3H, H, *k) hidden weights, gate order (r, z, n).
        bias_ih, bias_hh: (3H,) or ``None``.
        spec: the 'same' convolution (kernel size, dilation, padding mode).
        reset_after: ``False``: ``n = tanh(W_in*x + W_hn*(r*h) + b)``;
            ``True``: ``n = tanh(W_in*x + b_in + r*(W_hn*h + b_hn))``.

    Returns:
        (N, H, *S) the new state ``h' = (1 - z) * h + z * n``.
    """
    hidden = h.shape[1]
    if reset_after:
        return gru_gates_reset_after_ref(gates_x, conv_same(h, weight_hh, spec), h, bias_ih, bias_hh)
    _, z, rh = gru_reset_gate_ref(gates_x, conv_same(h, weight_hh[: 2 * hidden], spec), h, bias_ih, bias_hh)
    return gru_update_ref(gates_x, conv_same(rh, weight_hh[2 * hidden :], spec), z, h, bias_ih, bias_hh)
