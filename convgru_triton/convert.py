"""Weight converters: RAFT's ConvGRU / SepConvGRU and :class:`torch.nn.GRU` to
this package's modules (and back where the math allows).

RAFT (Teed and Deng, 2020) writes one ConvGRU step with three convolutions over
the concatenation ``[h, x]`` (hidden channels first)::

    z = sigmoid(convz([h, x]))
    r = sigmoid(convr([h, x]))
    q = tanh(convq([r * h, x]))
    h' = (1 - z) * h + z * q

which is this package's ``reset_after=False`` step with the same update
convention. Each RAFT weight ``(H, H + C_in, kh, kw)`` splits along its input
channels: ``[:, :H]`` acts on the state (rows of ``weight_hh``), ``[:, H:]`` on
the input (rows of ``weight_ih``). RAFT's single bias per gate goes to
``bias_ih``; ``bias_hh`` is set to zero (both biases are summed inside the
same activation, so only their sum matters).

:class:`torch.nn.GRU` uses the gate order (r, z, n), the ``reset_after=True``
candidate ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` and the mirrored
update ``h' = (1 - z') * n + z' * h``. With ``z = 1 - z' = sigmoid(-a_z')`` the
z rows (``[H:2H]``) of both weights and both biases change sign; the linear
weights ``(3H, C)`` become kernel-size-1 convolution weights ``(3H, C, 1, ...)``.
A ConvGRU with kernel size 1 is a GRU applied to every pixel independently,
so the converted modules agree at every spatial size.

Functions:
    from_raft_convgru(module_or_state_dict) -> ConvGRUCell2d
    from_raft_sepconvgru(module_or_state_dict) -> SepConvGRUCell2d
    to_raft_state_dict(cell) -> dict for RAFT's ConvGRU / SepConvGRU ``load_state_dict``
    from_torchvision_raft(model) -> the same torchvision RAFT, its recurrent block swapped in place
    from_torchvision_recurrent_block(block) -> TorchvisionRecurrentBlock
    to_torchvision_raft_state_dict(model) -> dict for an unconverted torchvision RAFT's ``load_state_dict``
    from_torch_gru(gru, dims=2) -> ConvGRU{1,2,3}d (nn.GRU) or ConvGRUCell{1,2,3}d (nn.GRUCell)
    to_torch_gru(module) -> nn.GRU (sequence modules) or nn.GRUCell (cells)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .modules import (
    ConvGRU1d,
    ConvGRU2d,
    ConvGRU3d,
    ConvGRUCell1d,
    ConvGRUCell2d,
    ConvGRUCell3d,
    _ConvGRUCellNd,
    _ConvGRUNd,
)
from .separable import SepConvGRUCell2d

__all__ = [
    "from_raft_convgru",
    "from_raft_sepconvgru",
    "to_raft_state_dict",
    "TorchvisionRecurrentBlock",
    "from_torchvision_raft",
    "from_torchvision_recurrent_block",
    "to_torchvision_raft_state_dict",
    "from_torch_gru",
    "to_torch_gru",
]

_SEQUENCE_CLASSES = {1: ConvGRU1d, 2: ConvGRU2d, 3: ConvGRU3d}
_CELL_CLASSES = {1: ConvGRUCell1d, 2: ConvGRUCell2d, 3: ConvGRUCell3d}

# Gate order of this package and of torch.nn.GRU: (r, z, n). RAFT's names per gate.
_RAFT_GATES = ("convr", "convz", "convq")

Source = Union[nn.Module, Mapping]


# ----------------------------------------------------------------------------
# RAFT
# ----------------------------------------------------------------------------


def _check_raft_conv(function: str, name: str, conv) -> str:
    """Validate one of RAFT's convolutions taken from a module; returns its padding mode."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{function}: expected {name} to be a torch.nn.Conv2d, got {type(conv).__name__}")
    kernel = tuple(conv.kernel_size)
    if tuple(conv.stride) != (1, 1) or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        raise ValueError(
            f"{function}: {name} must have stride 1, dilation 1 and groups 1 (a ConvGRU keeps the spatial "
            f"size), got stride={tuple(conv.stride)}, dilation={tuple(conv.dilation)}, groups={conv.groups}"
        )
    same = tuple((k - 1) // 2 for k in kernel)
    if conv.padding != "same" and (tuple(conv.padding) != same or any(k % 2 == 0 for k in kernel)):
        raise ValueError(
            f"{function}: {name} must pad to keep the spatial size (padding={same} for kernel_size={kernel}, "
            f"or padding='same'), got padding={conv.padding}"
        )
    return conv.padding_mode


def _raft_tensors(function: str, source: Source, names, prefix: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """Weights and biases of RAFT's convolutions ``names`` from a module or state
    dict, keyed ``'<name>.weight'`` / ``'<name>.bias'``; and their padding mode."""
    if isinstance(source, nn.Module):
        if prefix:
            source = source.get_submodule(prefix.rstrip("."))
        modes = set()
        for name in names:
            if not hasattr(source, name):
                raise ValueError(
                    f"{function}: expected a module with attributes {', '.join(names)} (RAFT's layout), "
                    f"got {type(source).__name__} without {name!r}"
                )
            modes.add(_check_raft_conv(function, name, getattr(source, name)))
        if len(modes) != 1:
            raise ValueError(f"{function}: all convolutions must share one padding_mode, got {sorted(modes)}")
        state = {k: v.detach() for k, v in source.state_dict().items()}
        padding_mode = modes.pop()
    elif isinstance(source, Mapping):
        state = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
        padding_mode = "zeros"
    else:
        raise TypeError(
            f"{function}: expected an nn.Module or a state dict (a mapping of names to tensors), "
            f"got {type(source).__name__}"
        )
    tensors = {}
    for name in names:
        key = f"{name}.weight"
        if key not in state:
            hint = ""
            if isinstance(source, Mapping):
                found = sorted(k[: -len(key)] for k in source if k.endswith(key))
                if found:
                    hint = f"; keys ending in {key!r} exist under the prefixes {found[:4]}: pass prefix=..."
            raise ValueError(f"{function}: expected the key {prefix + key!r} in the state dict, not found{hint}")
        tensors[key] = state[key]
        if f"{name}.bias" in state:
            tensors[f"{name}.bias"] = state[f"{name}.bias"]
    with_bias = [name for name in names if f"{name}.bias" in tensors]
    if with_bias and len(with_bias) != len(names):
        raise ValueError(
            f"{function}: either every convolution has a bias or none has, got biases for {with_bias} only"
        )
    return tensors, padding_mode


def _raft_cell_params(function: str, tensors: Dict[str, torch.Tensor], suffix: str, kernel: Optional[Tuple[int, int]]):
    """Split RAFT's (convr, convz, convq) weights over [h, x] into this package's
    ``(weight_ih, weight_hh, bias_ih, bias_hh)``; returns them with (C_in, H, kernel)."""
    weights = [tensors[f"{gate}{suffix}.weight"] for gate in _RAFT_GATES]
    shape = tuple(weights[0].shape)
    for gate, w in zip(_RAFT_GATES, weights):
        if w.dim() != 4 or tuple(w.shape) != shape:
            raise ValueError(
                f"{function}: expected {'/'.join(g + suffix for g in _RAFT_GATES)}.weight to share one shape "
                f"(hidden, hidden + input, kh, kw), got {gate}{suffix}.weight of shape {tuple(w.shape)} "
                f"and {_RAFT_GATES[0]}{suffix}.weight of shape {shape}"
            )
    hidden, cat_channels = shape[0], shape[1]
    in_channels = cat_channels - hidden
    if in_channels < 1:
        raise ValueError(
            f"{function}: expected weights of shape (hidden, hidden + input_channels, kh, kw) with "
            f"input_channels >= 1, got {shape} (hidden={hidden}, so input_channels={in_channels})"
        )
    if kernel is not None and shape[2:] != kernel:
        names = "/".join(g + suffix for g in _RAFT_GATES)
        raise ValueError(f"{function}: expected {names} kernels of size {kernel}, got {shape[2:]}")
    if any(k % 2 == 0 for k in shape[2:]):
        raise ValueError(
            f"{function}: expected odd kernel sizes (RAFT pads k // 2 on both sides), got kernel {shape[2:]}"
        )
    weight_hh = torch.cat([w[:, :hidden] for w in weights])
    weight_ih = torch.cat([w[:, hidden:] for w in weights])
    if f"{_RAFT_GATES[0]}{suffix}.bias" in tensors:
        bias_ih = torch.cat([tensors[f"{gate}{suffix}.bias"] for gate in _RAFT_GATES])
        bias_hh = torch.zeros_like(bias_ih)
    else:
        bias_ih = bias_hh = None
    return (weight_ih, weight_hh, bias_ih, bias_hh), in_channels, hidden, shape[2:]


def _load_cell(cell: _ConvGRUCellNd, params) -> None:
    with torch.no_grad():
        for name, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), params):
            if value is not None:
                getattr(cell, name).copy_(value)


