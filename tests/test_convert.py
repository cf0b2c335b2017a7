"""Converters: RAFT's ConvGRU / SepConvGRU and torch.nn.GRU(Cell) into this
package's modules give the same outputs as the originals, and back.

RAFT's modules are re-implemented here from their published equations
(convolutions over ``cat([h, x])``, ``h' = (1 - z) h + z q``)."""

import pytest
import torch
from torch import nn

from convgru_triton import ConvGRU1d, ConvGRU2d, ConvGRUCell2d, ConvGRUCell3d, SepConvGRUCell2d
from convgru_triton.convert import (
    from_raft_convgru,
    from_raft_sepconvgru,
    from_torch_gru,
    to_raft_state_dict,
    to_torch_gru,
)

BACKENDS = ["torch", "triton"]


class RaftConvGRU(nn.Module):
    """RAFT's ConvGRU: three k x k convolutions over [h, x]; forward(h, x)."""

    def __init__(self, hidden_dim, input_dim, k=3):
        super().__init__()
        self.convz = nn.Conv2d(hidden_dim + input_dim, hidden_dim, k, padding=k // 2)
        self.convr = nn.Conv2d(hidden_dim + input_dim, hidden_dim, k, padding=k // 2)
        self.convq = nn.Conv2d(hidden_dim + input_dim, hidden_dim, k, padding=k // 2)

    def forward(self, h, x):
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class RaftSepConvGRU(nn.Module):
    """RAFT's SepConvGRU: the update with (1, k) kernels, then with (k, 1) kernels."""

    def __init__(self, hidden_dim, input_dim, k=5):
        super().__init__()
        c = hidden_dim + input_dim
        for i, (kernel, pad) in enumerate((((1, k), (0, k // 2)), ((k, 1), (k // 2, 0))), start=1):
            for gate in "zrq":
                setattr(self, f"conv{gate}{i}", nn.Conv2d(c, hidden_dim, kernel, padding=pad))

    def _half(self, h, x, i):
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(getattr(self, f"convz{i}")(hx))
        r = torch.sigmoid(getattr(self, f"convr{i}")(hx))
        q = torch.tanh(getattr(self, f"convq{i}")(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q

    def forward(self, h, x):
        return self._half(self._half(h, x, 1), x, 2)


def _randomise(module, scale=0.5):
    # Larger than the default initialisation so that the gates are far from 0.5.
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-scale, scale)
    return module


# ----------------------------------------------------------------------------
# RAFT
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_raft_convgru_module_same_outputs(backend, k, device):
    dev = device
    torch.manual_seed(0)
    raft = _randomise(RaftConvGRU(hidden_dim=6, input_dim=5, k=k)).double().to(dev)
    cell = from_raft_convgru(raft, backend=backend)
    assert isinstance(cell, ConvGRUCell2d)
    assert (cell.input_channels, cell.hidden_channels, cell.kernel_size) == (5, 6, (k, k))
    assert not cell.reset_after and cell.weight_ih.dtype == torch.float64 and cell.weight_ih.device.type == dev.type
    h_raft = h_ours = torch.randn(2, 6, 7, 9, dtype=torch.float64, device=dev)
    # RAFT's refinement loop: several iterations, a new input each time.
    for _ in range(3):
        x = torch.randn(2, 5, 7, 9, dtype=torch.float64, device=dev)
        h_raft = raft(h_raft, x)
        h_ours = cell(x, h_ours)
        torch.testing.assert_close(h_ours, h_raft, rtol=1e-12, atol=1e-12)


def test_raft_convgru_state_dict_with_prefix_and_gradients():
    torch.manual_seed(1)
    raft = _randomise(RaftConvGRU(hidden_dim=4, input_dim=3))
    model = nn.Module()
    model.update_block = nn.Module()
    model.update_block.gru = raft
    state = model.state_dict()
    cell = from_raft_convgru(state, prefix="update_block.gru.")
    cell_from_module = from_raft_convgru(model, prefix="update_block.gru.")
    x = torch.randn(2, 3, 6, 5)
    h = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(cell(x, h), raft(h, x))
    torch.testing.assert_close(cell_from_module(x, h), raft(h, x))
    # The backward agrees too: gradients of the inputs.
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    hs = [h.clone().requires_grad_(), h.clone().requires_grad_()]
    cell(xs[0], hs[0]).square().sum().backward()
    raft(hs[1], xs[1]).square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(hs[0].grad, hs[1].grad)


def test_raft_convgru_bias_goes_to_bias_ih():
    raft = _randomise(RaftConvGRU(hidden_dim=2, input_dim=3))
    cell = from_raft_convgru(raft)
    assert torch.equal(cell.bias_ih, torch.cat([raft.convr.bias, raft.convz.bias, raft.convq.bias]))
    assert torch.equal(cell.bias_hh, torch.zeros(6))
    # Split of the weights over cat([h, x]): h first.
    assert torch.equal(cell.weight_hh[2:4], raft.convz.weight[:, :2])
    assert torch.equal(cell.weight_ih[2:4], raft.convz.weight[:, 2:])


def test_raft_convgru_without_bias_and_dtype_override():
    raft = RaftConvGRU(hidden_dim=3, input_dim=2)
    for conv in (raft.convz, raft.convr, raft.convq):
        conv.bias = None
    cell = from_raft_convgru(raft, dtype=torch.float64)
    assert cell.bias_ih is None and cell.weight_ih.dtype == torch.float64
    x, h = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(cell(x.double(), h.double()).float(), raft(h, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_raft_sepconvgru_same_outputs(backend, device):
    dev = device
    torch.manual_seed(2)
    raft = _randomise(RaftSepConvGRU(hidden_dim=5, input_dim=4, k=5)).double().to(dev)
    cell = from_raft_sepconvgru(raft.state_dict(), backend=backend)
    assert isinstance(cell, SepConvGRUCell2d)
    assert cell.horizontal.kernel_size == (1, 5) and cell.vertical.kernel_size == (5, 1)
    h_raft = h_ours = torch.randn(2, 5, 6, 8, dtype=torch.float64, device=dev)
    for _ in range(2):
        x = torch.randn(2, 4, 6, 8, dtype=torch.float64, device=dev)
        h_raft = raft(h_raft, x)
        h_ours = cell(x, h_ours)
        torch.testing.assert_close(h_ours, h_raft, rtol=1e-12, atol=1e-12)
    # From the module itself, too.
    torch.testing.assert_close(from_raft_sepconvgru(raft, backend=backend)(x, h_raft), raft(h_raft, x))


def test_sepconvgru_cell_is_two_cells():
    torch.manual_seed(3)
    cell = SepConvGRUCell2d(3, 4, kernel_size=3)
    x = torch.randn(2, 3, 5, 6)
    expected = cell.vertical(x, cell.horizontal(x))
    torch.testing.assert_close(cell(x), expected)
    assert cell(x[0]).shape == (4, 5, 6)  # unbatched
    assert sum(p.numel() for p in cell.parameters()) == 2 * (12 * 3 * 3 + 12 * 4 * 3 + 2 * 12)
    with pytest.raises(TypeError, match="kernel_size"):
        SepConvGRUCell2d(3, 4, kernel_size=(1, 5))


@pytest.mark.parametrize("kind", ["convgru", "sepconvgru"])
def test_to_raft_state_dict_round_trip(kind):
    torch.manual_seed(4)
    if kind == "convgru":
        ours, raft = _randomise(ConvGRUCell2d(3, 4, 3)), RaftConvGRU(4, 3, 3)
    else:
        ours, raft = _randomise(SepConvGRUCell2d(3, 4, 5)), RaftSepConvGRU(4, 3, 5)
    raft.load_state_dict(to_raft_state_dict(ours))
    x, h = torch.randn(2, 3, 6, 7), torch.randn(2, 4, 6, 7)
    torch.testing.assert_close(raft(h, x), ours(x, h))


def test_raft_errors():
    raft = RaftConvGRU(4, 3)
    state = raft.state_dict()
    with pytest.raises(ValueError, match=r"'convr.weight'.*prefixes \['module.'\].*prefix="):
        from_raft_convgru({"module." + k: v for k, v in state.items()})
    with pytest.raises(ValueError, match="every convolution has a bias"):
        from_raft_convgru({k: v for k, v in state.items() if k != "convq.bias"})
    bad = dict(state, **{"convq.weight": torch.zeros(4, 6, 3, 3)})
    with pytest.raises(ValueError, match=r"share one shape.*\(4, 6, 3, 3\)"):
        from_raft_convgru(bad)
    with pytest.raises(ValueError, match="input_channels >= 1"):
        from_raft_convgru({f"conv{g}.weight": torch.zeros(4, 4, 3, 3) for g in "zrq"})
    with pytest.raises(ValueError, match="odd kernel"):
        from_raft_convgru({f"conv{g}.weight": torch.zeros(4, 7, 2, 2) for g in "zrq"})
    strided = RaftConvGRU(4, 3)
    strided.convr = nn.Conv2d(7, 4, 3, padding=1, stride=2)
    with pytest.raises(ValueError, match=r"convr must have stride 1.*stride=\(2, 2\)"):
        from_raft_convgru(strided)
    unpadded = RaftConvGRU(4, 3)
    unpadded.convq = nn.Conv2d(7, 4, 3)
    with pytest.raises(ValueError, match=r"convq must pad.*padding=\(1, 1\).*got padding=\(0, 0\)"):
        from_raft_convgru(unpadded)
    with pytest.raises(ValueError, match="convr, convz, convq"):
        from_raft_convgru(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="state dict"):
        from_raft_convgru([1, 2])
    with pytest.raises(ValueError, match=r"\(1, k\) half"):
        from_raft_sepconvgru({k.replace("1.", "X.").replace("2.", "1.").replace("X.", "2."): v
                              for k, v in RaftSepConvGRU(4, 3).state_dict().items()})
    with pytest.raises(ValueError, match="reset_after=False"):
        to_raft_state_dict(ConvGRUCell2d(3, 4, 3, reset_after=True))
    with pytest.raises(ValueError, match="odd kernels"):
        to_raft_state_dict(ConvGRUCell2d(3, 4, 4))


# ----------------------------------------------------------------------------
# torch.nn.GRU
# ----------------------------------------------------------------------------


def _spatial(t, dims):
    return t.reshape(t.shape + (1,) * dims)


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", [
    (1, False, False, True),
    (2, True, True, True),
    (3, False, True, False),
    (2, True, False, False),
])
@pytest.mark.parametrize("dims", [1, 2])
def test_from_torch_gru_same_outputs(num_layers, bidirectional, batch_first, bias, dims):
    torch.manual_seed(5)
    gru = _randomise(nn.GRU(4, 5, num_layers=num_layers, bias=bias, batch_first=batch_first,
                            bidirectional=bidirectional), scale=0.8).double()
    conv = from_torch_gru(gru, dims=dims)
    assert isinstance(conv, ConvGRU1d if dims == 1 else ConvGRU2d)
    assert conv.kernel_size == (1,) * dims and conv.reset_after
    assert (conv.num_layers, conv.bidirectional, conv.batch_first, conv.bias) == (
        num_layers, bidirectional, batch_first, bias)
    d = 2 if bidirectional else 1
    x = torch.randn(3, 7, 4, dtype=torch.float64)  # (N, T, C) or (T, N, C)
    h0 = torch.randn(num_layers * d, 3 if batch_first else 7, 5, dtype=torch.float64)
    for hx in (None, h0):
        out, h_n = gru(x, hx)
        out_c, h_n_c = conv(_spatial(x, dims), None if hx is None else _spatial(hx, dims))
        torch.testing.assert_close(out_c, _spatial(out, dims), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n_c, _spatial(h_n, dims), rtol=1e-12, atol=1e-12)
    # Unbatched input.
    out, h_n = gru(x[0])
    out_c, h_n_c = conv(_spatial(x[0], dims))
    torch.testing.assert_close(out_c, _spatial(out, dims), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_torch_gru_every_pixel(backend, device):
    """At any spatial size, the converted module is the GRU run on every pixel."""
    dev = device
    torch.manual_seed(6)
    gru = _randomise(nn.GRU(3, 4, num_layers=2, bidirectional=True)).to(dev)
    conv = from_torch_gru(gru, dims=2, backend=backend)
    x = torch.randn(5, 2, 3, 4, 6, device=dev)  # (T, N, C, H, W)
    out_c, h_n_c = conv(x)
    pixels = x.permute(0, 1, 3, 4, 2).reshape(5, 2 * 24, 3)  # (T, N * H * W, C)
    out, h_n = gru(pixels)
    torch.testing.assert_close(out_c, out.reshape(5, 2, 4, 6, 8).permute(0, 1, 4, 2, 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_n_c, h_n.reshape(4, 2, 4, 6, 4).permute(0, 1, 4, 2, 3), rtol=1e-5, atol=1e-5)


def test_from_torch_gru_cell_and_update_gate_sign():
    torch.manual_seed(7)
    gru_cell = _randomise(nn.GRUCell(3, 4)).double()
    cell = from_torch_gru(gru_cell, dims=3)
    assert isinstance(cell, ConvGRUCell3d) and cell.reset_after
    x, h = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(cell(_spatial(x, 3), _spatial(h, 3)), _spatial(gru_cell(x, h), 3),
                               rtol=1e-12, atol=1e-12)
    # Only the z rows change sign.
    w = cell.weight_ih.view(12, 3)
    torch.testing.assert_close(w[:4], gru_cell.weight_ih[:4])
    torch.testing.assert_close(w[4:8], -gru_cell.weight_ih[4:8])
    torch.testing.assert_close(cell.bias_hh[4:8], -gru_cell.bias_hh[4:8])


def test_from_torch_gru_keeps_dropout_and_dtype():
    gru = nn.GRU(2, 3, num_layers=2, dropout=0.25, dtype=torch.float64)
    conv = from_torch_gru(gru)
    assert conv.dropout == 0.25 and conv.weight_ih_l1.dtype == torch.float64


@pytest.mark.parametrize("bidirectional", [False, True])
def test_to_torch_gru_round_trip(bidirectional):
    torch.manual_seed(8)
    conv = _randomise(ConvGRU2d(3, 4, 1, num_layers=2, reset_after=True, bidirectional=bidirectional,
                                batch_first=True)).double()
    gru = to_torch_gru(conv)
    assert isinstance(gru, nn.GRU) and gru.batch_first and gru.bidirectional == bidirectional
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out, h_n = gru(x)
    out_c, h_n_c = conv(_spatial(x, 2))
    torch.testing.assert_close(out_c, _spatial(out, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n_c, _spatial(h_n, 2), rtol=1e-12, atol=1e-12)
    back = from_torch_gru(gru)
    for name, p in conv.named_parameters():
        assert torch.equal(p, dict(back.named_parameters())[name]), name
    cell = _randomise(ConvGRUCell2d(3, 4, 1, reset_after=True, bias=False))
    gru_cell = to_torch_gru(cell)
    assert isinstance(gru_cell, nn.GRUCell) and not gru_cell.bias
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    torch.testing.assert_close(cell(_spatial(x, 2), _spatial(h, 2)), _spatial(gru_cell(x, h), 2))


def test_torch_gru_errors():
    with pytest.raises(ValueError, match=r"kernel_size of all 1s, got kernel_size=\(3, 3\)"):
        to_torch_gru(ConvGRU2d(2, 3, 3, reset_after=True))
    with pytest.raises(ValueError, match="expected reset_after=True, got reset_after=False"):
        to_torch_gru(ConvGRU2d(2, 3, 1))
    with pytest.raises(TypeError, match="SepConvGRUCell2d"):
        to_torch_gru(SepConvGRUCell2d(2, 3))
    with pytest.raises(TypeError, match="torch.nn.GRU or torch.nn.GRUCell, got LSTM"):
        from_torch_gru(nn.LSTM(2, 3))
    with pytest.raises(ValueError, match="dims to be 1, 2 or 3.*got 4"):
        from_torch_gru(nn.GRU(2, 3), dims=4)
