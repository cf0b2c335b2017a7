"""Pure-PyTorch reference of the ConvGRU step: the one definition of the math.

Every fused Triton kernel in :mod:`convgru_triton.ops.conv_gru_cell` has a
``*_ref`` twin here with the same name (``_gru_update_fwd_kernel`` ↔
:func:`gru_update_fwd_ref`) computing the same outputs from the same inputs.
The eager backend (CPU, or wherever Triton is missing) runs these functions,
and the tests compare the kernels against them. The backward refs are checked
against autograd of the forward refs, and :func:`conv_gru_cell_ref` (plain
autograd through the forward refs) is the oracle for whole steps.

Shapes: ``N`` batch, ``H`` hidden channels, ``S`` spatial dims (1, 2 or 3 of
them). Gate order along the channel dim is ``(r, z, n)`` as in
:class:`torch.nn.GRU`:

* ``gates_x`` (N, 3H, *S): the input convolution ``W_i * x`` without bias.
* ``gates_h`` (N, 3H, *S) or ``gates_h_rz`` (N, 2H, *S): the hidden convolution
  ``W_h * h`` without bias; ``gates_h_n`` (N, H, *S): ``W_hn * (r * h)``.
* ``bias_ih``, ``bias_hh`` (3H,) or ``None``.

Update convention (z weights the new candidate, as in RAFT):
``h' = (1 - z) * h + z * n``. :class:`torch.nn.GRU` uses the mirror image,
``h' = (1 - z_gru) * n + z_gru * h``, i.e. ``z = 1 - z_gru``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._conv import ConvSpec, conv_same

Tensor = torch.Tensor


def _gate_bias(bias: Optional[Tensor], gate: int, like: Tensor) -> Optional[Tensor]:
    """Gate ``gate`` (0 = r, 1 = z, 2 = n) of a (3H,) bias, shaped to broadcast
    over (N, H, *S) tensors like ``like``."""
    if bias is None:
        return None
    hidden = like.shape[1]
    return bias[gate * hidden : (gate + 1) * hidden].view(1, -1, *([1] * (like.dim() - 2)))


def _plus(t: Tensor, *biases: Optional[Tensor]) -> Tensor:
    for b in biases:
        if b is not None:
            t = t + b
    return t


def _gate(t: Tensor, gate: int, hidden: int) -> Tensor:
    return t[:, gate * hidden : (gate + 1) * hidden]


# --- reset_after=True: one fused kernel per direction ---------------------------


def gru_reset_after_fwd_ref(
    gates_x: Tensor, gates_h: Tensor, h: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gate math of a ``reset_after=True`` (cuDNN-style) step.

    Returns ``(h_new, r, z, n, hn)``, each (N, H, *S)::

        r  = sigmoid(gx_r + b_ir + gh_r + b_hr)
        z  = sigmoid(gx_z + b_iz + gh_z + b_hz)
        hn = gh_n + b_hn
        n  = tanh(gx_n + b_in + r * hn)
        h' = (1 - z) * h + z * n
    """
    H = h.shape[1]
    r = torch.sigmoid(_plus(_gate(gates_x, 0, H) + _gate(gates_h, 0, H), _gate_bias(bias_ih, 0, h), _gate_bias(bias_hh, 0, h)))
    z = torch.sigmoid(_plus(_gate(gates_x, 1, H) + _gate(gates_h, 1, H), _gate_bias(bias_ih, 1, h), _gate_bias(bias_hh, 1, h)))
    hn = _plus(_gate(gates_h, 2, H), _gate_bias(bias_hh, 2, h))
    n = torch.tanh(_plus(_gate(gates_x, 2, H), _gate_bias(bias_ih, 2, h)) + r * hn)
    return h + z * (n - h), r, z, n, hn