def from_raft_convgru(
    source: Source, *, prefix: str = "", backend: str = "auto", device=None, dtype=None
) -> ConvGRUCell2d:
    """A :class:`~convgru_triton.ConvGRUCell2d` computing exactly RAFT's ``ConvGRU``.

    Args:
        source: RAFT's ``ConvGRU`` module (anything with ``convz``, ``convr``,
            ``convq`` ``nn.Conv2d`` attributes over ``cat([h, x])``) or its state
            dict (keys ``convz.weight``, ``convz.bias``, ...).
        prefix: where the GRU sits in a larger module or state dict, e.g.
            ``'update_block.gru.'`` (or ``'module.update_block.gru.'`` for a
            checkpoint saved from ``DataParallel``).
        backend, device, dtype: of the new cell; device and dtype default to
            those of the source weights.

    Returns:
        ``ConvGRUCell2d(input_dim, hidden_dim, kernel_size)`` with ``reset_after=False``;
        ``cell(x, h)`` equals RAFT's ``gru(h, x)`` (note the argument order).
    """
    fn = "from_raft_convgru"
    tensors, padding_mode = _raft_tensors(fn, source, _RAFT_GATES, prefix)
    params, in_channels, hidden, kernel = _raft_cell_params(fn, tensors, "", None)
    weight = params[0]
    cell = ConvGRUCell2d(
        in_channels, hidden, kernel, bias=params[2] is not None, padding_mode=padding_mode,
        device=weight.device, dtype=weight.dtype, backend=backend,
    )
    _load_cell(cell, params)
    return cell.to(device=device, dtype=dtype) if device is not None or dtype is not None else cell


