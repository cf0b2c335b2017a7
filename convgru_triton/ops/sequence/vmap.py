"""``torch.vmap`` rules of the sequence operators (``torch.func`` support).

Registered with :func:`torch.library.register_vmap`, so that ``torch.vmap``
(alone or around ``torch.func.grad``, ``vjp``, ``functional_call``) batches the
operators ``convgru_triton::conv_gru_fwd`` and ``conv_gru_bwd`` without a
Python fallback:

* forward, weights and biases not vmapped (the usual case: ``vmap`` over extra
  batch dimensions of the data): the vmapped dimension is folded into the batch
  dimension N, one operator call for everything;
* otherwise (e.g. model ensembling, weights stacked by
  :func:`torch.func.stack_module_state`), and always for the backward (whose
  weight gradient must stay per vmapped sample): one operator call per vmapped
  index, results stacked.

Importing this module registers the rules; :mod:`convgru_triton.functional`
does so.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .op import conv_gru_bwd, conv_gru_fwd

Tensor = torch.Tensor


def _fold(t: Tensor, dim: Optional[int], batch: int, n_axis: int) -> Tensor:
    """Merge the vmapped dim of ``t`` (or a broadcast one when ``dim`` is None)
    into its axis ``n_axis`` (the batch axis N of the unbatched tensor), vmapped
    index major."""
    if dim is None:
        t = t.unsqueeze(n_axis).expand(*t.shape[:n_axis], batch, *t.shape[n_axis:])
    else:
        t = t.movedim(dim, n_axis)
    return t.flatten(n_axis, n_axis + 1)


def _per_index(op, info, in_dims: Sequence[Optional[int]], args: tuple):
    """Call ``op`` once per vmapped index and stack every output along dim 0."""
    outputs: List[tuple] = []
    for i in range(info.batch_size):
        sliced = tuple(
            a.select(d, i) if isinstance(a, Tensor) and d is not None else a for a, d in zip(args, in_dims)
        )
        outputs.append(op(*sliced))
    stacked = tuple(torch.stack(list(parts)) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


@torch.library.register_vmap("convgru_triton::conv_gru_fwd")
def _conv_gru_fwd_vmap(info, in_dims, gates_x, h0, weight_hh, bias_ih, bias_hh, *config):
    gx_dim, h0_dim, w_dim, bi_dim, bh_dim = in_dims[:5]
    if w_dim is not None or bi_dim is not None or bh_dim is not None:
        return _per_index(conv_gru_fwd, info, in_dims, (gates_x, h0, weight_hh, bias_ih, bias_hh, *config))
    batch = info.batch_size
    states, gates, aux = conv_gru_fwd(
        _fold(gates_x, gx_dim, batch, 1), _fold(h0, h0_dim, batch, 0), weight_hh, bias_ih, bias_hh, *config
    )
    outputs, dims = [], []
    for t in (states, gates, aux):
        if t.dim() == 1:  # the empty gates and aux of save=False: not batched
            outputs.append(t)
            dims.append(None)
        else:
            outputs.append(t.unflatten(1, (batch, t.shape[1] // batch)))
            dims.append(1)
    return tuple(outputs), tuple(dims)


@torch.library.register_vmap("convgru_triton::conv_gru_bwd")
def _conv_gru_bwd_vmap(info, in_dims, *args):
    return _per_index(conv_gru_bwd, info, in_dims, args)
