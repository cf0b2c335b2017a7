"""Tests of the public modules ``ConvGRUCell{1,2,3}d`` / ``ConvGRU{1,2,3}d`` and the
functional forms ``conv_gru_cell`` / ``conv_gru``, on both backends.

Every result is checked against a reference written here, independently of the
package: a per-step loop in plain PyTorch (``F.conv{1,2,3}d`` with
``padding='same'`` for zero padding, ``F.pad`` + unpadded convolution for the
other padding modes) implementing the equations of the module docstring, with a
multi-layer / bidirectional / batch_first / unbatched sequence loop on top.
Outputs, final states and the gradients of the input, the initial state and
every parameter are compared, in float64 (tight) and float32.

``backend="triton"`` runs the fused kernels: compiled on CUDA tensors on a GPU
machine, under the Triton interpreter on CPU tensors elsewhere (see conftest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import convgru_triton
from convgru_triton import (
    ConvGRU,
    ConvGRU1d,
    ConvGRU2d,
    ConvGRU3d,
    ConvGRUCell,
    ConvGRUCell1d,
    ConvGRUCell2d,
    ConvGRUCell3d,
    conv_gru,
    conv_gru_cell,
)

# The reference's F.conv*d(padding='same') warns about a padded copy for even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

BACKENDS = ["torch", "triton"]
CELLS = {1: ConvGRUCell1d, 2: ConvGRUCell2d, 3: ConvGRUCell3d}
SEQS = {1: ConvGRU1d, 2: ConvGRU2d, 3: ConvGRU3d}
SPATIAL = {1: (7,), 2: (5, 7), 3: (3, 4, 5)}
C_IN, HID, BATCH, STEPS = 3, 4, 2, 3

TOL64 = dict(atol=1e-10, rtol=1e-8)
TOL32 = dict(atol=1e-5, rtol=1e-4)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ----------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------


def _tuple(v, dims):
    return (v,) * dims if isinstance(v, int) else tuple(v)


def ref_conv(x, w, dilation=1, padding_mode="zeros"):
    """'Same' convolution, stride 1, no bias; x batched (N, C, *S) or unbatched (C, *S)."""
    dims = w.dim() - 2
    dil = _tuple(dilation, dims)
    conv = CONV[dims]
    if padding_mode == "zeros":
        return conv(x, w, None, 1, "same", dil)
    pad = []
    for k, d in zip(reversed(w.shape[2:]), reversed(dil)):  # F.pad: last dim first
        total = d * (k - 1)
        pad += [total // 2, total - total // 2]  # smaller half on the left, as 'same'
    return conv(F.pad(x, pad, mode=padding_mode), w, None, 1, 0, dil)


def ref_cell(x, h, w_ih, w_hh, b_ih, b_hh, *, reset_after, dilation=1, padding_mode="zeros"):
    """One step of the module docstring's equations, batched or unbatched."""
    dims = w_ih.dim() - 2
    cdim = x.dim() - dims - 1  # 1 batched, 0 unbatched
    hid = w_hh.shape[1]
    if h is None:
        h = torch.zeros(x.shape[:cdim] + (hid,) + x.shape[cdim + 1:], dtype=x.dtype, device=x.device)

    def conv(t, w):
        return ref_conv(t, w, dilation, padding_mode)

    def b(bias, g):
        return 0.0 if bias is None else bias[g * hid:(g + 1) * hid].reshape((hid,) + (1,) * dims)

    def gate(t, g):
        return t.narrow(cdim, g * hid, hid)

    gx = conv(x, w_ih)
    gh_rz = conv(h, w_hh[: 2 * hid])
    r = torch.sigmoid(gate(gx, 0) + b(b_ih, 0) + gate(gh_rz, 0) + b(b_hh, 0))
    z = torch.sigmoid(gate(gx, 1) + b(b_ih, 1) + gate(gh_rz, 1) + b(b_hh, 1))
    if reset_after:
        n = torch.tanh(gate(gx, 2) + b(b_ih, 2) + r * (conv(h, w_hh[2 * hid:]) + b(b_hh, 2)))
    else:
        n = torch.tanh(gate(gx, 2) + b(b_ih, 2) + conv(r * h, w_hh[2 * hid:]) + b(b_hh, 2))
    return (1 - z) * h + z * n


