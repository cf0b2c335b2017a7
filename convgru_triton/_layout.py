"""Memory-layout helpers: keep channels_last tensors channels_last.

cuDNN convolutions return channels_last outputs for channels_last inputs, and
are fastest that way in half precision; the states and gate buffers this
package allocates follow the layout of the tensors they come from instead of
silently turning everything contiguous.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _settings


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


# --- Internal layout policy -----------------------------------------------------

LAYOUT_ENV_VAR = "CONVGRU_TRITON_LAYOUT"
# The tensor-core dtypes the policy's default targets on CUDA.
_TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)


def layout_setting() -> str:
    """The ``layout`` setting: ``CONVGRU_TRITON_LAYOUT`` as read at import
    (``'auto'`` when unset), or ``override_settings(layout=...)``.

    Raises:
        ValueError: the variable held something other than ``auto``,
            ``channels_last`` or ``keep`` (the message names it, the values
            it takes and the value given).
    """
    return _settings.get_settings().layout


def internal_memory_format(device: torch.device, dtype: torch.dtype, dims: int) -> Optional[torch.memory_format]:
    """The memory format the package computes in for ``dims`` spatial dims
    (1, 2 or 3) of ``dtype`` (the compute dtype: the autocast dtype under
    autocast) on ``device``: ``torch.channels_last`` (2-D),
    ``torch.channels_last_3d`` (3-D), or ``None`` for "the caller's layout,
    as given" (1-D always: a (N, C, L) tensor has no channels_last form).

    The ``layout`` setting (``CONVGRU_TRITON_LAYOUT``) decides: ``keep`` -> ``None``; ``channels_last``
    -> channels_last on every device and dtype (for tests, and for users who
    measured it); ``auto`` (default) -> channels_last on CUDA in float16 and
    bfloat16 only. There cuDNN's tensor-core convolutions want NHWC: on the H200
    profile of a RAFT training step (bench/results/gpu-h200-2026-12-04-20a2c17)
    the NCHW<->NHWC transposes cuDNN inserted around each convolution of NCHW
    bfloat16 tensors were 27 kernels per step and 14% of GPU time. For float32,
    float64 and on the CPU nothing measured says channels_last is faster, so
    those keep the caller's layout as before.

    Raises:
        ValueError: ``CONVGRU_TRITON_LAYOUT`` held an unknown value at import.
    """
    setting = layout_setting()
    if dims not in (2, 3) or setting == "keep":
        return None
    if setting == "auto" and (device.type != "cuda" or dtype not in _TENSOR_CORE_DTYPES):
        return None
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def frames_in_format(t: torch.Tensor, fmt: torch.memory_format, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A (T, N, C, *S) tensor whose frames ``t[i]`` (N, C, *S) are all in
    ``fmt`` (channels_last, channels_last_3d or contiguous), keeping the
    storage order of the two leading dims (time-major, or batch-major for a
    transposed batch_first sequence), cast to ``dtype`` if given in the same
    copy; ``t``'s storage when it already is (no copy). Differentiable (views,
    ``contiguous`` and ``to``)."""

    def dense(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous() if dtype is None else x.to(dtype=dtype, memory_format=torch.contiguous_format)

    moved = t if fmt == torch.contiguous_format else t.movedim(2, -1)
    if moved.stride(0) < moved.stride(1):  # batch-major storage of a (T, N) view: keep it
        moved = dense(moved.transpose(0, 1)).transpose(0, 1)
    else:
        moved = dense(moved)
    return moved if fmt == torch.contiguous_format else moved.movedim(-1, 2)
