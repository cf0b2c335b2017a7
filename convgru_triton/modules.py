"""ConvGRU modules: ``ConvGRUCell{1,2,3}d`` (one step) and ``ConvGRU{1,2,3}d``
(sequences, stacked layers, bidirectional), following the conventions of
:class:`torch.nn.GRUCell`, :class:`torch.nn.GRU` and :class:`torch.nn.Conv2d`.

The math, per step, with ``*`` a 'same'-padded convolution and gate order
(r, z, n) along the output channels of every weight::

    r  = sigmoid(W_ir * x + b_ir + W_hr * h + b_hr)
    z  = sigmoid(W_iz * x + b_iz + W_hz * h + b_hz)
    n  = tanh(W_in * x + b_in + W_hn * (r * h) + b_hn)     reset_after=False
    n  = tanh(W_in * x + b_in + r * (W_hn * h + b_hn))     reset_after=True
    h' = (1 - z) * h + z * n

``z`` weights the new candidate (the convention of RAFT and of the original
ConvGRU write-ups); :class:`torch.nn.GRU` writes ``h' = (1 - z') * n + z' * h``,
so ``z = 1 - z' = sigmoid(-a')``: negating the z rows (``[H:2H]``) of both
weights and both biases converts one into the other.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._backend import check_backend_name
from ._conv import ConvSpec
from ._plan import cell_forward
from .functional import conv_gru


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _init_uniform(weight: nn.Parameter, bias: Optional[nn.Parameter]) -> None:
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = channels * kernel volume:
    # the bound torch.nn.Conv2d's default initialisation works out to.
    bound = 1.0 / math.sqrt(weight.numel() // weight.shape[0])
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


# Arguments of torch.nn.Conv2d that a ConvGRU cannot take, and why.
_UNSUPPORTED = {
    "stride": "a ConvGRU's convolutions have stride 1 and 'same' padding, so the state keeps the input's "
              "spatial size from step to step; downsample the input before the ConvGRU instead",
    "padding": "padding is always 'same' (the state keeps its spatial size); padding_mode chooses how",
    "groups": "grouped convolutions are not supported",
    "output_padding": "a ConvGRU has no transposed convolution",
}


def _refuse_unsupported(owner: str, arguments: dict) -> None:
    """A TypeError naming the first argument the module does not take and why
    (Python's own message would name only the argument)."""
    for name in arguments:
        why = _UNSUPPORTED.get(name, "see the module's docstring for the arguments it takes")
        raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}: {why}")


def _refuse_script(module: nn.Module):
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and on
    every submodule before compiling: refuse there, with the ways that work,
    instead of TorchScript's error about some line of this package."""
    raise RuntimeError(
        f"{type(module).__name__} cannot be compiled by torch.jit.script (its forward validates "
        "arguments and picks a backend in Python). Use torch.jit.trace(module, example_inputs) "
        "for TorchScript, torch.export.export or torch.onnx.export for deployment, or "
        "torch.compile for speed; see docs/deploying.md"
    )