def from_raft_sepconvgru(
    source: Source, *, prefix: str = "", backend: str = "auto", device=None, dtype=None
) -> SepConvGRUCell2d:
    """A :class:`~convgru_triton.SepConvGRUCell2d` computing exactly RAFT's ``SepConvGRU``.

    Args:
        source: RAFT's ``SepConvGRU`` module (``convz1``, ``convr1``, ``convq1``
            with ``(1, k)`` kernels and ``convz2``, ``convr2``, ``convq2`` with
            ``(k, 1)`` kernels) or its state dict.
        prefix, backend, device, dtype: as in :func:`from_raft_convgru`.

    Returns:
        ``SepConvGRUCell2d(input_dim, hidden_dim, k)``; ``cell(x, h)`` equals
        RAFT's ``gru(h, x)``.
    """
    fn = "from_raft_sepconvgru"
    names = [g + "1" for g in _RAFT_GATES] + [g + "2" for g in _RAFT_GATES]
    tensors, padding_mode = _raft_tensors(fn, source, names, prefix)
    first_shape = tuple(tensors["convz1.weight"].shape)
    if len(first_shape) != 4 or first_shape[2] != 1:
        raise ValueError(
            f"{fn}: expected convz1.weight of shape (hidden, hidden + input, 1, k) (the (1, k) half), "
            f"got {first_shape}"
        )
    k = first_shape[3]
    first, in_channels, hidden, _ = _raft_cell_params(fn, tensors, "1", (1, k))
    second, in2, hidden2, _ = _raft_cell_params(fn, tensors, "2", (k, 1))
    if (in2, hidden2) != (in_channels, hidden):
        raise ValueError(
            f"{fn}: expected the (1, k) and (k, 1) halves to share input and hidden channels, got "
            f"{(in_channels, hidden)} and {(in2, hidden2)}"
        )
    if (first[2] is None) != (second[2] is None):
        raise ValueError(f"{fn}: either every convolution has a bias or none has")
    weight = first[0]
    cell = SepConvGRUCell2d(
        in_channels, hidden, k, bias=first[2] is not None, padding_mode=padding_mode,
        device=weight.device, dtype=weight.dtype, backend=backend,
    )
    _load_cell(cell.horizontal, first)
    _load_cell(cell.vertical, second)
    return cell.to(device=device, dtype=dtype) if device is not None or dtype is not None else cell


