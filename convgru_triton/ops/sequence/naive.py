"""Pure-PyTorch reference of a whole ConvGRU step and of a layer over a
sequence, built from the gate math's references (:mod:`..gates.naive`):
what torch.jit.trace and the ONNX exporters record, what torch.compile traces
for a cell step, and the oracle of the tests."""

from __future__ import annotations

from typing import Optional

import torch

from ..._conv import ConvSpec, conv_same
from ..gates.naive import gru_reset_after_fwd_ref, gru_reset_gate_fwd_ref, gru_update_fwd_ref

Tensor = torch.Tensor


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


def step_order(steps: int, reverse: bool) -> range:
    """The order of time steps a layer runs: 0..T-1, or T-1..0 with ``reverse``."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


def conv_gru_sequence_ref(
    gates_x: Tensor,
    h0: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    spec: ConvSpec,
    reset_after: bool,
    reverse: bool,
) -> Tensor:
    """One layer and direction over a sequence with :func:`conv_gru_cell_ref`,
    step by step: the operator ``convgru_triton::conv_gru_fwd`` in plain
    PyTorch, differentiable by autograd. This is what ``torch.jit.trace`` and the
    ONNX exporters record (standard convolutions and pointwise ops, the time
    loop unrolled: the number of steps is fixed in the recorded graph).

    Args:
        gates_x: (T, N, 3H, *S) input pre-activations (no bias).
        h0: (N, H, *S) initial state.
        weight_hh, bias_ih, bias_hh, spec, reset_after: as in :func:`conv_gru_cell_ref`.
        reverse: run from the last step to the first.

    Returns:
        (T, N, H, *S): the state after every step, in time order.
    """
    # unbind, not indexing: a traced module then checks at run time that the
    # sequence has the traced number of steps (instead of reading only those).
    frames = gates_x.unbind(0)
    steps = len(frames)
    states = [h0] * steps
    h = h0
    for t in step_order(steps, reverse):
        h = conv_gru_cell_ref(frames[t], h, weight_hh, bias_ih, bias_hh, spec, reset_after)
        states[t] = h
    return torch.stack(states)