class _ConvGRUBase(nn.Module):
    _dims: int = 2
    _cell_plans = None  # the eager step's plans (convgru_triton._plan), made at the first call
    _weight_casts = None  # their kept weight casts (convgru_triton._plan._weight_casts)

    def __prepare_scriptable__(self):
        _refuse_script(self)

    def __getstate__(self):
        # The cell's plans (convgru_triton._plan) hold compiled-kernel handles:
        # never copied or pickled; a copy makes its own at its first call.
        state = self.__dict__.copy()
        state.pop("_cell_plans", None)
        state.pop("_weight_casts", None)
        return state

    def _init_common(
        self, input_channels, hidden_channels, kernel_size, bias, reset_after, padding_mode, dilation, backend
    ) -> None:
        self.input_channels = _check_positive_int("input_channels", input_channels)
        self.hidden_channels = _check_positive_int("hidden_channels", hidden_channels)
        spec = ConvSpec.create(self._dims, kernel_size, dilation, padding_mode)
        self.kernel_size = spec.kernel_size
        self.dilation = spec.dilation
        self.padding_mode = padding_mode
        self.bias = bool(bias)
        self.reset_after = bool(reset_after)
        self.backend = check_backend_name(backend)

    def _new_cell_parameters(self, in_channels: int, factory) -> List[Optional[nn.Parameter]]:
        gates = 3 * self.hidden_channels
        weight_ih = nn.Parameter(torch.empty((gates, in_channels) + self.kernel_size, **factory))
        weight_hh = nn.Parameter(torch.empty((gates, self.hidden_channels) + self.kernel_size, **factory))
        bias_ih = nn.Parameter(torch.empty(gates, **factory)) if self.bias else None
        bias_hh = nn.Parameter(torch.empty(gates, **factory)) if self.bias else None
        return [weight_ih, weight_hh, bias_ih, bias_hh]

    def _common_repr(self) -> str:
        s = f"{self.input_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if not self.bias:
            s += ", bias=False"
        if self.reset_after:
            s += ", reset_after=True"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class _ConvGRUCellNd(_ConvGRUBase):
    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size,
        bias: bool = True,
        reset_after: bool = False,
        padding_mode: str = "zeros",
        dilation=1,
        device=None,
        dtype=None,
        backend: str = "auto",
        **unsupported,
    ) -> None:
        _refuse_unsupported(type(self).__name__, unsupported)
        super().__init__()
        self._init_common(input_channels, hidden_channels, kernel_size, bias, reset_after, padding_mode, dilation, backend)
        factory = {"device": device, "dtype": dtype}
        weight_ih, weight_hh, bias_ih, bias_hh = self._new_cell_parameters(input_channels, factory)
        self.weight_ih, self.weight_hh = weight_ih, weight_hh
        # Registered also when None (bias=False), as torch.nn.GRUCell does: the
        # cell's plan reads all four from _parameters.
        self.register_parameter("bias_ih", bias_ih)
        self.register_parameter("bias_hh", bias_hh)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_uniform(self.weight_ih, self.bias_ih)
        _init_uniform(self.weight_hh, self.bias_hh)

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: input (N, C_in, *S) or (C_in, *S); hx (N, H, *S) or (H, *S), zeros
        if ``None``. Returns h' shaped like hx, in hx's memory layout (the
        input's when hx is ``None``); see :func:`~convgru_triton.functional.conv_gru_cell`
        for the internal layout (``CONVGRU_TRITON_LAYOUT``)."""
        return cell_forward(self, input, hx)

    def extra_repr(self) -> str:
        return self._common_repr()


_CELL_DOC = """A ConvGRU cell over {d}-D feature maps: one time step.

    Args:
        input_channels: channels C_in of the input.
        hidden_channels: channels H of the state.
        kernel_size: int or tuple of {d} ints (e.g. ``{example}``); any size works,
            even ones, with 'same' padding (the left side gets the smaller half).
        bias: add the learnable biases ``bias_ih`` and ``bias_hh``.
        reset_after: ``False`` (default): ``n = tanh(W_in*x + W_hn*(r*h) + b)``;
            ``True`` (cuDNN/torch.nn.GRU style): ``n = tanh(W_in*x + b_in + r*(W_hn*h + b_hn))``.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        dilation: int or tuple of {d} ints.
        device, dtype: factory arguments of the parameters.
        backend: ``'auto'`` (Triton on CUDA, eager PyTorch elsewhere), ``'torch'``
            or ``'triton'``; see :func:`convgru_triton.explain_backend`.

    Shapes:
        input: (N, C_in, {s}) or unbatched (C_in, {s}).
        hx: (N, H, {s}) or unbatched (H, {s}); zeros when omitted.
        output: h', shaped like hx, in hx's memory layout (the input's when
            hx is omitted). On CUDA in float16/bfloat16 a 2-D or 3-D cell computes in
            channels_last (``CONVGRU_TRITON_LAYOUT``, docs/what-runs-where.md);
            ``module.to(memory_format=torch.channels_last)`` (3-D:
            ``torch.channels_last_3d``) saves the weights' conversion at every call.

    Parameters (gate order (r, z, n), as in torch.nn.GRU):
        weight_ih: (3H, C_in, {k}); weight_hh: (3H, H, {k});
        bias_ih, bias_hh: (3H,). Initialised from U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        fan_in = channels * kernel volume of the weight each belongs with.

    Update: ``h' = (1 - z) * h + z * n``; torch.nn.GRU's update gate is ``1 - z``.
    """


class ConvGRUCell1d(_ConvGRUCellNd):
    _dims = 1
    __doc__ = _CELL_DOC.format(d=1, s="L", k="k", example="5")


class ConvGRUCell2d(_ConvGRUCellNd):
    _dims = 2
    __doc__ = _CELL_DOC.format(d=2, s="H_in, W_in", k="k_h, k_w", example="(1, 5)")


class ConvGRUCell3d(_ConvGRUCellNd):
    _dims = 3
    __doc__ = _CELL_DOC.format(d=3, s="D, H_in, W_in", k="k_d, k_h, k_w", example="(3, 3, 3)")


class _ConvGRUNd(_ConvGRUBase):
    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        reset_after: bool = False,
        padding_mode: str = "zeros",
        dilation=1,
        device=None,
        dtype=None,
        backend: str = "auto",
        **unsupported,
    ) -> None:
        _refuse_unsupported(type(self).__name__, unsupported)
        super().__init__()
        self._init_common(input_channels, hidden_channels, kernel_size, bias, reset_after, padding_mode, dilation, backend)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        self._flat_weight_names: List[List[str]] = []
        for layer in range(num_layers):
            layer_in = input_channels if layer == 0 else hidden_channels * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                names = [f"weight_ih{suffix}", f"weight_hh{suffix}", f"bias_ih{suffix}", f"bias_hh{suffix}"]
                for name, param in zip(names, self._new_cell_parameters(layer_in, factory)):
                    if param is None:
                        self.register_parameter(name, None)
                    else:
                        self.register_parameter(name, param)
                self._flat_weight_names.append(names)
        self.reset_parameters()

    @property
    def all_weights(self) -> List[Tuple[Optional[torch.Tensor], ...]]:
        """One ``(weight_ih, weight_hh, bias_ih, bias_hh)`` tuple per layer and
        direction, in the order of ``h_n``."""
        return [tuple(getattr(self, name) for name in names) for names in self._flat_weight_names]

    def reset_parameters(self) -> None:
        for weight_ih, weight_hh, bias_ih, bias_hh in self.all_weights:
            _init_uniform(weight_ih, bias_ih)
            _init_uniform(weight_hh, bias_hh)

    def forward(
        self, input: torch.Tensor, hx: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args: input (T, N, C_in, *S), (N, T, C_in, *S) if batch_first, or
        unbatched (T, C_in, *S); hx (L*D, N, H, *S), unbatched (L*D, H, *S),
        zeros if ``None``. Returns ``(output, h_n)``."""
        return conv_gru(
            input,
            hx,
            self.all_weights,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            dropout=self.dropout,
            training=self.training,
            reset_after=self.reset_after,
            padding_mode=self.padding_mode,
            dilation=self.dilation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = self._common_repr()
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


_SEQ_DOC = """A multi-layer ConvGRU over sequences of {d}-D feature maps.

    Arguments as in :class:`ConvGRUCell{d}d`, plus (as in torch.nn.GRU):
        num_layers: stacked layers; layer l > 0 reads layer l-1's output.
        batch_first: input and output are (N, T, ...) instead of (T, N, ...).
        dropout: dropout on every layer's output but the last, in training.
        bidirectional: add a layer running backwards in time; outputs are
            concatenated along channels (forward first).

    Shapes (L = num_layers, D = 2 if bidirectional else 1):
        input: (T, N, C_in, {s}), (N, T, C_in, {s}) if batch_first, or unbatched
            (T, C_in, {s}). Spatial sizes are free; they are never fixed at construction.
        hx: (L*D, N, H, {s}) or unbatched (L*D, H, {s}); zeros when omitted.
        output: (T, N, D*H, {s}) (batch first if batch_first): the last layer's state at every step.
        h_n: (L*D, N, H, {s}): the final state of every layer and direction.

    Parameters, per layer ``l`` (suffix ``_reverse`` for the backward direction),
    named as in torch.nn.GRU, gate order (r, z, n):
        weight_ih_l{{l}}: (3H, C_in or D*H, {k}); weight_hh_l{{l}}: (3H, H, {k});
        bias_ih_l{{l}}, bias_hh_l{{l}}: (3H,).

    A batch of size 0 gives empty outputs; a sequence of length 0 raises ValueError.
    """


class ConvGRU1d(_ConvGRUNd):
    _dims = 1
    __doc__ = _SEQ_DOC.format(d=1, s="L", k="k")


class ConvGRU2d(_ConvGRUNd):
    _dims = 2
    __doc__ = _SEQ_DOC.format(d=2, s="H_in, W_in", k="k_h, k_w")


class ConvGRU3d(_ConvGRUNd):
    _dims = 3
    __doc__ = _SEQ_DOC.format(d=3, s="D, H_in, W_in", k="k_d, k_h, k_w")


ConvGRUCell = ConvGRUCell2d
ConvGRU = ConvGRU2d