def _raft_state_of_cell(fn: str, cell: ConvGRUCell2d, suffix: str) -> Dict[str, torch.Tensor]:
    if cell.reset_after:
        raise ValueError(f"{fn}: RAFT's GRU applies the reset gate before the convolution; expected "
                         f"reset_after=False, got reset_after=True")
    if cell.padding_mode != "zeros" or any(d != 1 for d in cell.dilation) or any(k % 2 == 0 for k in cell.kernel_size):
        raise ValueError(
            f"{fn}: RAFT's convolutions are zero-padded, undilated, with odd kernels; got "
            f"padding_mode={cell.padding_mode!r}, dilation={cell.dilation}, kernel_size={cell.kernel_size}"
        )
    hidden = cell.hidden_channels
    out = {}
    for i, gate in enumerate(_RAFT_GATES):
        rows = slice(i * hidden, (i + 1) * hidden)
        weight = torch.cat([cell.weight_hh[rows], cell.weight_ih[rows]], dim=1)
        if cell.bias_ih is not None:
            bias = cell.bias_ih[rows] + cell.bias_hh[rows]
        else:
            bias = weight.new_zeros(hidden)
        out[f"{gate}{suffix}.weight"] = weight.detach().clone()
        out[f"{gate}{suffix}.bias"] = bias.detach().clone()
    return out


