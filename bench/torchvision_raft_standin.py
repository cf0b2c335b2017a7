"""Stand-ins for torchvision's RAFT (``torchvision.models.optical_flow``) where
torchvision does not import (its CPU-less wheels link CUDA libraries a CPU
build of torch lacks).

Written from the published structure and equations, not copied: the recurrent
block is torchvision's exactly as far as the converters can see it
(``update_block.recurrent_block`` with ``convgru1`` / ``convgru2``, each
``convz``, ``convr``, ``convq`` over ``cat([h, x])``, called ``gru(h, x)``;
raft_small's ``convgru2`` a function returning ``h``), and the model around it
is a small RAFT with the same interface and data flow: encoders that downsample
by 8, a hidden state and context split from the context encoder, a correlation
lookup at the current flow estimate (coordinates detached every update), the
motion features and context as the GRU's input, a flow head, and predictions
upsampled to the image size, one per update.

    model = standin_raft("raft_large", tiny=True)          # or "raft_small"
    flows = model(image1, image2, num_flow_updates=2)     # list of (N, 2, H, W)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Union[int, Tuple[int, int]]

#: Why torchvision may be missing on a CPU machine, for skip messages.
TORCHVISION_CPU_WHEEL = ("torchvision's wheels link CUDA libraries that a CPU-only torch lacks; "
                         "the stand-ins of this module take its place")


def torchvision_unavailable() -> Optional[str]:
    """``None`` when ``torchvision.models.optical_flow`` imports, else why not
    (a broken wheel raises OSError or RuntimeError rather than ImportError)."""
    try:
        from torchvision.models import optical_flow  # noqa: F401
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        return f"torchvision does not import ({type(exc).__name__}: {first}); {TORCHVISION_CPU_WHEEL}"
    return None


class ConvGRU(nn.Module):
    """torchvision's ConvGRU: ``forward(h, x)``; z, r from ``cat([h, x])``, the
    candidate from ``cat([r * h, x])``, ``h' = (1 - z) h + z q``."""

    def __init__(self, *, input_size: int, hidden_size: int, kernel_size: Kernel, padding: Kernel):
        super().__init__()
        channels = hidden_size + input_size
        self.convz = nn.Conv2d(channels, hidden_size, kernel_size=kernel_size, padding=padding)
        self.convr = nn.Conv2d(channels, hidden_size, kernel_size=kernel_size, padding=padding)
        self.convq = nn.Conv2d(channels, hidden_size, kernel_size=kernel_size, padding=padding)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


def _pass_through_h(h, _):
    # raft_small's second "GRU": the state unchanged.
    return h


class RecurrentBlock(nn.Module):
    """torchvision's RecurrentBlock: ``convgru1`` then ``convgru2`` (a ConvGRU, or
    the pass-through for a single kernel size)."""

    def __init__(self, *, input_size: int, hidden_size: int, kernel_size: Sequence[Kernel] = ((1, 5), (5, 1)),
                 padding: Sequence[Kernel] = ((0, 2), (2, 0))):
        super().__init__()
        if len(kernel_size) != len(padding) or len(kernel_size) not in (1, 2):
            raise ValueError(f"expected one or two kernel sizes, each with its padding, got {kernel_size}, {padding}")
        self.convgru1 = ConvGRU(input_size=input_size, hidden_size=hidden_size, kernel_size=kernel_size[0],
                                padding=padding[0])
        if len(kernel_size) == 2:
            self.convgru2 = ConvGRU(input_size=input_size, hidden_size=hidden_size, kernel_size=kernel_size[1],
                                    padding=padding[1])
        else:
            self.convgru2 = _pass_through_h
        self.hidden_size = hidden_size

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.convgru1(h, x)
        return self.convgru2(h, x)