def gru_reset_after_bwd_ref(
    grad: Tensor, r: Tensor, z: Tensor, n: Tensor, hn: Tensor, h: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_reset_after_fwd_ref` given ``grad`` = dL/dh'.

    Returns ``(d_gates_x, d_gates_h, d_h)``: the gradients of the pre-activations
    (N, 3H, *S; they differ only in the n slot, ``d_gh_n = d_gx_n * r``) and the
    direct part of dL/dh (the part through ``gates_h`` goes through the convolution)::

        d_an = g z (1 - n^2);  d_az = g (n - h) z (1 - z);  d_ar = d_an hn r (1 - r)
        d_h  = g (1 - z)
    """
    d_an = grad * z * (1 - n * n)
    d_az = grad * (n - h) * z * (1 - z)
    d_ar = d_an * hn * r * (1 - r)
    d_h = grad * (1 - z)
    return torch.cat([d_ar, d_az, d_an], 1), torch.cat([d_ar, d_az, d_an * r], 1), d_h


# --- reset_after=False: the reset gate, a convolution, then the update -------------


def gru_reset_gate_fwd_ref(
    gates_x: Tensor, gates_h_rz: Tensor, h: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    """First half of a ``reset_after=False`` step: returns ``(r, z, r * h)``::

        r = sigmoid(gx_r + b_ir + gh_r + b_hr)
        z = sigmoid(gx_z + b_iz + gh_z + b_hz)
    """
    H = h.shape[1]
    r = torch.sigmoid(_plus(_gate(gates_x, 0, H) + _gate(gates_h_rz, 0, H), _gate_bias(bias_ih, 0, h), _gate_bias(bias_hh, 0, h)))
    z = torch.sigmoid(_plus(_gate(gates_x, 1, H) + _gate(gates_h_rz, 1, H), _gate_bias(bias_ih, 1, h), _gate_bias(bias_hh, 1, h)))
    return r, z, r * h


def gru_update_fwd_ref(
    gates_x: Tensor, gates_h_n: Tensor, z: Tensor, h: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Second half of a ``reset_after=False`` step: returns ``(h_new, n)``::

        n  = tanh(gx_n + b_in + gh_n + b_hn)      (gh_n = W_hn * (r * h))
        h' = (1 - z) * h + z * n
    """
    H = h.shape[1]
    n = torch.tanh(_plus(_gate(gates_x, 2, H) + gates_h_n, _gate_bias(bias_ih, 2, h), _gate_bias(bias_hh, 2, h)))
    return h + z * (n - h), n


def gru_update_bwd_ref(grad: Tensor, z: Tensor, n: Tensor, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_update_fwd_ref` given ``grad`` = dL/dh', through z's
    sigmoid: returns ``(d_az, d_an, d_h)`` with ``d_h = grad (1 - z)`` the direct part."""
    return grad * (n - h) * z * (1 - z), grad * z * (1 - n * n), grad * (1 - z)


def gru_reset_gate_bwd_ref(d_rh: Tensor, r: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
    """Backward of ``r * h`` through r's sigmoid given ``d_rh`` = dL/d(r * h):
    returns ``(d_ar, d_h)`` with ``d_h = d_rh * r``, to add to dL/dh."""
    return d_rh * h * r * (1 - r), d_rh * r


# --- a whole step ----------------------------------------------------------------


def conv_gru_cell_ref(
    gates_x: Tensor,
    h: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    spec: ConvSpec,
    reset_after: bool,
) -> Tensor:
    """One ConvGRU step after the input convolution; differentiable by autograd.

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
    H = h.shape[1]
    if reset_after:
        return gru_reset_after_fwd_ref(gates_x, conv_same(h, weight_hh, spec), h, bias_ih, bias_hh)[0]
    _, z, rh = gru_reset_gate_fwd_ref(gates_x, conv_same(h, weight_hh[: 2 * H], spec), h, bias_ih, bias_hh)
    return gru_update_fwd_ref(gates_x, conv_same(rh, weight_hh[2 * H :], spec), z, h, bias_ih, bias_hh)[0]
