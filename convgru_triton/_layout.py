"""Memory-layout helpers: keep channels_last tensors channels_last.

cuDNN convolutions return channels_last outputs for channels_last inputs, and
are fastest that way in half precision; the states and gate buffers this
package allocates follow the layout of the tensors they come from instead of
silently turning everything contiguous.
"""

from __future__ import annotations

from typing import Sequence

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """True for a 4-D or 5-D tensor stored channels_last (channels innermost)
    that is not also plain contiguous (as when C or every spatial size is 1)."""
    if t.dim() == 4:
        fmt = torch.channels_last
    elif t.dim() == 5:
        fmt = torch.channels_last_3d
    else:
        return False
    return t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def empty_in_layout(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """``torch.empty(shape)``, channels_last when asked and the rank allows it."""
    fmt = torch.contiguous_format
    if channels_last and len(shape) == 4:
        fmt = torch.channels_last
    elif channels_last and len(shape) == 5:
        fmt = torch.channels_last_3d
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=fmt)
