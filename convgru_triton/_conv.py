"""'Same'-padded convolutions shared by every backend.

A ConvGRU convolves both the input and the hidden state with stride 1 and
enough padding that the spatial size never changes ('same' padding), so the
state can be fed back step after step. This module owns that convention:
which padding each side gets (also for even kernels and dilation), the four
``padding_mode`` values of :class:`torch.nn.Conv2d`, and the matching
backward used by the fused autograd function.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

IntOrTuple = Union[int, Sequence[int]]


def _to_tuple(name: str, value: IntOrTuple, dims: int) -> Tuple[int, ...]:
    """Expand an int to a ``dims``-tuple and check every entry is a positive int."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}")
    if isinstance(value, int):
        values = (value,) * dims
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(
                f"{name} must be an int or a tuple of {dims} ints, got {type(value).__name__}"
            ) from None
        if len(values) != dims:
            raise ValueError(f"{name} must have {dims} entries for a {dims}-d ConvGRU, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must contain ints, got {value!r}")
        if v < 1:
            raise ValueError(f"{name} entries must be positive, got {value!r}")
    return values


class ConvSpec(NamedTuple):
    """Static description of a 'same' convolution: stride 1, no groups.

    Attributes:
        kernel_size: one size per spatial dim, e.g. ``(3, 3)`` or ``(1, 5)``.
        dilation: one dilation per spatial dim.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Along a dim with kernel ``k`` and dilation ``d`` the total padding is
    ``d * (k - 1)``; the left side gets ``total // 2`` and the right side the
    rest, the split :func:`torch.nn.functional.conv2d` uses for ``padding='same'``.

    A NamedTuple, not a frozen dataclass: torch.compile (torch 2.11) built a
    frozen dataclass made inside a compiled function without its fields
    (``AttributeError: 'ConvSpec' object has no attribute 'kernel_size'``).
    """

    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    padding_mode: str = "zeros"

    @classmethod
    def create(
        cls, dims: int, kernel_size: IntOrTuple, dilation: IntOrTuple = 1, padding_mode: str = "zeros"
    ) -> "ConvSpec":
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        return cls(_to_tuple("kernel_size", kernel_size, dims), _to_tuple("dilation", dilation, dims), padding_mode)

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @property
    def pad_per_dim(self) -> Tuple[Tuple[int, int], ...]:
        """(left, right) padding of each spatial dim, first spatial dim first."""
        pads = []
        for k, d in zip(self.kernel_size, self.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)

    @property
    def conv_padding(self) -> Optional[Tuple[int, ...]]:
        """The ``padding`` argument of ``convNd`` when the convolution can pad by
        itself (zero padding, same amount on both sides), else ``None``."""
        pads = self.pad_per_dim
        if self.padding_mode == "zeros" and all(left == right for left, right in pads):
            return tuple(left for left, _ in pads)
        return None

    @property
    def f_pad(self) -> Tuple[int, ...]:
        """The ``pad`` argument of :func:`torch.nn.functional.pad` (last dim first)."""
        flat = []
        for left, right in reversed(self.pad_per_dim):
            flat += [left, right]
        return tuple(flat)

    def check_spatial_size(self, spatial: Sequence[int], argument: str) -> None:
        """Raise a ``ValueError`` for spatial sizes no 'same' convolution can use:
        a size of 0 (any mode), reflect padding not smaller than the size it pads,
        circular padding larger than the size it wraps around (F.pad's limits)."""
        spatial = tuple(spatial)
        if any(size < 1 for size in spatial):
            raise ValueError(f"{argument} must have every spatial size positive, got spatial size {spatial}")
        for size, (left, right) in zip(spatial, self.pad_per_dim):
            pad = max(left, right)
            if self.padding_mode == "reflect" and pad >= size:
                raise ValueError(
                    f"padding_mode='reflect' needs every spatial size of {argument} larger than the "
                    f"padding {pad}, got spatial size {spatial}"
                )
            if self.padding_mode == "circular" and pad > size:
                raise ValueError(
                    f"padding_mode='circular' needs every spatial size of {argument} at least the "
                    f"padding {pad}, got spatial size {spatial}"
                )


