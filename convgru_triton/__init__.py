"""convgru_triton: a fast, correct ConvGRU for PyTorch.

Fused Triton kernels for the gate math (forward and backward) around cuDNN
convolutions on CUDA; the same equations in eager PyTorch everywhere else.

    >>> from convgru_triton import ConvGRU
    >>> gru = ConvGRU(8, 16, kernel_size=3, num_layers=2)
"""

from ._backend import BackendChoice, explain_backend, triton_available
from ._settings import Settings, get_settings
from ._settings import override as override_settings
from .functional import conv_gru, conv_gru_cell
from .modules import (
    ConvGRU,
    ConvGRU1d,
    ConvGRU2d,
    ConvGRU3d,
    ConvGRUCell,
    ConvGRUCell1d,
    ConvGRUCell2d,
    ConvGRUCell3d,
)
from .separable import SepConvGRUCell2d
from . import convert  # noqa: F401  (the converters: convgru_triton.convert.from_raft_convgru, ...)
from . import deploy  # noqa: F401  (convgru_triton.deploy.decompositions)

__version__ = "0.1.0"

__all__ = [
    "BackendChoice",
    "ConvGRU",
    "ConvGRU1d",
    "ConvGRU2d",
    "ConvGRU3d",
    "ConvGRUCell",
    "ConvGRUCell1d",
    "ConvGRUCell2d",
    "ConvGRUCell3d",
    "SepConvGRUCell2d",
    "Settings",
    "conv_gru",
    "conv_gru_cell",
    "explain_backend",
    "get_settings",
    "override_settings",
    "triton_available",
]