def to_raft_state_dict(cell: Union[ConvGRUCell2d, SepConvGRUCell2d]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`from_raft_convgru` / :func:`from_raft_sepconvgru`: a state
    dict that RAFT's ``ConvGRU`` (for a ``ConvGRUCell2d``) or ``SepConvGRU`` (for a
    ``SepConvGRUCell2d``) loads with ``load_state_dict``. RAFT's bias per gate is
    ``bias_ih + bias_hh`` (zeros for ``bias=False``)."""
    fn = "to_raft_state_dict"
    if isinstance(cell, SepConvGRUCell2d):
        out = _raft_state_of_cell(fn, cell.horizontal, "1")
        out.update(_raft_state_of_cell(fn, cell.vertical, "2"))
        return out
    if isinstance(cell, ConvGRUCell2d):
        return _raft_state_of_cell(fn, cell, "")
    raise TypeError(f"{fn}: expected a ConvGRUCell2d or SepConvGRUCell2d, got {type(cell).__name__}")


# ----------------------------------------------------------------------------
# torchvision's RAFT (torchvision.models.optical_flow)
# ----------------------------------------------------------------------------

# torchvision builds RAFT's GRU as ``update_block.recurrent_block``, a RecurrentBlock
# of two ConvGRU modules, ``convgru1`` then ``convgru2``, each with ``convz``,
# ``convr``, ``convq`` over ``cat([h, x])`` and called ``gru(h, x)``. raft_large:
# (1, 5) then (5, 1) kernels (RAFT's SepConvGRU); raft_small: one 3x3 ConvGRU,
# with a function that returns ``h`` unchanged as ``convgru2``.


class TorchvisionRecurrentBlock(nn.Module):
    """This package's cell in the place of torchvision's ``RecurrentBlock``.

    ``forward(h, x)`` (state first, as torchvision's ``UpdateBlock`` calls its
    recurrent block) returns ``cell(x, h)``. ``h``: ``(N, hidden_size, H, W)``,
    ``x``: ``(N, input_size, H, W)``, in the cell's dtype (or under autocast);
    the result has ``h``'s shape. ``hidden_size`` is kept as torchvision's block
    has it. Made by :func:`from_torchvision_raft` /
    :func:`from_torchvision_recurrent_block`.
    """

    def __init__(self, cell: Union[ConvGRUCell2d, SepConvGRUCell2d]):
        super().__init__()
        if not isinstance(cell, (ConvGRUCell2d, SepConvGRUCell2d)):
            raise TypeError(f"TorchvisionRecurrentBlock: expected a ConvGRUCell2d or SepConvGRUCell2d, "
                            f"got {type(cell).__name__}")
        self.cell = cell
        self.hidden_size = cell.hidden_channels

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.cell(x, h)


def _is_pass_through(fn) -> bool:
    """raft_small's ``convgru2``: a plain function (not a module) returning its first argument."""
    if isinstance(fn, nn.Module) or not callable(fn):
        return False
    h, x = object(), object()
    try:
        return fn(h, x) is h
    except Exception:
        return False


def _torchvision_gru(fn: str, block: nn.Module, name: str) -> nn.Module:
    """``block.<name>``, checked to be torchvision's ConvGRU (three padded, unstrided convolutions)."""
    gru = getattr(block, name)
    if not isinstance(gru, nn.Module) or not all(hasattr(gru, gate) for gate in _RAFT_GATES):
        raise TypeError(
            f"{fn}: expected recurrent_block.{name} to be torchvision's ConvGRU (a module with convz, convr, "
            f"convq), got {type(gru).__name__}"
        )
    for gate in _RAFT_GATES:
        _check_raft_conv(fn, f"recurrent_block.{name}.{gate}", getattr(gru, gate))
    return gru


def _check_trainable(fn: str, block: nn.Module) -> bool:
    """The ``requires_grad`` the new cell's parameters get: that of every parameter of
    ``block`` (each new weight holds parts of several old ones, so they must agree)."""
    flags = {p.requires_grad for p in block.parameters()}
    if len(flags) > 1:
        frozen = sorted(n for n, p in block.named_parameters() if not p.requires_grad)
        raise ValueError(
            f"{fn}: each converted weight joins several of the block's parameters, so either all or none "
            f"may require grad; got requires_grad=False for {frozen[:6]} only"
        )
    return flags.pop() if flags else True