def _pad(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    if spec.padding_mode == "reflect" and x.requires_grad and torch.is_grad_enabled() \
            and torch.are_deterministic_algorithms_enabled():
        return _reflect_pad_deterministic(x, spec)
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return F.pad(x, spec.f_pad, mode=mode)


def _reflect_pad_deterministic(x: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Reflect padding built from narrow, flip and cat, whose backward is
    deterministic everywhere. ``F.pad(mode='reflect')`` has no deterministic
    CUDA backward: under ``torch.use_deterministic_algorithms(True)`` its
    backward raises, so the input convolution (differentiated by autograd)
    pads this way in that mode. Same values as F.pad."""
    for axis, (left, right) in enumerate(spec.pad_per_dim):
        dim, size = 2 + axis, x.shape[2 + axis]
        parts = [x]
        if left:  # pad position p <- input left - p
            parts.insert(0, x.narrow(dim, 1, left).flip(dim))
        if right:  # right pad j <- input size - 2 - j
            parts.append(x.narrow(dim, size - 1 - right, right).flip(dim))
        if len(parts) > 1:
            x = torch.cat(parts, dim)
    return x


def conv_same(x: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Convolve ``x`` (N, C_in, *S) with ``weight`` (C_out, C_in, *k), no bias,
    keeping the spatial size S. Differentiable with ordinary autograd."""
    conv = _CONV_FUNCTIONS[spec.dims]
    padding = spec.conv_padding
    if padding is not None:
        return conv(x, weight, None, 1, padding, spec.dilation)
    return conv(_pad(x, spec), weight, None, 1, 0, spec.dilation)


# Per-spec closures of same_conv, made once: a spec's padding arguments take
# ~5 us of Python to work out, more than a small convolution's dispatch.
_SAME_CONV = {}


def same_conv(spec: ConvSpec):
    """``(forward, backward)``: :func:`conv_same` and :func:`conv_same_backward`
    for ``spec`` with every argument that depends only on the spec worked out
    once (cached per spec), so that a step pays for the convolution call alone:
    ``forward(x, weight)`` and ``backward(grad_output, x, weight, need_input_grad,
    need_weight_grad)``. Same calls, same arguments, same results."""
    if torch.compiler.is_compiling():
        # Traced by torch.compile: no cache. Reading it would guard the graph
        # on its contents and writing it would invalidate that guard, so every
        # new entry, from any call, would recompile the graph (seen with
        # TORCH_LOGS=recompiles: "not ___dict_contains(ConvSpec(...), _SAME_CONV)").
        return _make_same_conv(spec)
    pair = _SAME_CONV.get(spec)
    if pair is None:
        pair = _SAME_CONV[spec] = _make_same_conv(spec)
    return pair


def _make_same_conv(spec: ConvSpec):
    padding = spec.conv_padding
    if padding is None:  # F.pad first: the general functions
        def forward(x, weight):
            return conv_same(x, weight, spec)

        def backward(grad_output, x, weight, need_input_grad, need_weight_grad):
            return conv_same_backward(grad_output, x, weight, spec, need_input_grad, need_weight_grad)
    else:
        conv, dilation, dims = _CONV_FUNCTIONS[spec.dims], spec.dilation, spec.dims
        args = ([1] * dims, list(padding), list(dilation), False, [0] * dims, 1)
        masks = {(i, w): [i, w, False] for i in (False, True) for w in (False, True)}
        convolution_backward = torch.ops.aten.convolution_backward.default

        def forward(x, weight):
            return conv(x, weight, None, 1, padding, dilation)

        def backward(grad_output, x, weight, need_input_grad, need_weight_grad):
            grad_input, grad_weight, _ = convolution_backward(
                grad_output, x, weight, None, *args, masks[need_input_grad, need_weight_grad]
            )
            return grad_input, grad_weight
    return forward, backward


def conv_same_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    spec: ConvSpec,
    need_input_grad: bool,
    need_weight_grad: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`conv_same` with respect to ``x`` and ``weight``.

    One ``aten.convolution_backward`` call computes both (cuDNN on CUDA). When
    the padding is not done by the convolution itself, the padded input is
    rebuilt (a cheap copy) and the gradient is carried back through the pad
    by :func:`_pad_backward`.
    """
    if not (need_input_grad or need_weight_grad):
        return None, None
    padding = spec.conv_padding
    conv_input = x if padding is not None else _pad(x, spec)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_output,
        conv_input,
        weight,
        None,
        [1] * spec.dims,
        list(padding) if padding is not None else [0] * spec.dims,
        list(spec.dilation),
        False,
        [0] * spec.dims,
        1,
        [need_input_grad, need_weight_grad, False],
    )
    if need_input_grad and padding is None:
        grad_input = _pad_backward(grad_input, spec)
    return grad_input, grad_weight


def _pad_backward(grad: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """Gradient of :func:`_pad`: each padded element's gradient goes back to the
    input element it was copied from. Written out rather than left to autograd
    because it runs inside custom operators, below the autograd dispatch.
    Deterministic: every sum has a fixed order (no atomics on repeated indices)."""
    mode = spec.padding_mode
    for axis, (left, right) in enumerate(spec.pad_per_dim):
        dim = 2 + axis
        size = grad.shape[dim] - left - right
        inner = grad.narrow(dim, left, size)
        if mode == "zeros" or (left == 0 and right == 0):
            grad = inner
            continue
        inner = inner.clone()
        left_pad, right_pad = grad.narrow(dim, 0, left), grad.narrow(dim, left + size, right)
        if mode == "replicate":
            inner.narrow(dim, 0, 1).add_(left_pad.sum(dim, keepdim=True))
            inner.narrow(dim, size - 1, 1).add_(right_pad.sum(dim, keepdim=True))
        else:
            if mode == "reflect":  # pad position p <- input left - p; right pad j <- size - 2 - j
                from_left = torch.arange(left, 0, -1, device=grad.device)
                from_right = torch.arange(size - 2, size - 2 - right, -1, device=grad.device)
            else:  # circular: left pad p <- size - left + p; right pad j <- j
                from_left = torch.arange(size - left, size, device=grad.device)
                from_right = torch.arange(0, right, device=grad.device)
            # Within one pad the source indices are distinct, so index_add_ is exact.
            inner.index_add_(dim, from_left, left_pad)
            inner.index_add_(dim, from_right, right_pad)
        grad = inner
    return grad
