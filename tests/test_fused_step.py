"""The fused forward step (:mod:`convgru_triton.ops.fused_step`): implicit-GEMM
convolution with the gate math in its epilogue, against the references.

* The kernels, launched as the sequence operator launches them, write h',
  gates and aux equal to :func:`fused_step.reference_step` (the ``*_ref``
  functions of ``naive``) on shapes that are not block multiples, in float32,
  float16 and float64, both formulations, contiguous and channels_last, kernels
  (3, 3), (1, 5), (5, 1) and dilation 2, into NaN-poisoned buffers.
* A training step through the modules with ``CONVGRU_TRITON_FUSED_STEP=1``
  runs the fused kernels and gives the default path's outputs and gradients
  (the backward is the existing one, reading what the fused forward saved).
* The float16/bfloat16 kernels compiled for sm_90 on this machine (no GPU: a
  subprocess with a fake sm_90 target, as ``bench/codegen.py`` does) use
  wgmma and spill nothing.

On CPU the kernels run under the Triton interpreter (no bfloat16 there); on a
GPU compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

from convgru_triton._conv import ConvSpec
from convgru_triton.ops.fused_step import kernels as fused_step
from convgru_triton.ops.fused_step import naive as fused_naive
from convgru_triton.ops.sequence import op as conv_gru
from conftest import compile_for_sm90
from _tolerance import assert_close_to_reference, float64_training_step


TOLERANCE = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


def _inputs(device, dtype, batch, hidden, size, kernel, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    gx = rand(batch, 3 * hidden, *size)
    h = torch.tanh(rand(batch, hidden, *size))
    weight_hh = rand(3 * hidden, hidden, *kernel, scale=0.3)
    biases = (rand(3 * hidden), rand(3 * hidden)) if bias else (None, None)
    return gx, h, weight_hh, *biases


@pytest.fixture(autouse=True)
def fused_forced(package_settings):
    """The fused_step setting "1": the launcher runs wherever supports() holds
    (under auto it declines on CPU: the registry's default is cuDNN + gate kernels)."""
    package_settings(fused_step="1")


@pytest.fixture
def float64_kernels(monkeypatch):
    """Let the launcher take float64 (not selected in production: tl.dot in
    float64 is not a tensor-core path), to compare at float64 precision."""
    monkeypatch.setattr(fused_step, "DTYPES", fused_step.DTYPES + (torch.float64,))


def _run_fused(device, dtype, reset_after, spec, hidden, size, channels_last, save=True, bias=True, seed=0,
               gx_channels_last=None):
    """Launch the fused step into buffers from the operator's allocator (NaN
    poisoned by conftest); returns the inputs and (h_new, gates, aux)."""
    gx, h, weight_hh, bias_ih, bias_hh = _inputs(device, dtype, 2, hidden, size, spec.kernel_size, seed, bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx_fmt = fmt if gx_channels_last is None else (torch.channels_last if gx_channels_last else torch.contiguous_format)
    gx, h = gx.contiguous(memory_format=gx_fmt), h.contiguous(memory_format=fmt)
    state = conv_gru._empty_frame(h, hidden, channels_last)
    if save or not reset_after:
        gates, aux = conv_gru._empty_frame(h, 3 * hidden, channels_last), conv_gru._empty_frame(h, hidden, channels_last)
    else:
        gates = aux = None
    assert torch.isnan(state).all()  # the conftest poisoning is in force
    weights = conv_gru._hidden_weights(conv_gru.plan(spec, reset_after, False, True), weight_hh)
    ran = fused_step.forward_step(reset_after, spec, gx, h, weights, bias_ih, bias_hh, state, gates, aux, save)
    assert ran
    return (gx, h, weight_hh, bias_ih, bias_hh), (state, gates, aux)


def _check(dtype, reset_after, spec, inputs, outputs, save=True):
    ref = fused_naive.reference_step(reset_after, spec, *(None if t is None else t.double() for t in inputs))
    tol = TOLERANCE[dtype]
    state, gates, aux = outputs
    torch.testing.assert_close(state.double(), ref[0], **tol, msg=lambda m: f"h': {m}")
    if gates is None:
        return
    hidden = state.shape[1]
    # Without save the n slot is not written (reset_after=False keeps scratch r, z, r*h).
    slots = 3 if save else 2
    torch.testing.assert_close(gates[:, : slots * hidden].double(), ref[1][:, : slots * hidden], **tol,
                               msg=lambda m: f"gates: {m}")
    torch.testing.assert_close(aux.double(), ref[2], **tol, msg=lambda m: f"aux: {m}")


# Not block multiples: 2 x 7 x 9 = 126 pixels (BLOCK_M 64; NCHW patches of
# 4 x 16 pixels), 5 or 20 hidden channels (BLOCK_N 16 or 32, BLOCK_K 16 or
# 32); 70 spans three channel blocks and three reduction steps per tap.
SPECS = {
    "3x3": ConvSpec((3, 3), (1, 1)),
    "1x5": ConvSpec((1, 5), (1, 1)),
    "5x1": ConvSpec((5, 1), (1, 1)),
    "3x3-dil2": ConvSpec((3, 3), (2, 2)),
}


@pytest.mark.triton_kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("spec_id", list(SPECS))
def test_float32_equals_reference(device, spec_id, reset_after, layout):
    spec = SPECS[spec_id]
    inputs, outputs = _run_fused(device, torch.float32, reset_after, spec, 20, (7, 9), layout == "cl")
    _check(torch.float32, reset_after, spec, inputs, outputs)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("spec_id", ["1x5", "3x3-dil2"])
def test_float16_equals_reference(device, spec_id, reset_after, layout):
    spec = SPECS[spec_id]
    inputs, outputs = _run_fused(device, torch.float16, reset_after, spec, 5, (7, 9), layout == "cl")
    _check(torch.float16, reset_after, spec, inputs, outputs)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_float64_equals_reference(device, float64_kernels, reset_after, layout):
    if device.type == "cuda":
        pytest.skip("float64 tl.dot is exercised under the interpreter only (not a production dtype)")
    spec = SPECS["5x1"]
    inputs, outputs = _run_fused(device, torch.float64, reset_after, spec, 5, (7, 9), layout == "cl")
    _check(torch.float64, reset_after, spec, inputs, outputs)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_two_channel_blocks_and_mixed_layouts(device, reset_after):
    """70 hidden channels: three channel blocks (BLOCK_N 32) and three reduction
    steps per tap (BLOCK_K 32), with gx contiguous and the state channels_last,
    and the same with the layouts swapped."""
    spec = SPECS["3x3"]
    for state_cl in (True, False):
        inputs, outputs = _run_fused(device, torch.float32, reset_after, spec, 70, (5, 6), state_cl,
                                     gx_channels_last=not state_cl)
        _check(torch.float32, reset_after, spec, inputs, outputs)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_without_save_and_without_bias(device, reset_after):
    """save=False (reset_after: gates and aux are None and untouched; else
    scratch without n) and no biases."""
    spec = SPECS["3x3-dil2"]
    inputs, outputs = _run_fused(device, torch.float32, reset_after, spec, 5, (7, 9), False, save=False, bias=False)
    _check(torch.float32, reset_after, spec, inputs, outputs, save=False)
    if not reset_after:
        assert torch.isnan(outputs[1][:, 10:]).all()  # n is not stored without save


def test_supports(device):
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    here = device.type == "cuda" or interpreted
    assert fused_step.supports(SPECS["3x3-dil2"], torch.float16, device) == here
    assert fused_step.supports(ConvSpec((2, 4), (1, 3)), torch.float32, device) == here  # even kernel
    # bfloat16: on CUDA; not under the interpreter, which has no bfloat16.
    assert fused_step.supports(SPECS["3x3"], torch.bfloat16, device) == (device.type == "cuda")
    assert not fused_step.supports(ConvSpec((3, 3), (1, 1), "reflect"), torch.float16, device)
    assert not fused_step.supports(ConvSpec((3,), (1,)), torch.float16, device)
    assert not fused_step.supports(ConvSpec((3, 3, 3), (1, 1, 1)), torch.float16, device)
    assert not fused_step.supports(SPECS["3x3"], torch.float64, device)


@pytest.mark.triton_kernels
def test_even_kernel_asymmetric_padding(device):
    """(2, 4) kernel with dilation (1, 3): 'same' pads left/top d(k-1)//2 and the rest right/bottom."""
    spec = ConvSpec((2, 4), (1, 3))
    inputs, outputs = _run_fused(device, torch.float32, True, spec, 5, (6, 11), False)
    _check(torch.float32, True, spec, inputs, outputs)


# ----------------------------------------------------------------------------
# Through the modules: chosen by CONVGRU_TRITON_FUSED_STEP=1, and the existing backward on what it saved
# ----------------------------------------------------------------------------


def _train_step(module, x, h0):
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    h0 = h0.detach().clone().requires_grad_()
    out = module(x, h0)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(out.device)
    out.backward(grad)
    return out.detach(), x.grad, h0.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.triton_kernels
@pytest.mark.parametrize("what", ["cell-reset_before-cl", "cell-reset_after", "sequence-reset_before",
                                  "sequence-reset_after-cl"])
def test_training_step_equals_default_path(device, monkeypatch, package_settings, what):
    import convgru_triton as cg
    from convgru_triton import functional

    kind, form, *cl = what.split("-")
    reset_after, channels_last = form == "reset_after", bool(cl)
    torch.manual_seed(0)
    if kind == "cell":
        module = cg.ConvGRUCell2d(3, 6, (3, 3), reset_after=reset_after, dilation=(2, 1), backend="triton").to(device)
        x, h0 = torch.randn(2, 3, 7, 9, device=device), torch.randn(2, 6, 7, 9, device=device)
    else:
        module = cg.ConvGRU2d(3, 6, (1, 5), reset_after=reset_after, backend="triton").to(device)
        x, h0 = torch.randn(3, 2, 3, 7, 9, device=device), torch.randn(1, 2, 6, 7, 9, device=device)
    if channels_last:  # every (N, C, Y, X) frame channels_last
        x, h0 = (t.contiguous(memory_format=torch.channels_last) if t.dim() == 4
                 else torch.stack([f.contiguous(memory_format=torch.channels_last) for f in t]) for t in (x, h0))
        assert x[0].stride(-3) == 1 or x.stride(1) == 1

    def fresh_plans():  # the setting is read when a plan is made: no plan made before may answer
        monkeypatch.setattr(conv_gru, "_PLANS", {})
        monkeypatch.setattr(functional, "_CELL_PLANS", {})

    calls = []
    launch = fused_step.forward_step

    def counted(*args, **kwargs):
        ran = launch(*args, **kwargs)
        calls.append(ran)
        return ran

    monkeypatch.setattr(fused_step, "forward_step", counted)
    package_settings(fused_step="auto")
    fresh_plans()
    expected = _train_step(module, x, h0)
    # auto, no tuned entry (the default is cuDNN + gate kernels): a cell's plan
    # decides that once, without asking the fused step; the sequence operator
    # asks it, and it declines.
    assert (calls == []) if kind == "cell" else (calls and not any(calls))
    calls.clear()
    package_settings(fused_step="0")
    fresh_plans()
    _train_step(module, x, h0)
    assert calls == []  # 0: plans never consult it

    package_settings(fused_step="1")
    fresh_plans()
    got = _train_step(module, x, h0)
    steps = 1 if kind == "cell" else x.shape[0]
    assert calls == [True] * steps, "the fused step did not run"

    assert set(got[3]) == set(expected[3]) and got[3]
    # The fused step and the default path are two algorithms: each against the
    # same step in float64 (the cotangent _train_step drew).
    grad = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(3), dtype=got[0].dtype).to(device)
    ref_out, ref_inputs, ref_params = float64_training_step(module, (x, h0), grad)
    pairs = [("output", got[0], expected[0], ref_out), ("d input", got[1], expected[1], ref_inputs[0]),
             ("d h0", got[2], expected[2], ref_inputs[1])]
    pairs += [(f"d {name}", got[3][name], expected[3][name], ref_params[name]) for name in expected[3]]
    for name, g, e, r in pairs:
        assert_close_to_reference(g, e, r, names=("fused", "default"), what=name)


# ----------------------------------------------------------------------------
# Compiled for sm_90 on this machine (no GPU): wgmma, no spills
# ----------------------------------------------------------------------------

_CODEGEN = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
sys.path.insert(0, sys.argv[1])
from bench import _triton_compat as tc
error = tc.nvidia_backend_error()
if error:
    print(json.dumps({"skip": error})); sys.exit(0)
from convgru_triton import _settings, _tuning, tune
from convgru_triton._conv import ConvSpec
from convgru_triton.ops.fused_step import kernels as fused_step
from convgru_triton.ops.fused_step import naive as fused_naive
fused_step.supports = lambda spec, dtype, device: True  # CPU tensors through the launcher; compiled, never launched
fused_setting = _settings.override(fused_step="1")  # kept: a collected generator would restore the setting
fused_setting.__enter__()  # for the rest of this process
out = []
records = []
tags = []


def step(dtype, reset_after, cl, kernel, tile):
    # RAFT's 1/8 map and hidden size.
    n, hid, y, x = 2, 128, 46, 62
    fmt = torch.channels_last if cl else torch.contiguous_format
    gx = torch.zeros(n, 3 * hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
    h = torch.zeros(n, hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.zeros(3 * hid, hid, *kernel, dtype=dtype)
    b = torch.zeros(3 * hid, dtype=dtype)
    ws = (w,) if reset_after else w.split_with_sizes((2 * hid, hid))
    gates, aux, state = torch.empty_like(gx), torch.empty_like(h), torch.empty_like(h)
    before = len(records)
    with _tuning.forced_tile(tile):
        fused_step.forward_step(reset_after, ConvSpec(kernel, (1, 1)), gx, h, ws, b, b, state, gates, aux, True)
    tags.extend([("default" if tile is None else str(tile), "cl" if cl else "nchw")] * (len(records) - before))


with tc.compile_without_launch(90, records):
    # The defaults: every kernel, both half dtypes and layouts, SepConvGRU's (1, 5).
    for dtype in (torch.bfloat16, torch.float16):
        for reset_after in (False, True):
            for cl in (False, True):
                step(dtype, reset_after, cl, (1, 5), None)
    for reset_after in (False, True):  # and RAFT's 3x3 in NCHW, where reset_after's registers peaked
        step(torch.bfloat16, reset_after, False, (3, 3), None)
    # Every other (BLOCK_M, BLOCK_N, num_warps) the tuner may choose, at one
    # num_stages (registers did not depend on it: same counts at 2, 3 and 4),
    # bfloat16, NCHW (where the reset_after kernel's registers peaked), 3x3.
    seen = {(t.block_m, t.block_n, t.num_warps) for t in (_tuning.default_tile(k, torch.bfloat16)
                                                          for k in ("conv_rz_fwd", "conv_reset_after_fwd"))}
    for tile in tune.fused_tile_candidates(torch.bfloat16):
        if (tile.block_m, tile.block_n, tile.num_warps) in seen:
            continue
        seen.add((tile.block_m, tile.block_n, tile.num_warps))
        for reset_after in (False, True):
            step(torch.bfloat16, reset_after, False, (3, 3), tile)
for rec, (tile, layout) in zip(records, tags):
    ptx = tc.ptx(rec.kernel)
    res = tc.resource_usage(rec.kernel)
    out.append(dict(name=rec.name, dtype=str(rec.signature.get("x_ptr")), regs=res["regs"], stack=res["stack"],
                    local=res["local"], wgmma=ptx.count("wgmma.mma_async"), warps=rec.num_warps, tile=tile,
                    layout=layout))
print(json.dumps({"kernels": out}))
"""


@pytest.fixture(scope="module")
def sm90_kernels():
    return compile_for_sm90(_CODEGEN, "the fused kernels")


FWD_KERNELS = ("_conv_rz_fwd_kernel", "_conv_n_fwd_kernel", "_conv_reset_after_fwd_kernel")
#: The defaults keep this many of the 255 registers a thread may have free, so
#: that a compiler version (or a small kernel change) does not tip them into
#: spills: Triton 3.6 compiled the 4-warp reset_after kernel at 255.
DEFAULT_REGISTER_HEADROOM = 32


@pytest.mark.slow
def test_sm90_every_kernel_compiles(sm90_kernels):
    names = {(k["name"], k["dtype"], k["layout"]) for k in sm90_kernels if k["tile"] == "default"}
    want = {(n, d, lay) for n in FWD_KERNELS for d in ("*bf16", "*fp16") for lay in ("nchw", "cl")}
    assert names == want
    # Every other tile the tuner may choose (64x32 and 64x64 and 128x32 at 8 warps), each kernel.
    tiles = {k["tile"] for k in sm90_kernels} - {"default"}
    assert len(tiles) >= 2
    for tile in tiles:
        assert {k["name"] for k in sm90_kernels if k["tile"] == tile} == set(FWD_KERNELS), tile


@pytest.mark.slow
def test_sm90_defaults_have_register_headroom(sm90_kernels):
    bad = [f"{k['name']} {k['dtype']} {k['layout']}: {k['regs']} registers" for k in sm90_kernels
           if k["tile"] == "default" and k["regs"] > 255 - DEFAULT_REGISTER_HEADROOM]
    assert not bad, "default tiles at the register limit:\n" + "\n".join(bad)


@pytest.mark.slow
def test_sm90_uses_wgmma(sm90_kernels):
    bad = [f"{k['name']} {k['dtype']} {k['tile']}" for k in sm90_kernels if k["wgmma"] == 0]
    assert not bad, "no wgmma.mma_async in the PTX (no Hopper tensor cores):\n" + "\n".join(bad)


@pytest.mark.slow
def test_sm90_no_spills(sm90_kernels):
    bad = [f"{k['name']} {k['dtype']} {k['tile']}: {k['regs']} registers, stack {k['stack']} B, local {k['local']} B"
           for k in sm90_kernels if k["stack"] or k["local"]]
    assert not bad, "spills to local memory:\n" + "\n".join(bad)