def from_torchvision_recurrent_block(block: nn.Module, *, backend: str = "auto") -> TorchvisionRecurrentBlock:
    """torchvision's RAFT ``RecurrentBlock`` as this package's cell, same outputs.

    Args:
        block: ``model.update_block.recurrent_block`` of a torchvision RAFT:
            ``convgru1``, ``convgru2`` ConvGRU modules with ``(1, k)`` then
            ``(k, 1)`` kernels (``raft_large``: becomes a ``SepConvGRUCell2d``),
            or one ConvGRU ``convgru1`` with odd kernels and a pass-through
            function as ``convgru2`` (``raft_small``: becomes a
            ``ConvGRUCell2d``).
        backend: of the new cell.

    Returns:
        A :class:`TorchvisionRecurrentBlock` whose ``forward(h, x)`` equals
        ``block(h, x)``, on the device and in the dtype of ``block``'s weights,
        in its train/eval mode, with its ``requires_grad``.

    Raises:
        TypeError: ``block`` is not torchvision's RecurrentBlock (no
            ``convgru1``/``convgru2``, or they are not ConvGRU modules).
        ValueError: kernels other than the two layouts above, a strided,
            dilated, grouped or unpadded convolution, mismatched shapes, or
            parameters of which only some require grad.
    """
    fn = "from_torchvision_recurrent_block"
    if isinstance(block, TorchvisionRecurrentBlock):
        raise ValueError(f"{fn}: the recurrent block is converted already (a TorchvisionRecurrentBlock)")
    if not isinstance(block, nn.Module) or not (hasattr(block, "convgru1") and hasattr(block, "convgru2")):
        raise TypeError(
            f"{fn}: expected torchvision's RAFT RecurrentBlock (a module with convgru1 and convgru2), "
            f"got {type(block).__name__}"
        )
    first = _torchvision_gru(fn, block, "convgru1")
    kernel = tuple(first.convz.kernel_size)
    if _is_pass_through(block.convgru2):
        cell = from_raft_convgru(first, backend=backend)
    else:
        second = _torchvision_gru(fn, block, "convgru2")
        kernel2 = tuple(second.convz.kernel_size)
        if kernel[0] != 1 or kernel2 != kernel[::-1]:
            raise ValueError(
                f"{fn}: expected convgru1 with (1, k) kernels and convgru2 with (k, 1) kernels (raft_large's "
                f"layout), or one ConvGRU and a pass-through convgru2 (raft_small's); got kernels {kernel} and "
                f"{kernel2}"
            )
        # RAFT's SepConvGRU names the same six convolutions convz1 ... convq2.
        halves = nn.Module()
        for gate in _RAFT_GATES:
            setattr(halves, gate + "1", getattr(first, gate))
            setattr(halves, gate + "2", getattr(second, gate))
        cell = from_raft_sepconvgru(halves, backend=backend)
    cell.requires_grad_(_check_trainable(fn, block))
    return TorchvisionRecurrentBlock(cell).train(block.training)


def _update_block(fn: str, model) -> nn.Module:
    update_block = getattr(model, "update_block", None)
    if not isinstance(model, nn.Module) or not isinstance(update_block, nn.Module) \
            or not isinstance(getattr(update_block, "recurrent_block", None), nn.Module):
        inner = getattr(model, "module", None)
        hint = (" (a wrapped model: pass model.module)" if isinstance(inner, nn.Module)
                and hasattr(inner, "update_block") else "")
        raise TypeError(
            f"{fn}: expected torchvision's RAFT (raft_large / raft_small: a module with "
            f"update_block.recurrent_block), got {type(model).__name__}{hint}"
        )
    return update_block