def _encoder(out_channels: int, width: int, norm: bool) -> nn.Sequential:
    """Three stride-2 convolutions: 1/8 of the image size, as RAFT's encoders."""
    layers: List[nn.Module] = []
    channels = 3
    for i, (k, c) in enumerate(((7, width), (3, width), (3, out_channels))):
        layers.append(nn.Conv2d(channels, c, k, stride=2, padding=k // 2))
        if i < 2:
            if norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU())
        channels = c
    return nn.Sequential(*layers)


class MotionEncoder(nn.Module):
    """Flow and correlation features to ``out_channels`` (the flow itself among them)."""

    def __init__(self, corr_channels: int, out_channels: int):
        super().__init__()
        self.convcorr = nn.Conv2d(corr_channels, out_channels, 1)
        self.convflow = nn.Conv2d(2, out_channels, 7, padding=3)
        self.conv = nn.Conv2d(2 * out_channels, out_channels - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        features = torch.cat([F.relu(self.convcorr(corr)), F.relu(self.convflow(flow))], dim=1)
        return torch.cat([F.relu(self.conv(features)), flow], dim=1)


class FlowHead(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_size, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_size, 2, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(h)))


class UpdateBlock(nn.Module):
    """torchvision's UpdateBlock: motion features and context into the recurrent block, then the flow head."""

    def __init__(self, *, motion_encoder: nn.Module, recurrent_block: nn.Module, flow_head: nn.Module):
        super().__init__()
        self.motion_encoder = motion_encoder
        self.recurrent_block = recurrent_block
        self.flow_head = flow_head
        self.hidden_state_size = recurrent_block.hidden_size

    def forward(self, hidden_state, context, corr_features, flow):
        x = torch.cat([context, self.motion_encoder(flow, corr_features)], dim=1)
        hidden_state = self.recurrent_block(hidden_state, x)
        return hidden_state, self.flow_head(hidden_state)


def _coords_grid(batch: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    # float32 as torchvision's grid, float64 when the model runs in float64 (a reference).
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    ys, xs = torch.meshgrid(torch.arange(h, device=like.device, dtype=dtype),
                            torch.arange(w, device=like.device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys])[None].repeat(batch, 1, 1, 1)


class StandInRAFT(nn.Module):
    """A small RAFT with torchvision's interface: ``forward(image1, image2,
    num_flow_updates=12)`` on ``(N, 3, H, W)`` images (H, W multiples of 8)
    returns ``num_flow_updates`` flow predictions ``(N, 2, H, W)``."""

    def __init__(self, *, hidden: int, context: int, motion: int, features: int, width: int, radius: int,
                 kernel_size: Sequence[Kernel], padding: Sequence[Kernel]):
        super().__init__()
        self.radius = radius
        self.feature_encoder = _encoder(features, width, norm=False)
        self.context_encoder = _encoder(hidden + context, width, norm=True)
        corr_channels = (2 * radius + 1) ** 2
        self.update_block = UpdateBlock(
            motion_encoder=MotionEncoder(corr_channels, motion),
            recurrent_block=RecurrentBlock(input_size=context + motion, hidden_size=hidden,
                                           kernel_size=kernel_size, padding=padding),
            flow_head=FlowHead(hidden, 2 * hidden),
        )

    def _lookup(self, fmap1: torch.Tensor, fmap2: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Correlation of ``fmap1`` with ``fmap2`` sampled around ``coords`` (pixels), one channel per offset."""
        n, c, h, w = fmap1.shape
        scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=coords.device, dtype=coords.dtype)
        out = []
        r = self.radius
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                shifted = coords + torch.tensor([dx, dy], device=coords.device, dtype=coords.dtype).view(1, 2, 1, 1)
                grid = (shifted.permute(0, 2, 3, 1) * scale - 1).to(fmap2.dtype)
                warped = F.grid_sample(fmap2, grid, mode="bilinear", align_corners=True)
                out.append((fmap1 * warped).sum(1, keepdim=True))
        return torch.cat(out, dim=1) / c ** 0.5

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, num_flow_updates: int = 12) -> List[torch.Tensor]:
        n, _, height, width = image1.shape
        if height % 8 or width % 8:
            raise ValueError(f"image height and width must be multiples of 8, got {height}x{width}")
        fmap1, fmap2 = torch.chunk(self.feature_encoder(torch.cat([image1, image2], dim=0)), 2, dim=0)
        hidden_size = self.update_block.hidden_state_size
        context_out = self.context_encoder(image1)
        hidden_state, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
        hidden_state, context = torch.tanh(hidden_state), F.relu(context)
        coords0 = _coords_grid(n, height // 8, width // 8, fmap1)
        coords1 = coords0.clone()
        predictions = []
        for _ in range(num_flow_updates):
            coords1 = coords1.detach()  # as RAFT: no gradient through the lookup's position
            corr = self._lookup(fmap1, fmap2, coords1)
            hidden_state, delta = self.update_block(hidden_state, context, corr, coords1 - coords0)
            coords1 = coords1 + delta
            flow = coords1 - coords0
            predictions.append(8 * F.interpolate(flow, scale_factor=8, mode="bilinear", align_corners=True))
        return predictions


#: Per model: the recurrent block's layout as torchvision builds it (hidden state,
#: context and motion channels, kernels, paddings) and a tiny one of the same shape.
LAYOUTS = {
    "raft_large": dict(hidden=128, context=128, motion=128, kernel_size=((1, 5), (5, 1)), padding=((0, 2), (2, 0))),
    "raft_small": dict(hidden=96, context=64, motion=82, kernel_size=(3,), padding=(1,)),
}
TINY_CHANNELS = {"raft_large": dict(hidden=8, context=6, motion=6), "raft_small": dict(hidden=6, context=4, motion=5)}


def standin_raft(name: str, *, tiny: bool = True) -> StandInRAFT:
    """A stand-in of torchvision's ``raft_large`` or ``raft_small``: its recurrent
    block's layout, with torchvision's channels (``tiny=False``) or a few
    (``tiny=True``, for tests and smoke runs). Raises ValueError for another name."""
    if name not in LAYOUTS:
        raise ValueError(f"expected one of {sorted(LAYOUTS)}, got {name!r}")
    layout = dict(LAYOUTS[name])
    if tiny:
        layout.update(TINY_CHANNELS[name])
    width = 8 if tiny else 64
    return StandInRAFT(features=width, width=width, radius=1, **layout)
