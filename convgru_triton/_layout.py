"""Memory-layout helpers: keep channels_last tensors channels_last.

cuDNN convolutions return channels_last outputs for channels_last inputs, and
are fastest that way in half precision; the states and gate buffers this
package allocates follow the layout of the tensors they come from instead of
silently turning everything contiguous.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """True for a 4-D or 5-D tensor whose channels are innermost (stride 1):
    channels_last, or a view of such a tensor (a time step of a sequence, a
    crop), as opposed to contiguous. Outputs computed from it are allocated
    channels_last. Tensors where the two layouts coincide count as contiguous."""
    if t.dim() not in (4, 5) or t.shape[1] < 2:
        return False
    # The spatial size from the shape rather than t[0, 0].numel(): no view is
    # made (a view costs ~2 us, and this runs several times per step), and a
    # batch of 0 needs no special case.
    return t.stride(1) == 1 and math.prod(t.shape[2:]) > 1


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


def check_kernel_sample_size(hidden: int, spatial: Sequence[int]) -> None:
    """The fused kernels address one sample's gate pre-activations (3 x hidden x
    spatial elements) with 32-bit offsets (only the batch offset is 64-bit):
    refuse a larger sample with a ValueError, before anything runs."""
    plane = hidden * math.prod(spatial)
    if 3 * plane >= 2**31:
        raise ValueError(
            f"one sample's gate pre-activations have 3 x {plane} elements (3 x hidden x spatial); "
            f"the fused kernels support fewer than 2**31 per sample: use backend='torch' or a smaller "
            f"hidden size or spatial size"
        )


def frames_channels_last(t: torch.Tensor) -> bool:
    """True when every frame ``t[i]`` of a (B, N, C, *S) tensor is channels_last."""
    return t.shape[0] > 0 and is_channels_last(t[0])


def stack_frames(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(frames)`` of (N, C, *S) tensors that stays channels_last
    when the frames are (torch.stack itself returns a contiguous tensor)."""
    if not is_channels_last(frames[0]):
        return torch.stack(list(frames))
    return torch.stack([f.movedim(1, -1) for f in frames]).movedim(-1, 2)


def cat_channels(sequences: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate (T, N, C_i, *S) tensors along channels, keeping channels_last
    frames channels_last (torch.cat on dim 2 would return a contiguous tensor)."""
    if not frames_channels_last(sequences[0]):
        return torch.cat(list(sequences), dim=2)
    return torch.cat([s.movedim(2, -1) for s in sequences], dim=-1).movedim(-1, 2)