def from_torchvision_raft(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Swap the GRU of a torchvision RAFT for this package's cell, in place.

    ``model.update_block.recurrent_block`` becomes a
    :class:`TorchvisionRecurrentBlock` around a ``SepConvGRUCell2d``
    (``raft_large``) or a ``ConvGRUCell2d`` (``raft_small``) holding the same
    weights (:func:`from_torchvision_recurrent_block`); nothing else changes.
    The model's ``forward(image1, image2, num_flow_updates)`` (images
    ``(N, 3, H, W)``, H and W multiples of 8) returns the same flow
    predictions, up to float rounding. Convert before building the optimizer:
    the recurrent block's old parameters leave the model.

    Args:
        model: ``torchvision.models.optical_flow.raft_large(...)`` or
            ``raft_small(...)`` (for ``DataParallel``, its ``.module``).
        backend: of the new cell.

    Returns:
        ``model`` itself. :func:`to_torchvision_raft_state_dict` gives the
        state dict an unconverted torchvision RAFT loads.

    Raises:
        TypeError: ``model`` has no ``update_block.recurrent_block`` of
            torchvision's structure.
        ValueError: as :func:`from_torchvision_recurrent_block`, and when the
            model is converted already.
    """
    fn = "from_torchvision_raft"
    update_block = _update_block(fn, model)
    if isinstance(update_block.recurrent_block, TorchvisionRecurrentBlock):
        raise ValueError(f"{fn}: update_block.recurrent_block is converted already (a TorchvisionRecurrentBlock)")
    update_block.recurrent_block = from_torchvision_recurrent_block(update_block.recurrent_block, backend=backend)
    return model


def _torchvision_state_of_block(block: TorchvisionRecurrentBlock) -> Dict[str, torch.Tensor]:
    """The block's weights under torchvision's keys (``convgru1.convz.weight``, ...)."""
    state = to_raft_state_dict(block.cell)
    suffixes = ("1", "2") if isinstance(block.cell, SepConvGRUCell2d) else ("",)
    # RAFT's SepConvGRU keys "convz1.weight" are torchvision's "convgru1.convz.weight";
    # in torchvision's order (convz, convr, convq: the order its ConvGRU makes them).
    return {f"convgru{suffix or '1'}.{gate}.{kind}": state[f"{gate}{suffix}.{kind}"]
            for suffix in suffixes for gate in ("convz", "convr", "convq") for kind in ("weight", "bias")}


def to_torchvision_raft_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`from_torchvision_raft`: ``model.state_dict()`` with every
    :class:`TorchvisionRecurrentBlock`'s entries under torchvision's keys
    (``...recurrent_block.convgru1.convz.weight``, ``.bias``, ...), so that an
    unconverted ``raft_large`` / ``raft_small`` loads it with ``load_state_dict``.

    Each torchvision weight ``(H, H + C_in, kh, kw)`` is the cell's state and
    input rows side by side; its bias is ``bias_ih + bias_hh``. The other
    entries are ``model.state_dict()``'s, in its order, devices and dtypes.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` holds no converted block (nothing to translate).
    """
    fn = "to_torchvision_raft_state_dict"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected a torchvision RAFT converted by from_torchvision_raft, "
                        f"got {type(model).__name__}")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, TorchvisionRecurrentBlock)}
    if not blocks:
        raise ValueError(
            f"{fn}: expected a model converted by from_torchvision_raft (with a TorchvisionRecurrentBlock), "
            f"got a {type(model).__name__} without one (its own state_dict() is torchvision's already)"
        )
    prefixes = {name: (name + "." if name else "") for name in blocks}
    state = model.state_dict()
    out: Dict[str, torch.Tensor] = OrderedDict()
    done = set()
    for key, value in state.items():
        owner = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
        if owner is None:
            out[key] = value
        elif owner not in done:
            done.add(owner)
            for sub, tensor in _torchvision_state_of_block(blocks[owner]).items():
                out[prefixes[owner] + sub] = tensor
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # load_state_dict reads each module's version from it
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


# ----------------------------------------------------------------------------
# torch.nn.GRU
# ----------------------------------------------------------------------------


