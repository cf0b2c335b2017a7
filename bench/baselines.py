"""The ConvGRUs users run, written from their published equations.

Every baseline is a plain ``nn.Module`` of ``nn.Conv2d`` layers and eager
elementwise math, and every one can load the weights of this package's
:class:`~convgru_triton.ConvGRUCell2d` (``reset_after=False``, with biases), so
that all providers of a benchmark compute the same function and their outputs
can be compared before they are timed.

``seed``: the naive ConvGRU of the seed document, six convolutions per step,
each with its own bias, and unfused gate math::

    z  = sigmoid(conv_xz(x) + conv_hz(h))
    r  = sigmoid(conv_xr(x) + conv_hr(h))
    n  = tanh(conv_xn(x) + conv_hn(r * h))
    h' = (1 - z) * h + z * n

``raft``: RAFT's ConvGRU (Teed and Deng, 2020): three convolutions over the
concatenation of state and input::

    z  = sigmoid(convz([h, x]))
    r  = sigmoid(convr([h, x]))
    q  = tanh(convq([r * h, x]))
    h' = (1 - z) * h + z * q

and RAFT's SepConvGRU, the same update done twice, first with ``(1, 5)``
kernels (padding ``(0, 2)``), then with ``(5, 1)`` kernels (padding ``(2, 0)``).

Mapping to this package (gate order (r, z, n) along the first dim of
``weight_ih``/``weight_hh``, same update convention):

* seed: ``conv_x{r,z,n}`` are the three row blocks of ``weight_ih``/``bias_ih``,
  ``conv_h{r,z,n}`` those of ``weight_hh``/``bias_hh``.
* raft: the input channels of ``convz``/``convr``/``convq`` are ``[h, x]``:
  the first H columns are the gate's rows of ``weight_hh``, the rest its rows of
  ``weight_ih``; the single bias is ``bias_ih + bias_hh`` of that gate.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn

KernelSize = Union[int, Tuple[int, int]]


def _pair(k: KernelSize) -> Tuple[int, int]:
    k = (k, k) if isinstance(k, int) else tuple(k)
    if len(k) != 2 or any(v % 2 == 0 for v in k):
        raise ValueError(f"the baselines pad k // 2 on each side and need odd 2-D kernels, got {k}")
    return k


def _same_padding(k: Tuple[int, int]) -> Tuple[int, int]:
    return (k[0] // 2, k[1] // 2)


def _gate_rows(t: torch.Tensor, gate: int) -> torch.Tensor:
    """Rows of gate ``gate`` (0 = r, 1 = z, 2 = n) of a (3H, ...) weight or bias."""
    hidden = t.shape[0] // 3
    return t[gate * hidden : (gate + 1) * hidden]


def _check_cell(cell: nn.Module) -> None:
    if getattr(cell, "reset_after", False):
        raise ValueError("the baselines compute the reset_after=False candidate; got a reset_after=True cell")
    if cell.bias_ih is None:
        raise ValueError("the baselines have biases; got a cell with bias=False")
    if any(d != 1 for d in cell.dilation) or cell.padding_mode != "zeros":
        raise ValueError("the baselines use zero padding without dilation")


class SeedConvGRUCell(nn.Module):
    """The naive ConvGRU cell: six biased convolutions, unfused gate math.

    ``forward(x, h) -> h'`` with x (N, C_in, H, W) and h (N, hidden, H, W).
    """

    def __init__(self, input_channels: int, hidden_channels: int, kernel_size: KernelSize = 3,
                 device=None, dtype=None) -> None:
        super().__init__()
        k = _pair(kernel_size)
        self.kernel_size = k
        self.hidden_channels = hidden_channels

        def conv(in_channels: int) -> nn.Conv2d:
            return nn.Conv2d(in_channels, hidden_channels, k, padding=_same_padding(k), bias=True,
                             device=device, dtype=dtype)

        self.conv_xz, self.conv_hz = conv(input_channels), conv(hidden_channels)
        self.conv_xr, self.conv_hr = conv(input_channels), conv(hidden_channels)
        self.conv_xn, self.conv_hn = conv(input_channels), conv(hidden_channels)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = torch.sigmoid(self.conv_xz(x) + self.conv_hz(h))
        r = torch.sigmoid(self.conv_xr(x) + self.conv_hr(h))
        n = torch.tanh(self.conv_xn(x) + self.conv_hn(r * h))
        return (1 - z) * h + z * n

    @torch.no_grad()
    def load_from_cell(self, cell: nn.Module) -> "SeedConvGRUCell":
        """Copy the weights of a ``ConvGRUCell2d`` (``reset_after=False``, biased)."""
        _check_cell(cell)
        for gate, name in enumerate("rzn"):
            conv_x, conv_h = getattr(self, f"conv_x{name}"), getattr(self, f"conv_h{name}")
            conv_x.weight.copy_(_gate_rows(cell.weight_ih, gate))
            conv_x.bias.copy_(_gate_rows(cell.bias_ih, gate))
            conv_h.weight.copy_(_gate_rows(cell.weight_hh, gate))
            conv_h.bias.copy_(_gate_rows(cell.bias_hh, gate))
        return self


def _raft_update(h: torch.Tensor, x: torch.Tensor, convz: nn.Conv2d, convr: nn.Conv2d,
                 convq: nn.Conv2d) -> torch.Tensor:
    hx = torch.cat([h, x], dim=1)
    z = torch.sigmoid(convz(hx))
    r = torch.sigmoid(convr(hx))
    q = torch.tanh(convq(torch.cat([r * h, x], dim=1)))
    return (1 - z) * h + z * q


@torch.no_grad()
def _load_raft_convs(convz: nn.Conv2d, convr: nn.Conv2d, convq: nn.Conv2d, cell: nn.Module) -> None:
    _check_cell(cell)
    hidden = cell.weight_hh.shape[1]
    for gate, conv in ((0, convr), (1, convz), (2, convq)):
        conv.weight[:, :hidden].copy_(_gate_rows(cell.weight_hh, gate))
        conv.weight[:, hidden:].copy_(_gate_rows(cell.weight_ih, gate))
        conv.bias.copy_(_gate_rows(cell.bias_ih, gate) + _gate_rows(cell.bias_hh, gate))


class RaftConvGRU(nn.Module):
    """RAFT's ConvGRU: ``forward(h, x) -> h'`` (state first, as in RAFT).

    ``convz``, ``convr``, ``convq``: ``Conv2d(hidden + input, hidden, k, padding=k // 2)``.
    """

    def __init__(self, hidden_dim: int = 128, input_dim: int = 256, kernel_size: KernelSize = 3,
                 device=None, dtype=None) -> None:
        super().__init__()
        k = _pair(kernel_size)
        self.hidden_channels = hidden_dim

        def conv() -> nn.Conv2d:
            return nn.Conv2d(hidden_dim + input_dim, hidden_dim, k, padding=_same_padding(k),
                             device=device, dtype=dtype)

        self.convz, self.convr, self.convq = conv(), conv(), conv()

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _raft_update(h, x, self.convz, self.convr, self.convq)

    def load_from_cell(self, cell: nn.Module) -> "RaftConvGRU":
        """Copy the weights of a ``ConvGRUCell2d`` (``reset_after=False``, biased)."""
        _load_raft_convs(self.convz, self.convr, self.convq, cell)
        return self


class RaftSepConvGRU(nn.Module):
    """RAFT's SepConvGRU: ``forward(h, x) -> h'``, a horizontal ``(1, k)`` update
    (``convz1``, ``convr1``, ``convq1``) then a vertical ``(k, 1)`` one (``*2``)."""

    def __init__(self, hidden_dim: int = 128, input_dim: int = 256, kernel_size: int = 5,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_channels = hidden_dim
        horizontal, vertical = _pair((1, kernel_size)), _pair((kernel_size, 1))

        def conv(k: Tuple[int, int]) -> nn.Conv2d:
            return nn.Conv2d(hidden_dim + input_dim, hidden_dim, k, padding=_same_padding(k),
                             device=device, dtype=dtype)

        self.convz1, self.convr1, self.convq1 = conv(horizontal), conv(horizontal), conv(horizontal)
        self.convz2, self.convr2, self.convq2 = conv(vertical), conv(vertical), conv(vertical)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = _raft_update(h, x, self.convz1, self.convr1, self.convq1)
        return _raft_update(h, x, self.convz2, self.convr2, self.convq2)

    def load_from_cells(self, horizontal: nn.Module, vertical: nn.Module) -> "RaftSepConvGRU":
        """Copy the weights of two ``ConvGRUCell2d``: kernel ``(1, k)``, then ``(k, 1)``."""
        _load_raft_convs(self.convz1, self.convr1, self.convq1, horizontal)
        _load_raft_convs(self.convz2, self.convr2, self.convq2, vertical)
        return self


class TwoPass(nn.Module):
    """Two cells with the ``forward(x, h)`` convention applied one after the other
    to the same input: the separable update for the ``seed`` and ``ours`` providers."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.hidden_channels = getattr(second, "hidden_channels")

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.second(x, self.first(x, h))


def seed_from_cells(cells: Sequence[nn.Module]) -> nn.Module:
    """A ``seed`` step, ``forward(x, h)``, computing what ``cells`` (one ConvGRUCell2d, or the
    two halves of a separable step) compute."""
    seeds = [
        SeedConvGRUCell(c.input_channels, c.hidden_channels, c.kernel_size,
                        device=c.weight_ih.device, dtype=c.weight_ih.dtype).load_from_cell(c)
        for c in cells
    ]
    return seeds[0] if len(seeds) == 1 else TwoPass(*seeds)


def raft_from_cells(cells: Sequence[nn.Module]) -> nn.Module:
    """A ``raft`` step, ``forward(h, x)``: RaftConvGRU for one cell, RaftSepConvGRU for
    the ``(1, k)``/``(k, 1)`` pair."""
    factory = dict(device=cells[0].weight_ih.device, dtype=cells[0].weight_ih.dtype)
    first = cells[0]
    if len(cells) == 1:
        return RaftConvGRU(first.hidden_channels, first.input_channels, first.kernel_size,
                           **factory).load_from_cell(first)
    horizontal, vertical = cells
    k = horizontal.kernel_size[1]
    if horizontal.kernel_size != (1, k) or vertical.kernel_size != (k, 1):
        raise ValueError(f"a SepConvGRU needs kernels (1, k) then (k, 1), got {horizontal.kernel_size} "
                         f"and {vertical.kernel_size}")
    return RaftSepConvGRU(first.hidden_channels, first.input_channels, k, **factory).load_from_cells(
        horizontal, vertical)
