"""Launch configurations of the fused gate kernels.

The gate kernels are elementwise and memory-bound: one program handles
``block_size`` consecutive elements of one sample's (channel x spatial) plane.
This module is the single place the launchers ask for their configuration, so
that a per-GPU registry can replace the defaults without touching a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    """``block_size`` elements per program (a power of two), ``num_warps`` warps."""

    block_size: int
    num_warps: int


# Sound on any GPU: 8 elements per thread with 4 warps keeps loads wide enough
# for float32 and half precision alike; the interpreter (CPU) also prefers few,
# large programs.
DEFAULT_CONFIG = LaunchConfig(block_size=1024, num_warps=4)


# The kernels that read their configuration here (names as in ops/conv_gru_cell.py,
# without the leading underscore and the _kernel suffix).
KERNELS = (
    "gru_reset_after_fwd",
    "gru_reset_after_bwd",
    "gru_reset_gate_fwd",
    "gru_update_fwd",
    "gru_update_bwd",
    "gru_reset_gate_bwd",
)


def launch_config(kernel: str, dtype: torch.dtype, numel: int, device: torch.device) -> LaunchConfig:
    """Configuration for ``kernel`` (one of :data:`KERNELS`) on a state of ``numel``
    elements of ``dtype`` on ``device``. Pure Python with no I/O, so it is cheap per launch."""
    return DEFAULT_CONFIG
