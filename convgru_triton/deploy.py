"""Helpers for deploying ConvGRU models: standard operators for exported programs.

Eager mode, ``torch.compile`` and ``torch.export`` run the sequence operator
``convgru_triton::conv_gru_fwd`` (one node per layer and direction, fused
kernels on CUDA). ``torch.jit.trace`` and ``torch.onnx.export`` (both
exporters) record the reference math instead: convolutions and pointwise ops
only, the time loop unrolled. See ``docs/deploying.md``.

An :class:`torch.export.ExportedProgram` therefore contains the operator, which
loads only where ``convgru_triton`` is imported. :func:`decompositions` rewrites
it into standard ATen operators, e.g. before handing the program to a runtime
that only knows ATen, or to ``torch.onnx.export``::

    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions(convgru_triton.deploy.decompositions())
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._conv import ConvSpec, conv_same
from .ops.gates import naive as gate_naive
from .ops.sequence import naive

Tensor = torch.Tensor

__all__ = ["decompositions"]


def _conv_gru_fwd_decomposition(
    gates_x: Tensor,
    h0: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    padding_mode: str,
    reset_after: bool,
    reverse: bool,
    use_triton: bool,
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``conv_gru_fwd`` in standard operators: the same three outputs (states,
    and with ``save`` the gates (r, z, n) and aux the backward would read)."""
    spec = ConvSpec(tuple(kernel_size), tuple(dilation), padding_mode)
    steps, hidden = gates_x.shape[0], h0.shape[1]
    states: List[Tensor] = [h0] * steps
    gates: List[Tensor] = [h0] * steps
    aux: List[Tensor] = [h0] * steps
    h = h0
    for t in naive.step_order(steps, reverse):
        gx = gates_x[t]
        if reset_after:
            h, r, z, n, hn = gate_naive.gru_reset_after_fwd_ref(gx, conv_same(h, weight_hh, spec), h, bias_ih, bias_hh)
            aux[t] = hn
        else:
            r, z, rh = gate_naive.gru_reset_gate_fwd_ref(gx, conv_same(h, weight_hh[: 2 * hidden], spec), h, bias_ih, bias_hh)
            h, n = gate_naive.gru_update_fwd_ref(gx, conv_same(rh, weight_hh[2 * hidden :], spec), z, h, bias_ih, bias_hh)
            aux[t] = rh
        gates[t] = torch.cat([r, z, n], 1)
        states[t] = h
    if not save:
        empty = h0.new_empty((0,))
        return torch.stack(states), empty, empty.clone()
    return torch.stack(states), torch.stack(gates), torch.stack(aux)


def decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """A decomposition table for :meth:`torch.export.ExportedProgram.run_decompositions`
    that replaces the operator ``convgru_triton::conv_gru_fwd`` by standard ATen
    operators (convolutions, sigmoid, tanh, pointwise arithmetic; the time loop
    unrolled, so the number of steps is fixed in the program).

    Returns:
        ``{torch.ops.convgru_triton.conv_gru_fwd.default: function}``; merge it
        with other tables (e.g. ``torch.export.default_decompositions()``) as needed.
    """
    return {torch.ops.convgru_triton.conv_gru_fwd.default: _conv_gru_fwd_decomposition}