def _flip_update_gate(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """Negate rows [H:2H] (the update gate): z = 1 - z' = sigmoid(-a_z')."""
    t = t.detach().clone()
    t[hidden : 2 * hidden].neg_()
    return t


def _check_dims(fn: str, dims) -> int:
    if isinstance(dims, bool) or dims not in (1, 2, 3):
        raise ValueError(f"{fn}: expected dims to be 1, 2 or 3 (spatial dims of the ConvGRU), got {dims!r}")
    return dims


def from_torch_gru(gru: Union[nn.GRU, nn.GRUCell], dims: int = 2, *, backend: str = "auto"):
    """A kernel-size-1 ConvGRU computing exactly ``gru`` at every pixel.

    Args:
        gru: a :class:`torch.nn.GRU` (any ``num_layers``, ``bidirectional``,
            ``batch_first``, ``bias``, ``dropout``) or :class:`torch.nn.GRUCell`.
        dims: spatial dims of the result: 1, 2 or 3.
        backend: of the new module.

    Returns:
        ``ConvGRU{dims}d`` for an ``nn.GRU``, ``ConvGRUCell{dims}d`` for an
        ``nn.GRUCell``, with ``kernel_size=1`` and ``reset_after=True``, on the
        device and in the dtype of ``gru``. The update gate's rows are negated
        (``z = 1 - z'``), so outputs match: ``gru(x)`` on ``(T, N, C)`` equals
        the converted module on ``(T, N, C, 1, 1)`` (for ``dims=2``), and on any
        spatial size it equals ``gru`` run on every pixel.
    """
    fn = "from_torch_gru"
    dims = _check_dims(fn, dims)
    if isinstance(gru, nn.GRU):
        if getattr(gru, "proj_size", 0):
            raise ValueError(f"{fn}: expected proj_size=0, got proj_size={gru.proj_size}")
        weight = gru.weight_ih_l0
        module = _SEQUENCE_CLASSES[dims](
            gru.input_size, gru.hidden_size, 1, num_layers=gru.num_layers, bias=gru.bias,
            batch_first=gru.batch_first, dropout=gru.dropout, bidirectional=gru.bidirectional,
            reset_after=True, device=weight.device, dtype=weight.dtype, backend=backend,
        )
    elif isinstance(gru, nn.GRUCell):
        weight = gru.weight_ih
        module = _CELL_CLASSES[dims](
            gru.input_size, gru.hidden_size, 1, bias=gru.bias, reset_after=True,
            device=weight.device, dtype=weight.dtype, backend=backend,
        )
    else:
        raise TypeError(f"{fn}: expected a torch.nn.GRU or torch.nn.GRUCell, got {type(gru).__name__}")
    hidden = gru.hidden_size
    # Parameter names are the same in torch.nn.GRU(Cell) and in this package.
    ours = dict(module.named_parameters())
    theirs = dict(gru.named_parameters())
    if set(ours) != set(theirs):
        raise ValueError(
            f"{fn}: expected the parameters {sorted(ours)} of a standard torch.nn.GRU, got {sorted(theirs)}"
        )
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(_flip_update_gate(theirs[name], hidden).view(param.shape))
    return module


def to_torch_gru(module: Union[_ConvGRUNd, _ConvGRUCellNd]) -> Union[nn.GRU, nn.GRUCell]:
    """The inverse of :func:`from_torch_gru`: an ``nn.GRU`` (from ``ConvGRU{1,2,3}d``)
    or ``nn.GRUCell`` (from ``ConvGRUCell{1,2,3}d``) computing the same thing per pixel.

    Possible only for ``kernel_size`` of all ones (no spatial mixing) and
    ``reset_after=True`` (torch.nn.GRU's candidate); ``padding_mode`` and
    ``dilation`` have no effect at kernel size 1. Raises ``ValueError`` otherwise.
    """
    fn = "to_torch_gru"
    if not isinstance(module, (_ConvGRUNd, _ConvGRUCellNd)):
        raise TypeError(
            f"{fn}: expected a ConvGRU{{1,2,3}}d or ConvGRUCell{{1,2,3}}d module, got {type(module).__name__}"
        )
    if any(k != 1 for k in module.kernel_size):
        raise ValueError(
            f"{fn}: torch.nn.GRU has no spatial mixing; expected kernel_size of all 1s, "
            f"got kernel_size={module.kernel_size}"
        )
    if not module.reset_after:
        raise ValueError(
            f"{fn}: torch.nn.GRU computes n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); expected "
            f"reset_after=True, got reset_after=False"
        )
    weight = next(module.parameters())
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(module, _ConvGRUNd):
        gru = nn.GRU(
            module.input_channels, module.hidden_channels, num_layers=module.num_layers, bias=module.bias,
            batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional, **factory,
        )
    else:
        gru = nn.GRUCell(module.input_channels, module.hidden_channels, bias=module.bias, **factory)
    ours = dict(module.named_parameters())
    hidden = module.hidden_channels
    with torch.no_grad():
        for name, param in gru.named_parameters():
            param.copy_(_flip_update_gate(ours[name], hidden).view(param.shape))
    return gru
