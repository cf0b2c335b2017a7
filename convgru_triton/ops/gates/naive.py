"""Pure-PyTorch reference of the gate math: the one definition of the math.

Every gate kernel in :mod:`convgru_triton.ops.gates.kernels` has a
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

``out=`` (the eager backend): the buffers the results go to, written by the
last op of each formula (``torch.sigmoid(a, out=...)``, ...) instead of being
allocated and then copied; the same ops in the same order. An entry of
``None`` is allocated as usual. Where a buffer is a channel slice of a larger
one with N > 1 (not one contiguous run), ATen's CPU loops split the work into
vector and scalar parts at other places than for a dense result, and a value
can differ from the dense call's in the last bit (seen: 1 float32 ulp in
sigmoid at the end of a run; every result otherwise bit-identical).

Update convention (z weights the new candidate, as in RAFT):
``h' = (1 - z) * h + z * n``. :class:`torch.nn.GRU` uses the mirror image,
``h' = (1 - z_gru) * n + z_gru * h``, i.e. ``z = 1 - z_gru``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


Tensor = torch.Tensor


def _bias(vectors: Sequence[Optional[Tensor]], gates: slice, like: Tensor) -> Optional[Tensor]:
    """The sum of the (3H,) bias ``vectors`` over the channels ``gates``, shaped to
    broadcast over (N, C, *S) tensors like ``like``; ``None`` without biases.
    Summing the vectors first gives a feature map one add instead of two."""
    if vectors[0] is None:
        return None
    b = vectors[0][gates]
    for v in vectors[1:]:
        b = b + v[gates]
    return b.view(1, -1, *([1] * (like.dim() - 2)))


def _plus(t: Tensor, bias: Optional[Tensor]) -> Tensor:
    return t if bias is None else t + bias


def _plus_(t: Tensor, bias: Optional[Tensor], in_place: bool) -> Tensor:
    """:func:`_plus`, into ``t`` (a temporary of the caller's) when ``in_place``:
    the same add without allocating and writing a third feature map. Only the
    eager backend (``out=`` given) adds in place: traced and exported graphs of
    the reference (torch.export decompositions) must stay functional."""
    if bias is None:
        return t
    return t.add_(bias) if in_place else t + bias


def _sigmoid_rz(gates_x: Tensor, gates_h: Tensor, bias_ih, bias_hh, hidden: int,
                out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """r and z from one add and one sigmoid over both gates' 2H channels
    (into ``out``, (N, 2H, *S), when given)."""
    rz = slice(0, 2 * hidden)
    a = _plus_(gates_x[:, rz] + gates_h[:, rz], _bias((bias_ih, bias_hh), rz, gates_x), out is not None)
    r, z = torch.sigmoid(a, out=out).split(hidden, dim=1)
    return r, z


def _into(out, i):
    return None if out is None else out[i]


# --- reset_after=True: one fused kernel per direction ---------------------------


def gru_reset_after_fwd_ref(
    gates_x: Tensor, gates_h: Tensor, h: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], *,
    out: Optional[Tuple[Optional[Tensor], ...]] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gate math of a ``reset_after=True`` (cuDNN-style) step.

    Returns ``(h_new, r, z, n, hn)``, each (N, H, *S); ``out``: buffers
    ``(h_new, rz, n, hn)`` (``rz`` (N, 2H, *S) receives r and z)::

        r  = sigmoid(gx_r + b_ir + gh_r + b_hr)
        z  = sigmoid(gx_z + b_iz + gh_z + b_hz)
        hn = gh_n + b_hn
        n  = tanh(gx_n + b_in + r * hn)
        h' = (1 - z) * h + z * n
    """
    H = h.shape[1]
    r, z = _sigmoid_rz(gates_x, gates_h, bias_ih, bias_hh, H, _into(out, 1))
    n_ = slice(2 * H, 3 * H)
    b_hn = _bias((bias_hh,), n_, h)
    if b_hn is None:
        hn = gates_h[:, n_]
        if out is not None and out[3] is not None:
            hn = out[3].copy_(hn)  # saved for the backward: a buffer of its own
    else:
        hn = torch.add(gates_h[:, n_], b_hn, out=_into(out, 3))
    n = torch.tanh(torch.addcmul(_plus(gates_x[:, n_], _bias((bias_ih,), n_, h)), r, hn), out=_into(out, 2))
    return torch.lerp(h, n, z, out=_into(out, 0)), r, z, n, hn


def gru_reset_after_bwd_ref(
    grad: Tensor, r: Tensor, z: Tensor, n: Tensor, hn: Tensor, h: Tensor, *,
    out: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_reset_after_fwd_ref` given ``grad`` = dL/dh'.

    Returns ``(d_gates_x, d_gates_h, d_h)``: the gradients of the pre-activations
    (N, 3H, *S; they differ only in the n slot, ``d_gh_n = d_gx_n * r``) and the
    direct part of dL/dh (the part through ``gates_h`` goes through the convolution)::

        d_an = g z (1 - n^2);  d_az = g (n - h) z (1 - z);  d_ar = d_an hn r (1 - r)
        d_h  = g (1 - z)

    ``out``: buffers ``(d_gates_x, d_gates_h, d_h)``.
    """
    if out is None:
        d_an = grad * z * (1 - n * n)
        d_az = grad * (n - h) * z * (1 - z)
        d_ar = d_an * hn * r * (1 - r)
        d_h = grad * (1 - z)
        return torch.cat([d_ar, d_az, d_an], 1), torch.cat([d_ar, d_az, d_an * r], 1), d_h
    d_gx, d_gh, d_h = out
    H = h.shape[1]
    d_an = torch.mul(grad * z, 1 - n * n, out=d_gx[:, 2 * H :])
    torch.mul(grad * (n - h) * z, 1 - z, out=d_gx[:, H : 2 * H])
    torch.mul(d_an * hn * r, 1 - r, out=d_gx[:, :H])
    d_gh[:, : 2 * H].copy_(d_gx[:, : 2 * H])
    torch.mul(d_an, r, out=d_gh[:, 2 * H :])
    torch.mul(grad, 1 - z, out=d_h)
    return d_gx, d_gh, d_h


# --- reset_after=False: the reset gate, a convolution, then the update -------------


def gru_reset_gate_fwd_ref(
    gates_x: Tensor, gates_h_rz: Tensor, h: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor], *,
    out: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """First half of a ``reset_after=False`` step: returns ``(r, z, r * h)``
    (``out``: buffers ``(rz, rh)``, rz (N, 2H, *S))::

        r = sigmoid(gx_r + b_ir + gh_r + b_hr)
        z = sigmoid(gx_z + b_iz + gh_z + b_hz)
    """
    r, z = _sigmoid_rz(gates_x, gates_h_rz, bias_ih, bias_hh, h.shape[1], _into(out, 0))
    return r, z, torch.mul(r, h, out=_into(out, 1))


def gru_update_fwd_ref(
    gates_x: Tensor, gates_h_n: Tensor, z: Tensor, h: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
    *, out: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> Tuple[Tensor, Tensor]:
    """Second half of a ``reset_after=False`` step: returns ``(h_new, n)``
    (``out``: buffers ``(h_new, n)``)::

        n  = tanh(gx_n + b_in + gh_n + b_hn)      (gh_n = W_hn * (r * h))
        h' = (1 - z) * h + z * n
    """
    n_ = slice(2 * h.shape[1], 3 * h.shape[1])
    n = torch.tanh(_plus_(gates_x[:, n_] + gates_h_n, _bias((bias_ih, bias_hh), n_, h), out is not None),
                   out=_into(out, 1))
    return torch.lerp(h, n, z, out=_into(out, 0)), n


def gru_update_bwd_ref(grad: Tensor, z: Tensor, n: Tensor, h: Tensor, *,
                       out: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`gru_update_fwd_ref` given ``grad`` = dL/dh', through z's
    sigmoid: returns ``(d_az, d_an, d_h)`` with ``d_h = grad (1 - z)`` the direct
    part (``out``: buffers for the three)."""
    if out is None:
        return grad * (n - h) * z * (1 - z), grad * z * (1 - n * n), grad * (1 - z)
    return (torch.mul(grad * (n - h) * z, 1 - z, out=out[0]), torch.mul(grad * z, 1 - n * n, out=out[1]),
            torch.mul(grad, 1 - z, out=out[2]))


def gru_reset_gate_bwd_ref(d_rh: Tensor, r: Tensor, h: Tensor, *,
                           out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Backward of ``r * h`` through r's sigmoid given ``d_rh`` = dL/d(r * h):
    returns ``(d_ar, d_h)`` with ``d_h = d_rh * r``, to add to dL/dh
    (``out``: the buffer for d_ar)."""
    return torch.mul(d_rh * h * r, 1 - r, out=out), d_rh * r
