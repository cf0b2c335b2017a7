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

from ._plan import sep_forward
from .modules import ConvGRUCell2d, _refuse_script, _refuse_unsupported


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

    _cell_plans = None  # the eager step's plans (convgru_triton._plan), made at the first call
    _weight_casts = None  # their kept weight casts (convgru_triton._plan._weight_casts)

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
        **unsupported,
    ) -> None:
        _refuse_unsupported(type(self).__name__, unsupported)
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

    def __getstate__(self):
        # Plans (convgru_triton._plan) are never copied or pickled.
        state = self.__dict__.copy()
        state.pop("_cell_plans", None)
        state.pop("_weight_casts", None)
        return state

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
        return sep_forward(self, input, hx)

    def extra_repr(self) -> str:
        return f"{self.input_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