def ref_seq(x, hx, weights, *, num_layers, bidirectional, batch_first, reset_after,
            dilation=1, padding_mode="zeros", dropout=0.0):
    """Stacked (bi)directional loop over ``ref_cell``; ``weights`` layer-major, forward first."""
    dims = weights[0][0].dim() - 2
    batched = x.dim() == dims + 3
    tdim = 1 if (batched and batch_first) else 0
    cdim = 2 if batched else 1
    directions = 2 if bidirectional else 1
    steps = x.shape[tdim]
    layer_in = x
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            idx = layer * directions + d
            h = None if hx is None else hx[idx]
            per_step = [None] * steps
            for t in (reversed(range(steps)) if d == 1 else range(steps)):
                h = ref_cell(layer_in.select(tdim, t), h, *weights[idx], reset_after=reset_after,
                             dilation=dilation, padding_mode=padding_mode)
                per_step[t] = h
            outs.append(torch.stack(per_step, tdim))
            finals.append(h)
        layer_in = torch.cat(outs, cdim)
        if dropout > 0 and layer < num_layers - 1:
            layer_in = F.dropout(layer_in, dropout, training=True)
    return layer_in, torch.stack(finals)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def seq_param_names(num_layers, bidirectional, bias):
    names = []
    for layer in range(num_layers):
        for sfx in [""] + (["_reverse"] if bidirectional else []):
            group = [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
            group += [f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"] if bias else [None, None]
            names.append(group)
    return names


def leaf_copies(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


def grads(outputs, cotangents, inputs):
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


def randn(shape, device, dtype, scale=1.0, grad=True):
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


@dataclass(frozen=True)
class Cfg:
    dims: int = 2
    kernel: Union[int, Tuple[int, ...]] = 3
    reset_after: bool = False
    bias: bool = True
    hx: bool = True
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    unbatched: bool = False
    dilation: Union[int, Tuple[int, ...]] = 1
    padding_mode: str = "zeros"
    spatial: Optional[Tuple[int, ...]] = None
    steps: int = STEPS

    @property
    def size(self):
        return self.spatial or SPATIAL[self.dims]

    def conv_kwargs(self):
        return dict(bias=self.bias, reset_after=self.reset_after, padding_mode=self.padding_mode,
                    dilation=self.dilation)


def case(id, **kw):
    return pytest.param(Cfg(**kw), id=id)


# ----------------------------------------------------------------------------
# Sequences vs the reference
# ----------------------------------------------------------------------------

SEQ_CASES = [
    case("1d", dims=1),
    case("1d-reset_after-nobias-bidir", dims=1, reset_after=True, bias=False, bidirectional=True),
    case("1d-k4-reflect-dil2-batch_first-2layers", dims=1, kernel=4, padding_mode="reflect", dilation=2,
         batch_first=True, num_layers=2, spatial=(9,)),
    case("2d", dims=2),
    case("2d-reset_after", reset_after=True),
    case("2d-nobias", bias=False),
    case("2d-reset_after-nobias", reset_after=True, bias=False),
    case("2d-nohx", hx=False),
    case("2d-reset_after-nohx-2layers-bidir", reset_after=True, hx=False, num_layers=2, bidirectional=True),
    case("2d-2layers", num_layers=2),
    case("2d-bidir", bidirectional=True),
    case("2d-2layers-bidir-reset_after", num_layers=2, bidirectional=True, reset_after=True),
    case("2d-batch_first", batch_first=True),
    case("2d-batch_first-bidir-reset_after", batch_first=True, bidirectional=True, reset_after=True),
    case("2d-unbatched", unbatched=True),
    case("2d-unbatched-2layers-bidir-nohx", unbatched=True, num_layers=2, bidirectional=True, hx=False),
    case("2d-unbatched-batch_first-reset_after", unbatched=True, batch_first=True, reset_after=True),
    case("2d-k1x5", kernel=(1, 5)),
    case("2d-k3x1-reset_after", kernel=(3, 1), reset_after=True),
    case("2d-k2", kernel=2),
    case("2d-k4-reset_after-bidir", kernel=4, reset_after=True, bidirectional=True),
    case("2d-dil2", dilation=2),
    case("2d-k3x2-dil1x2-2layers", kernel=(3, 2), dilation=(1, 2), num_layers=2),
    case("2d-reflect", padding_mode="reflect"),
    case("2d-replicate-reset_after", padding_mode="replicate", reset_after=True),
    case("2d-circular", padding_mode="circular"),
    case("2d-circular-k4-dil2-reset_after", padding_mode="circular", kernel=4, dilation=2, reset_after=True),
    case("2d-reflect-k2-nobias-bidir", padding_mode="reflect", kernel=2, bias=False, bidirectional=True),
    case("2d-replicate-k1x4-unbatched", padding_mode="replicate", kernel=(1, 4), unbatched=True),
    case("3d", dims=3),
    case("3d-reset_after-bidir-2layers", dims=3, reset_after=True, bidirectional=True, num_layers=2, steps=2),
    case("3d-k1x3x2-replicate-nohx", dims=3, kernel=(1, 3, 2), padding_mode="replicate", hx=False),
    case("3d-circular-unbatched-dil2", dims=3, padding_mode="circular", unbatched=True, dilation=2,
         spatial=(3, 5, 5)),
]

SEQ_CASES_32 = [
    case("1d", dims=1),
    case("2d-2layers-bidir-reset_after", num_layers=2, bidirectional=True, reset_after=True),
    case("2d-k4-circular-batch_first", kernel=4, padding_mode="circular", batch_first=True),
    case("2d-k1x5-reflect-nobias", kernel=(1, 5), padding_mode="reflect", bias=False),
    case("3d-reset_after", dims=3, reset_after=True),
]


def make_seq(cfg: Cfg, backend, device, dtype, **kw):
    return SEQS[cfg.dims](C_IN, HID, cfg.kernel, num_layers=cfg.num_layers, batch_first=cfg.batch_first,
                          bidirectional=cfg.bidirectional, device=device, dtype=dtype, backend=backend,
                          **cfg.conv_kwargs(), **kw)


def seq_shapes(cfg: Cfg, batch=BATCH, steps=None):
    steps = cfg.steps if steps is None else steps
    directions = 2 if cfg.bidirectional else 1
    lead = (steps,) if cfg.unbatched else ((batch, steps) if cfg.batch_first else (steps, batch))
    hx_lead = (cfg.num_layers * directions,) + (() if cfg.unbatched else (batch,))
    x_shape = lead + (C_IN,) + cfg.size
    out_shape = lead + (directions * HID,) + cfg.size
    h_shape = hx_lead + (HID,) + cfg.size
    return x_shape, h_shape, out_shape


def check_sequence(cfg: Cfg, backend, device, dtype, tol):
    torch.manual_seed(0)
    model = make_seq(cfg, backend, device, dtype)
    x_shape, h_shape, out_shape = seq_shapes(cfg)
    x = randn(x_shape, device, dtype)
    hx = randn(h_shape, device, dtype, 0.5) if cfg.hx else None

    names = seq_param_names(cfg.num_layers, cfg.bidirectional, cfg.bias)
    flat = [n for group in names for n in group if n is not None]
    expected_names = {n for group in names for n in group if n is not None}
    assert {n for n, _ in model.named_parameters()} == expected_names
    params = [getattr(model, n) for n in flat]

    out, h_n = model(x, hx)
    assert out.shape == out_shape and h_n.shape == h_shape
    assert out.dtype == dtype and h_n.dtype == dtype and out.device.type == device.type

    # Reference in float64 from the same values.
    ref_inputs = leaf_copies([x, hx], torch.float64)
    ref_params = dict(zip(flat, leaf_copies(params, torch.float64)))
    weights = [tuple(None if n is None else ref_params[n] for n in group) for group in names]
    ref_out, ref_h_n = ref_seq(ref_inputs[0], ref_inputs[1], weights, num_layers=cfg.num_layers,
                               bidirectional=cfg.bidirectional, batch_first=cfg.batch_first,
                               reset_after=cfg.reset_after, dilation=cfg.dilation,
                               padding_mode=cfg.padding_mode)
    assert_close(out, ref_out.to(dtype), **tol)
    assert_close(h_n, ref_h_n.to(dtype), **tol)

    g_out = torch.randn(out_shape, dtype=torch.float64).to(device)
    g_h = torch.randn(h_shape, dtype=torch.float64).to(device)
    wrt = [x] + ([hx] if cfg.hx else []) + params
    ref_wrt = [ref_inputs[0]] + ([ref_inputs[1]] if cfg.hx else []) + [ref_params[n] for n in flat]
    got = grads([out, h_n], [g_out.to(dtype), g_h.to(dtype)], wrt)
    want = grads([ref_out, ref_h_n], [g_out, g_h], ref_wrt)
    labels = ["input"] + (["hx"] if cfg.hx else []) + flat
    for label, a, b in zip(labels, got, want):
        assert_close(a, b.to(dtype), **tol, msg=lambda m, label=label: f"grad of {label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", SEQ_CASES)
def test_sequence_matches_reference_float64(cfg, backend, device):
    check_sequence(cfg, backend, device, torch.float64, TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", SEQ_CASES_32)
def test_sequence_matches_reference_float32(cfg, backend, device):
    check_sequence(cfg, backend, device, torch.float32, TOL32)


# ----------------------------------------------------------------------------
# Cells vs the reference
# ----------------------------------------------------------------------------

CELL_CASES = [
    case("1d", dims=1),
    case("1d-reset_after-nobias-k4-reflect", dims=1, reset_after=True, bias=False, kernel=4, padding_mode="reflect"),
    case("2d", dims=2),
    case("2d-reset_after", reset_after=True),
    case("2d-nobias", bias=False),
    case("2d-nohx", hx=False),
    case("2d-reset_after-nohx", reset_after=True, hx=False),
    case("2d-unbatched", unbatched=True),
    case("2d-unbatched-nohx-reset_after", unbatched=True, hx=False, reset_after=True),
    case("2d-k1x5-reflect", kernel=(1, 5), padding_mode="reflect"),
    case("2d-k3x1-circular", kernel=(3, 1), padding_mode="circular"),
    case("2d-k4-circular-reset_after", kernel=4, padding_mode="circular", reset_after=True),
    case("2d-k2-dil2-replicate", kernel=2, dilation=2, padding_mode="replicate"),
    case("3d-reset_after", dims=3, reset_after=True),
    case("3d-k3x1x2-nobias-circular", dims=3, kernel=(3, 1, 2), bias=False, padding_mode="circular"),
]

CELL_CASES_32 = [
    case("2d", dims=2),
    case("2d-k4-reflect-reset_after", kernel=4, padding_mode="reflect", reset_after=True),
    case("3d-dil2", dims=3, dilation=2, spatial=(3, 5, 5)),
]


def make_cell(cfg: Cfg, backend, device, dtype):
    return CELLS[cfg.dims](C_IN, HID, cfg.kernel, device=device, dtype=dtype, backend=backend, **cfg.conv_kwargs())


def check_cell(cfg: Cfg, backend, device, dtype, tol):
    torch.manual_seed(0)
    cell = make_cell(cfg, backend, device, dtype)
    lead = () if cfg.unbatched else (BATCH,)
    x = randn(lead + (C_IN,) + cfg.size, device, dtype)
    hx = randn(lead + (HID,) + cfg.size, device, dtype, 0.5) if cfg.hx else None
    flat = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if cfg.bias else [])
    assert {n for n, _ in cell.named_parameters()} == set(flat)
    params = [getattr(cell, n) for n in flat]

    h_new = cell(x, hx)
    assert h_new.shape == lead + (HID,) + cfg.size and h_new.dtype == dtype

    ref_x, ref_hx = leaf_copies([x, hx], torch.float64)
    ref_p = leaf_copies(params, torch.float64)
    full = ref_p + [None, None] if not cfg.bias else ref_p
    ref_h = ref_cell(ref_x, ref_hx, *full, reset_after=cfg.reset_after, dilation=cfg.dilation,
                     padding_mode=cfg.padding_mode)
    assert_close(h_new, ref_h.to(dtype), **tol)

    g = torch.randn(h_new.shape, dtype=torch.float64).to(device)
    wrt = [x] + ([hx] if cfg.hx else []) + params
    ref_wrt = [ref_x] + ([ref_hx] if cfg.hx else []) + ref_p
    labels = ["input"] + (["hx"] if cfg.hx else []) + flat
    for label, a, b in zip(labels, grads([h_new], [g.to(dtype)], wrt), grads([ref_h], [g], ref_wrt)):
        assert_close(a, b.to(dtype), **tol, msg=lambda m, label=label: f"grad of {label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CELL_CASES)
def test_cell_matches_reference_float64(cfg, backend, device):
    check_cell(cfg, backend, device, torch.float64, TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", CELL_CASES_32)
def test_cell_matches_reference_float32(cfg, backend, device):
    check_cell(cfg, backend, device, torch.float32, TOL32)


@pytest.mark.parametrize("kernel,dilation", [(2, 1), (4, 1), (2, 2), ((4, 3), (1, 2))], ids=str)
def test_reference_same_padding_convention(kernel, dilation):
    """The reference's explicit split (left = total // 2) is what F.conv2d's
    padding='same' does for even kernels too, so both reference paths agree."""
    torch.manual_seed(0)
    k = _tuple(kernel, 2)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    w = torch.randn(5, 3, *k, dtype=torch.float64)
    same = F.conv2d(x, w, None, 1, "same", _tuple(dilation, 2))
    assert same.shape[2:] == x.shape[2:]
    assert_close(same, ref_conv(x, w, dilation, "constant"), **TOL64)


# ----------------------------------------------------------------------------
# Functional forms
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_functional_conv_gru_cell(backend, reset_after, device):
    torch.manual_seed(0)
    dt = torch.float64
    x = randn((BATCH, C_IN, 6, 5), device, dt)
    hx = randn((BATCH, HID, 6, 5), device, dt, 0.5)
    w_ih = randn((3 * HID, C_IN, 3, 2), device, dt, 0.3)
    w_hh = randn((3 * HID, HID, 3, 2), device, dt, 0.3)
    b_ih, b_hh = randn((3 * HID,), device, dt, 0.3), randn((3 * HID,), device, dt, 0.3)
    args = [x, hx, w_ih, w_hh, b_ih, b_hh]
    h_new = conv_gru_cell(*args, reset_after=reset_after, padding_mode="reflect", dilation=(1, 2), backend=backend)
    ref_args = leaf_copies(args)
    ref = ref_cell(*ref_args, reset_after=reset_after, dilation=(1, 2), padding_mode="reflect")
    assert_close(h_new, ref, **TOL64)
    g = torch.randn_like(ref)
    for a, b in zip(grads([h_new], [g], args), grads([ref], [g], ref_args)):
        assert_close(a, b, **TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_conv_gru(backend, device):
    torch.manual_seed(0)
    dt = torch.float64
    layers, directions = 2, 2
    params = []
    for layer in range(layers):
        for _ in range(directions):
            c_in = C_IN if layer == 0 else directions * HID
            params.append((randn((3 * HID, c_in, 3), device, dt, 0.3), randn((3 * HID, HID, 3), device, dt, 0.3),
                           randn((3 * HID,), device, dt, 0.3), randn((3 * HID,), device, dt, 0.3)))
    x = randn((BATCH, STEPS, C_IN, 7), device, dt)
    hx = randn((layers * directions, BATCH, HID, 7), device, dt, 0.5)
    kw = dict(num_layers=layers, bidirectional=True, batch_first=True, reset_after=True)
    out, h_n = conv_gru(x, hx, params, padding_mode="circular", backend=backend, **kw)
    flat = [t for p in params for t in p]
    ref_leaves = leaf_copies([x, hx] + flat)
    ref_params = [tuple(ref_leaves[2 + 4 * i: 6 + 4 * i]) for i in range(len(params))]
    ref_out, ref_h_n = ref_seq(ref_leaves[0], ref_leaves[1], ref_params, padding_mode="circular", **kw)
    assert out.shape == (BATCH, STEPS, directions * HID, 7)
    assert_close(out, ref_out, **TOL64)
    assert_close(h_n, ref_h_n, **TOL64)
    g_out, g_h = torch.randn_like(ref_out), torch.randn_like(ref_h_n)
    for a, b in zip(grads([out, h_n], [g_out, g_h], [x, hx] + flat),
                    grads([ref_out, ref_h_n], [g_out, g_h], ref_leaves)):
        assert_close(a, b, **TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_module(backend, device):
    torch.manual_seed(0)
    model = ConvGRU1d(C_IN, HID, 3, num_layers=2, device=device, dtype=torch.float64, backend=backend)
    x = randn((STEPS, BATCH, C_IN, 7), device, torch.float64, grad=False)
    hx = randn((2, BATCH, HID, 7), device, torch.float64, grad=False)
    out, h_n = model(x, hx)
    f_out, f_h_n = conv_gru(x, hx, model.all_weights, num_layers=2, backend=backend)
    assert_close(out, f_out, atol=0, rtol=0)
    assert_close(h_n, f_h_n, atol=0, rtol=0)
    cell = ConvGRUCell1d(C_IN, HID, 3, device=device, dtype=torch.float64, backend=backend)
    assert_close(cell(x[0], hx[0]), conv_gru_cell(x[0], hx[0], cell.weight_ih, cell.weight_hh, cell.bias_ih,
                                                  cell.bias_hh, backend=backend), atol=0, rtol=0)


# ----------------------------------------------------------------------------
# Memory layouts: channels_last and non-contiguous views
# ----------------------------------------------------------------------------


def frames_channels_last(t: torch.Tensor) -> torch.Tensor:
    """Same values, each (C, *S) frame of a (T, N, C, *S) tensor stored channels-innermost,
    e.g. x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for 2-D frames."""
    lead = 2  # (T, N) or (L*D, N)
    perm = list(range(lead)) + list(range(lead + 1, t.dim())) + [lead]
    inv = [perm.index(i) for i in range(t.dim())]
    return t.permute(perm).contiguous().permute(inv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
def test_sequence_channels_last_frames(dims, reset_after, backend, device):
    torch.manual_seed(0)
    dt = torch.float64
    cfg = Cfg(dims=dims, reset_after=reset_after, bidirectional=True, num_layers=2, steps=2)
    model = make_seq(cfg, backend, device, dt)
    x_shape, h_shape, _ = seq_shapes(cfg)
    x_c = randn(x_shape, device, dt, grad=False)
    h_c = randn(h_shape, device, dt, 0.5, grad=False)
    x_cl = frames_channels_last(x_c).requires_grad_(True)
    h_cl = frames_channels_last(h_c).requires_grad_(True)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert x_cl[0].is_contiguous(memory_format=fmt) and not x_cl.is_contiguous()
    assert h_cl[0].is_contiguous(memory_format=fmt) and not h_cl.is_contiguous()
    x_c.requires_grad_(True)
    h_c.requires_grad_(True)
    params = list(model.parameters())
    results = []
    for x, hx in ((x_c, h_c), (x_cl, h_cl)):
        out, h_n = model(x, hx)
        torch.manual_seed(1)  # not randn_like, which would follow the memory layout
        g_out = torch.randn(out.shape, dtype=dt, device=device)
        g_h = torch.randn(h_n.shape, dtype=dt, device=device)
        results.append([out, h_n] + list(grads([out, h_n], [g_out, g_h], [x, hx] + params)))
    for a, b in zip(*results):
        assert_close(b, a, **TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_cell_channels_last(reset_after, hx_given, backend, device):
    torch.manual_seed(0)
    dt = torch.float64
    cell = ConvGRUCell2d(C_IN, HID, 3, reset_after=reset_after, device=device, dtype=dt, backend=backend)
    x_c = randn((BATCH, C_IN, 6, 5), device, dt, grad=False)
    h_c = randn((BATCH, HID, 6, 5), device, dt, 0.5, grad=False)
    x_cl = x_c.to(memory_format=torch.channels_last).requires_grad_(True)
    h_cl = h_c.to(memory_format=torch.channels_last).requires_grad_(True)
    x_c.requires_grad_(True)
    h_c.requires_grad_(True)
    params = list(cell.parameters())
    results = []
    for x, hx in ((x_c, h_c), (x_cl, h_cl)):
        h_new = cell(x, hx if hx_given else None)
        g = torch.randn(h_new.shape, dtype=dt, generator=torch.Generator().manual_seed(1)).to(device)
        wrt = [x] + ([hx] if hx_given else []) + params
        results.append((h_new, [h_new] + list(grads([h_new], [g], wrt))))
    (h_c_new, plain), (h_cl_new, last) = results
    assert h_cl_new.is_contiguous(memory_format=torch.channels_last), h_cl_new.stride()
    for a, b in zip(plain, last):
        assert_close(b, a, **TOL64)


# The Triton variants in the slow tier (seconds each under the interpreter); the
# kernels' strided reads are covered by test_sequence_channels_last_frames and the
# property tests.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=[pytest.mark.slow] if b == "triton" else [])
                                     for b in BACKENDS])
@pytest.mark.parametrize("view", ["sliced", "transposed", "expanded_hx", "expanded_grad"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_sequence_non_contiguous(view, reset_after, backend, device):
    """Views of every kind give what contiguous copies give, gradients included
    (taken with respect to the tensors the views are made from)."""
    torch.manual_seed(0)
    dt = torch.float64
    model = ConvGRU2d(C_IN, HID, 3, num_layers=2, bidirectional=True, reset_after=reset_after,
                      device=device, dtype=dt, backend=backend)
    T, N, L = 2, BATCH, 4
    if view == "sliced":
        x_base = randn((T, N, C_IN, 5, 14), device, dt)
        h_base = randn((L, N, HID, 10, 7), device, dt, 0.5)
        make = lambda xb, hb: (xb[..., ::2], hb[..., ::2, :])  # noqa: E731
    elif view == "transposed":
        x_base = randn((N, T, C_IN, 7, 5), device, dt)
        h_base = randn((L, N, HID, 7, 5), device, dt, 0.5)
        make = lambda xb, hb: (xb.transpose(0, 1).transpose(-1, -2), hb.transpose(-1, -2))  # noqa: E731
    else:
        x_base = randn((T, N, C_IN, 5, 7), device, dt)
        h_base = randn((L, 1, HID, 5, 7), device, dt, 0.5)
        make = lambda xb, hb: (xb, hb.expand(L, N, HID, 5, 7))  # noqa: E731
    params = list(model.parameters())
    results = []
    for contiguous in (True, False):
        x, hx = make(x_base, h_base)
        if contiguous:
            x, hx = x.contiguous(), hx.contiguous()
        else:
            assert not (x.is_contiguous() and hx.is_contiguous())
        out, h_n = model(x, hx)
        if view == "expanded_grad":
            loss = out.sum() + 2 * h_n.sum()  # incoming gradients with all strides 0
        else:
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dt, device=device).view(out.shape)).sum() \
                + (h_n * h_n).sum()
        results.append([out, h_n] + list(torch.autograd.grad(loss, [x_base, h_base] + params)))
    for a, b in zip(*results):
        assert_close(b, a, **TOL64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["sliced", "transposed", "expanded_hx"])
def test_cell_non_contiguous(view, backend, device):
    torch.manual_seed(0)
    dt = torch.float64
    cell = ConvGRUCell2d(C_IN, HID, 3, device=device, dtype=dt, backend=backend)
    if view == "sliced":
        x_base = randn((BATCH, C_IN, 5, 14), device, dt)
        h_base = randn((BATCH, HID, 10, 7), device, dt, 0.5)
        make = lambda xb, hb: (xb[..., ::2], hb[..., ::2, :])  # noqa: E731
    elif view == "transposed":
        x_base = randn((C_IN, BATCH, 7, 5), device, dt)
        h_base = randn((BATCH, HID, 7, 5), device, dt, 0.5)
        make = lambda xb, hb: (xb.transpose(0, 1).transpose(-1, -2), hb.transpose(-1, -2))  # noqa: E731
    else:
        x_base = randn((BATCH, C_IN, 5, 7), device, dt)
        h_base = randn((1, HID, 5, 7), device, dt, 0.5)
        make = lambda xb, hb: (xb, hb.expand(BATCH, HID, 5, 7))  # noqa: E731
    params = list(cell.parameters())
    results = []
    for contiguous in (True, False):
        x, hx = make(x_base, h_base)
        if contiguous:
            x, hx = x.contiguous(), hx.contiguous()
        h_new = cell(x, hx)
        loss = (h_new * torch.linspace(-1, 1, h_new.numel(), dtype=dt, device=device).view(h_new.shape)).sum()
        results.append([h_new] + list(torch.autograd.grad(loss, [x_base, h_base] + params)))
    for a, b in zip(*results):
        assert_close(b, a, **TOL64)


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------


@pytest.mark.triton_kernels
def test_dropout_same_on_both_backends_and_matches_reference(device):
    dt = torch.float64
    torch.manual_seed(0)
    models = {b: ConvGRU2d(C_IN, HID, 3, num_layers=2, dropout=0.5, device=device, dtype=dt, backend=b)
              for b in BACKENDS}
    models["triton"].load_state_dict(models["torch"].state_dict())
    x = randn((STEPS, BATCH, C_IN, 5, 7), device, dt, grad=False)
    hx = randn((2, BATCH, HID, 5, 7), device, dt, 0.5, grad=False)
    results = {}
    for b, m in models.items():
        m.train()
        torch.manual_seed(123)
        results[b] = m(x, hx)
    assert_close(results["triton"][0], results["torch"][0], **TOL64)
    assert_close(results["triton"][1], results["torch"][1], **TOL64)

    # The reference applies F.dropout after layer 0 with the same random stream.
    m = models["torch"]
    weights = [tuple(getattr(m, n) for n in group) for group in seq_param_names(2, False, True)]
    torch.manual_seed(123)
    with torch.no_grad():
        ref_out, ref_h_n = ref_seq(x, hx, weights, num_layers=2, bidirectional=False, batch_first=False,
                                   reset_after=False, dropout=0.5)
    assert_close(results["torch"][0], ref_out, **TOL64)
    assert_close(results["torch"][1], ref_h_n, **TOL64)

    # Dropout did something in training mode...
    m.eval()
    eval_out, eval_h_n = m(x, hx)
    assert not torch.allclose(eval_out, results["torch"][0])
    # ... and another seed draws another mask.
    m.train()
    torch.manual_seed(124)
    assert not torch.allclose(m(x, hx)[0], results["torch"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_has_no_effect_in_eval(backend, device):
    dt = torch.float64
    torch.manual_seed(0)
    with_dropout = ConvGRU2d(C_IN, HID, 3, num_layers=2, dropout=0.5, bidirectional=True, device=device,
                             dtype=dt, backend=backend)
    without = ConvGRU2d(C_IN, HID, 3, num_layers=2, dropout=0.0, bidirectional=True, device=device,
                        dtype=dt, backend=backend)
    without.load_state_dict(with_dropout.state_dict())
    x = randn((STEPS, BATCH, C_IN, 5, 7), device, dt, grad=False)
    hx = randn((4, BATCH, HID, 5, 7), device, dt, 0.5, grad=False)
    with_dropout.eval()
    out, h_n = with_dropout(x, hx)
    for training in (False, True):  # dropout=0 is a no-op in both modes
        without.train(training)
        ref_out, ref_h_n = without(x, hx)
        assert_close(out, ref_out, atol=0, rtol=0)
        assert_close(h_n, ref_h_n, atol=0, rtol=0)
    # dropout=1 zeroes layer 0's output in training: layer 1 then sees only zeros.
    full = ConvGRU2d(C_IN, HID, 3, num_layers=2, dropout=1.0, bidirectional=True, device=device, dtype=dt,
                     backend=backend)
    full.load_state_dict(with_dropout.state_dict())
    full.train()
    out_full, _ = full(x, hx)
    weights = [tuple(getattr(full, n) for n in g) for g in seq_param_names(2, True, True)]
    with torch.no_grad():
        ref_full, _ = ref_seq(torch.zeros(STEPS, BATCH, 2 * HID, 5, 7, device=device, dtype=dt), hx[2:],
                              weights[2:], num_layers=1, bidirectional=True, batch_first=False, reset_after=False)
    assert_close(out_full, ref_full, **TOL64)


# ----------------------------------------------------------------------------
# Parameters, state dicts, aliases
# ----------------------------------------------------------------------------


def test_parameter_names_and_shapes():
    m = ConvGRU2d(3, 4, 3, num_layers=2, bidirectional=True)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    expected = {}
    for sfx in ("", "_reverse"):
        expected.update({
            f"weight_ih_l0{sfx}": (12, 3, 3, 3), f"weight_hh_l0{sfx}": (12, 4, 3, 3),
            f"bias_ih_l0{sfx}": (12,), f"bias_hh_l0{sfx}": (12,),
            f"weight_ih_l1{sfx}": (12, 8, 3, 3), f"weight_hh_l1{sfx}": (12, 4, 3, 3),
            f"bias_ih_l1{sfx}": (12,), f"bias_hh_l1{sfx}": (12,),
        })
    assert shapes == expected
    assert [tuple(t.shape) for t in m.all_weights[3]] == [(12, 8, 3, 3), (12, 4, 3, 3), (12,), (12,)]
    assert m.all_weights[3][0] is m.weight_ih_l1_reverse

    no_bias = ConvGRU3d(2, 5, (1, 3, 2), num_layers=2, bias=False)
    assert {n: tuple(p.shape) for n, p in no_bias.named_parameters()} == {
        "weight_ih_l0": (15, 2, 1, 3, 2), "weight_hh_l0": (15, 5, 1, 3, 2),
        "weight_ih_l1": (15, 5, 1, 3, 2), "weight_hh_l1": (15, 5, 1, 3, 2),
    }
    assert no_bias.bias_ih_l0 is None and no_bias.bias_hh_l1 is None

    cell = ConvGRUCell1d(3, 4, 5)
    assert {n: tuple(p.shape) for n, p in cell.named_parameters()} == {
        "weight_ih": (12, 3, 5), "weight_hh": (12, 4, 5), "bias_ih": (12,), "bias_hh": (12,)}
    cell_nb = ConvGRUCell2d(3, 4, (1, 5), bias=False)
    assert {n for n, _ in cell_nb.named_parameters()} == {"weight_ih", "weight_hh"}
    assert cell_nb.bias_ih is None and cell_nb.bias_hh is None
    assert cell_nb.weight_hh.shape == (12, 4, 1, 5)


def test_aliases():
    assert ConvGRU is ConvGRU2d
    assert ConvGRUCell is ConvGRUCell2d
    assert convgru_triton.ConvGRU is ConvGRU2d and convgru_triton.ConvGRUCell is ConvGRUCell2d


@pytest.mark.triton_kernels
@pytest.mark.parametrize("direction", ["torch->triton", "triton->torch"])
def test_state_dict_round_trip_between_backends(direction, device):
    src_backend, dst_backend = direction.split("->")
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, reset_after=True, padding_mode="replicate", device=device,
              dtype=torch.float64)
    src = ConvGRU2d(C_IN, HID, (3, 2), backend=src_backend, **kw)
    dst = ConvGRU2d(C_IN, HID, (3, 2), backend=dst_backend, **kw)
    sd = src.state_dict()
    assert set(sd) == {n for n, _ in src.named_parameters()}
    dst.load_state_dict(sd)
    for name, value in dst.state_dict().items():
        assert torch.equal(value, sd[name]), name
    x = randn((STEPS, BATCH, C_IN, 5, 7), device, torch.float64, grad=False)
    hx = randn((4, BATCH, HID, 5, 7), device, torch.float64, 0.5, grad=False)
    for a, b in zip(src(x, hx), dst(x, hx)):
        assert_close(b, a, **TOL64)

    cell_src = ConvGRUCell3d(C_IN, HID, 3, backend=src_backend, device=device, dtype=torch.float64)
    cell_dst = ConvGRUCell3d(C_IN, HID, 3, backend=dst_backend, device=device, dtype=torch.float64)
    cell_dst.load_state_dict(cell_src.state_dict())
    xc = randn((BATCH, C_IN, 3, 4, 5), device, torch.float64, grad=False)
    hc = randn((BATCH, HID, 3, 4, 5), device, torch.float64, 0.5, grad=False)
    assert_close(cell_dst(xc, hc), cell_src(xc, hc), **TOL64)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


# The slow tier: many training steps.
@pytest.mark.slow
@pytest.mark.triton_kernels
def test_training_reduces_loss(device):
    torch.manual_seed(0)
    model = ConvGRU2d(2, 4, 3, device=device, backend="triton")
    x = torch.randn(3, 2, 2, 6, 5, device=device)
    hx = torch.zeros(1, 2, 4, 6, 5, device=device)
    target = 0.5 * torch.randn(3, 2, 4, 6, 5, device=device).clamp(-1.5, 1.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out, _ = model(x, hx)
        loss = F.mse_loss(out, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------
# Equivalence with the seed document's naive ConvGRU (six nn.Conv2d)
# ----------------------------------------------------------------------------


class SeedConvGRUCell(nn.Module):
    def __init__(self, input_channels, hidden_channels, kernel_size=3):
        super().__init__()
        pad = kernel_size // 2
        for g in "zrn":
            setattr(self, f"conv_x_{g}", nn.Conv2d(input_channels, hidden_channels, kernel_size, padding=pad))
            setattr(self, f"conv_h_{g}", nn.Conv2d(hidden_channels, hidden_channels, kernel_size, padding=pad))

    def forward(self, x, h):
        z = torch.sigmoid(self.conv_x_z(x) + self.conv_h_z(h))
        r = torch.sigmoid(self.conv_x_r(x) + self.conv_h_r(h))
        n = torch.tanh(self.conv_x_n(x) + self.conv_h_n(r * h))
        return (1 - z) * h + z * n


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_six_conv_equivalence(backend, device):
    torch.manual_seed(0)
    dt = torch.float64
    seed = SeedConvGRUCell(C_IN, HID).to(device=device, dtype=dt)
    cell = ConvGRUCell2d(C_IN, HID, 3, device=device, dtype=dt, backend=backend)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.cat([seed.conv_x_r.weight, seed.conv_x_z.weight, seed.conv_x_n.weight]))
        cell.weight_hh.copy_(torch.cat([seed.conv_h_r.weight, seed.conv_h_z.weight, seed.conv_h_n.weight]))
        cell.bias_ih.copy_(torch.cat([seed.conv_x_r.bias, seed.conv_x_z.bias, seed.conv_x_n.bias]))
        cell.bias_hh.copy_(torch.cat([seed.conv_h_r.bias, seed.conv_h_z.bias, seed.conv_h_n.bias]))
    x = randn((BATCH, C_IN, 6, 5), device, dt)
    h = randn((BATCH, HID, 6, 5), device, dt, 0.5)
    for _ in range(3):  # a few steps, feeding the state back
        ours, theirs = cell(x, h), seed(x, h)
        assert_close(ours, theirs, **TOL64)
        h = theirs
    g = torch.randn_like(theirs)
    (gx_ours,) = torch.autograd.grad((ours * g).sum(), [x], retain_graph=True)
    (gx_theirs,) = torch.autograd.grad((theirs * g).sum(), [x])
    assert_close(gx_ours, gx_theirs, **TOL64)


# ----------------------------------------------------------------------------
# Empty batches and empty sequences
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
def test_empty_batch(hx_given, backend, device):
    torch.manual_seed(0)
    model = ConvGRU2d(C_IN, HID, 3, num_layers=2, bidirectional=True, device=device, backend=backend)
    x = torch.randn(STEPS, 0, C_IN, 5, 7, device=device, requires_grad=True)
    hx = torch.zeros(4, 0, HID, 5, 7, device=device, requires_grad=True) if hx_given else None
    out, h_n = model(x, hx)
    assert out.shape == (STEPS, 0, 2 * HID, 5, 7)
    assert h_n.shape == (4, 0, HID, 5, 7)
    (out.sum() + h_n.sum()).backward()
    assert x.grad.shape == x.shape

    bf = ConvGRU1d(C_IN, HID, 3, batch_first=True, device=device, backend=backend)
    out, h_n = bf(torch.randn(0, STEPS, C_IN, 7, device=device),
                  torch.zeros(1, 0, HID, 7, device=device) if hx_given else None)
    assert out.shape == (0, STEPS, HID, 7) and h_n.shape == (1, 0, HID, 7)

    cell = ConvGRUCell3d(C_IN, HID, 3, device=device, backend=backend)
    xc = torch.randn(0, C_IN, 3, 4, 5, device=device)
    hc = torch.zeros(0, HID, 3, 4, 5, device=device) if hx_given else None
    assert cell(xc, hc).shape == (0, HID, 3, 4, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["time_first", "batch_first", "unbatched"])
def test_empty_sequence_raises(layout, backend, device):
    model = ConvGRU2d(C_IN, HID, 3, batch_first=layout == "batch_first", device=device, backend=backend)
    shape = {"time_first": (0, BATCH, C_IN, 5, 7), "batch_first": (BATCH, 0, C_IN, 5, 7),
             "unbatched": (0, C_IN, 5, 7)}[layout]
    with pytest.raises(ValueError, match="sequence length 0"):
        model(torch.randn(shape, device=device))
