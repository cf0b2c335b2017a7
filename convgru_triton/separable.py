"""A separable ConvGRU cell: RAFT's ``SepConvGRU`` as a module of this package.

One step is two ConvGRU updates of the same state with the same input, first
with ``(1, k)`` kernels (along the width), then with ``(k, 1)`` kernels (along
the height)::

    h_mid = ConvGRUCell2d(kernel (1, k))(x, h)
    h'    = ConvGRUCell2d(kernel (k, 1))(x, h_mid)

Two thin convolutions see a ``k x k`` neighbourhood in one step (a cross, not a
square) at ``2 * k`` instead of ``k * k`` weights per channel pair, which is why
RAFT uses it with ``k = 5`` in its update block. Each half is an ordinary
:class:`~convgru_triton.ConvGRUCell2d` (fused kernels on CUDA, eager elsewhere).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._layout import is_channels_last
from .functional import _internal_format, _to_internal
from .modules import ConvGRUCell2d, _refuse_script
from .ops.conv_gru import autocast_dtype


def _check_kernel(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"kernel_size must be an int k (the cell uses (1, k) then (k, 1) kernels), got {value!r}"
        )
    if value < 1:
        raise ValueError(f"kernel_size must be positive, got {value}")
    return value


class SepConvGRUCell2d(nn.Module):
    """A separable ConvGRU cell over 2-D feature maps (RAFT's ``SepConvGRU``).

    One call applies two ConvGRU updates: ``horizontal`` with a ``(1, k)``
    kernel, then ``vertical`` with a ``(k, 1)`` kernel, both reading the same
    input. Each update is ``h' = (1 - z) * h + z * n`` (see
    :class:`~convgru_triton.ConvGRUCell2d` for the gate equations).

    Args:
        input_channels: channels C_in of the input.
        hidden_channels: channels H of the state.
        kernel_size: the length k of both kernels (default 5, as in RAFT).
        bias, reset_after, padding_mode, device, dtype, backend: as in
            :class:`~convgru_triton.ConvGRUCell2d`, shared by both halves.
        dilation: int, the dilation along the kernel's long side.

    Shapes:
        input: (N, C_in, H_in, W_in) or unbatched (C_in, H_in, W_in).
        hx: (N, H, H_in, W_in) or unbatched (H, H_in, W_in); zeros when omitted.
        output: h', shaped like hx.

    Submodules:
        horizontal: ConvGRUCell2d with ``kernel_size=(1, k)``
            (RAFT's ``convz1``, ``convr1``, ``convq1``).
        vertical: ConvGRUCell2d with ``kernel_size=(k, 1)``
            (RAFT's ``convz2``, ``convr2``, ``convq2``).
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int = 5,
        bias: bool = True,
        reset_after: bool = False,
        padding_mode: str = "zeros",
        dilation: int = 1,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        k = _check_kernel(kernel_size)
        if isinstance(dilation, bool) or not isinstance(dilation, int):
            raise TypeError(f"dilation must be an int, got {dilation!r}")
        common = dict(
            bias=bias, reset_after=reset_after, padding_mode=padding_mode,
            device=device, dtype=dtype, backend=backend,
        )
        self.horizontal = ConvGRUCell2d(input_channels, hidden_channels, (1, k), dilation=(1, dilation), **common)
        self.vertical = ConvGRUCell2d(input_channels, hidden_channels, (k, 1), dilation=(dilation, 1), **common)
        self.input_channels = self.horizontal.input_channels
        self.hidden_channels = self.horizontal.hidden_channels
        self.kernel_size = k

    def __prepare_scriptable__(self):
        _refuse_script(self)

    def reset_parameters(self) -> None:
        self.horizontal.reset_parameters()
        self.vertical.reset_parameters()

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: input (N, C_in, H_in, W_in) or (C_in, H_in, W_in); hx (N, H, H_in, W_in)
        or (H, H_in, W_in), zeros if ``None``. Returns h' shaped like hx, in
        hx's memory layout (the input's when hx is ``None``); where the layout
        policy computes in channels_last (``CONVGRU_TRITON_LAYOUT``, see
        docs/what-runs-where.md), input and hx are converted once for both
        halves, not once per half."""
        fmt = None
        if isinstance(input, torch.Tensor) and input.dim() == 4 and input.is_floating_point() and (
            hx is None or isinstance(hx, torch.Tensor)
        ):  # anything else: the cells' checks say what is wrong
            cast = autocast_dtype(input.device.type)
            fmt = _internal_format(input.device, input.dtype, 2, cast)
        if fmt is None:
            h = self.horizontal(input, hx)
            return self.vertical(input, h)
        caller_channels_last = is_channels_last(input if hx is None else hx)
        input, hx = _to_internal(input, fmt, cast), _to_internal(hx, fmt, cast)
        h = self.vertical(input, self.horizontal(input, hx))  # both in fmt: neither half copies them again
        return h if caller_channels_last else h.contiguous()

    def extra_repr(self) -> str:
        return f"{self.input_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
