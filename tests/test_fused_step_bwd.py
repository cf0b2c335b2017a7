"""The fused backward step (:func:`convgru_triton.ops.fused_step.kernels.backward_step`):
the hidden convolutions' data gradient (dgrad) as Triton implicit GEMM with the
gate backward in its epilogue, against the references and cuDNN + the gate kernels.

* One step through ``conv_gru._step_backward`` (the hook), into NaN-poisoned
  buffers from the operator's allocator: d_gates_x, d_gates_h (reset_after),
  dL/dh and the hidden weight gradients equal the default path (cuDNN/ATen
  dgrad + the gate kernels) and autograd through the ``*_ref`` functions
  (:func:`fused_step.reference_backward_step`), on shapes that are not block
  multiples, float32/float16/float64 (and bfloat16 on a GPU), both
  formulations, contiguous and channels_last (and mixed), kernels (3, 3), (1, 5), (5, 1), dilation 2 and an
  even (2, 4) kernel with dilation (1, 3) (asymmetric 'same' padding), with and
  without the carried gradient (``grad2``).
* T > 1 sequences through the operator, forward and reverse: every gradient
  (d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh) equals the default path
  and autograd through :func:`~convgru_triton.ops.sequence_naive.conv_gru_sequence_ref`;
  the fused backward ran at every step.
* Through the cell and the bidirectional sequence modules: d_input too.
* Where it does not apply it declines, having written nothing.
* The weight-gradient kernel alone (``_launch_wgrad``, the one-step cell's
  wgrad) into NaN-poisoned d_w and d_b equals :func:`fused_step.naive.wgrad_ref`
  (autograd through ``conv_same`` in float64): float64/float32/float16 (and
  bfloat16 on a GPU), the five kernels above, NCHW, channels_last and mixes of
  dy's and the sources' layouts, with and without bias, one source and two
  (split 10 of 15 rows and 2H = 40 of 60: not row-tile multiples), several
  channel and pixel blocks, the bias column in a channel block of its own, and
  forced 16-wide tiles (several row tiles on both sides of the split).
* ``_conv_dgrad_bwd_kernel`` with ``ACCUMULATE=False`` (the cell's d_x) into a
  NaN-poisoned output equals autograd's d_x of ``conv_same``; with the default
  it adds.
* The float16/bfloat16 kernels compiled for sm_90 on this machine (no GPU:
  ``bench/_triton_compat``, as ``bench/codegen.py``) use wgmma and spill nothing;
  the weight-gradient kernel at RAFT's bfloat16 shapes (slow tier) too, with 32
  registers of headroom.

On CPU the kernels run under the Triton interpreter (no bfloat16 there); on a
GPU compiled.
"""

from __future__ import annotations

import pytest
import torch

from convgru_triton._conv import ConvSpec, conv_same
from convgru_triton.ops.fused_step import kernels as fused_step
from convgru_triton.ops.fused_step import naive as fused_naive
from convgru_triton.ops.sequence import naive as sequence_naive
from convgru_triton.ops.sequence import op as conv_gru
from conftest import compile_for_sm90
from _tolerance import RTOL, TINY, assert_close_to_reference, float64_training_step, reference_error


TOLERANCE = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),  # 8 mantissa bits (GPU only)
}

# Not block multiples: 2 x 7 x 9 = 126 pixels (BLOCK_M 64; NCHW patches of
# 4 x 16), 5 or 20 hidden channels (BLOCK_N 16/32; the reductions over 2H = 40
# and 3H = 60 channels take two BLOCK_K-32 blocks that straddle the gate slots).
SPECS = {
    "3x3": ConvSpec((3, 3), (1, 1)),
    "1x5": ConvSpec((1, 5), (1, 1)),
    "5x1": ConvSpec((5, 1), (1, 1)),
    "3x3-dil2": ConvSpec((3, 3), (2, 2)),
    "2x4-dil1x3": ConvSpec((2, 4), (1, 3)),  # even: left/top pad d(k-1)//2, the dgrad's the other side's
}


@pytest.fixture(autouse=True)
def fused_on(package_settings):
    """The fused_step setting "1" (the plans made under it may fuse; each test
    that wants cuDNN + the gate kernels sets ``0``)."""
    package_settings(fused_step="1")


@pytest.fixture
def float64_kernels(monkeypatch):
    """Let the launchers take float64 (not a production dtype), to compare at float64 precision."""
    monkeypatch.setattr(fused_step, "DTYPES", fused_step.DTYPES + (torch.float64,))


@pytest.fixture
def bwd_calls(monkeypatch):
    """The results of every ``fused_step.backward_step`` call, in order."""
    calls = []
    launch = fused_step.backward_step

    def counted(*args, **kwargs):
        ran = launch(*args, **kwargs)
        calls.append(ran)
        return ran

    monkeypatch.setattr(fused_step, "backward_step", counted)
    return calls


@pytest.fixture
def dgrad_launches(monkeypatch):
    """The fused dgrad kernels launched, in order (by kernel name): every
    fused backward step launches them, from the sequence operator
    (``fused_step.backward_step``) or from a cell's plan."""
    calls = []
    launch = fused_step._launch_dgrad

    def counted(kernel, *args, **kwargs):
        calls.append(kernel.__name__)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(fused_step, "_launch_dgrad", counted)
    return calls


def _rand(gen, device, dtype, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------
# One step through the hook
# ----------------------------------------------------------------------------


def _one_step(device, dtype, reset_after, spec, hidden, size, channels_last, grad2=True, seed=0,
              saved_channels_last=None):
    """Saved tensors of one step from the float64 reference (cast to ``dtype``),
    then ``conv_gru._step_backward`` with the fused step and without it, into
    poisoned buffers. Returns (inputs, grad, fused results, default results)."""
    gen = torch.Generator().manual_seed(seed)
    batch = 2
    gx = _rand(gen, device, dtype, batch, 3 * hidden, *size)
    h = torch.tanh(_rand(gen, device, dtype, batch, hidden, *size)).contiguous(memory_format=_fmt(channels_last))
    weight_hh = _rand(gen, device, dtype, 3 * hidden, hidden, *spec.kernel_size, scale=0.3)
    bias_ih, bias_hh = _rand(gen, device, dtype, 3 * hidden), _rand(gen, device, dtype, 3 * hidden)
    fmt = _fmt(channels_last)
    g1 = _rand(gen, device, dtype, batch, hidden, *size).contiguous(memory_format=fmt)
    g2 = _rand(gen, device, dtype, batch, hidden, *size).contiguous(memory_format=fmt) if grad2 else None
    saved_fmt = _fmt(channels_last if saved_channels_last is None else saved_channels_last)
    _, gates, aux = fused_naive.reference_step(reset_after, spec, gx.double(), h.double(), weight_hh.double(),
                                              bias_ih.double(), bias_hh.double())
    gates, aux = (t.to(dtype).contiguous(memory_format=saved_fmt) for t in (gates, aux))
    p = conv_gru.plan(spec, reset_after, False, True)
    assert p.fused_step
    weights = conv_gru._hidden_weights(p, weight_hh)
    results = []
    for plan in (p, p._replace(fused_step=False)):
        d_gx = conv_gru._empty_frame(h, 3 * hidden, channels_last)
        d_h = conv_gru._empty_frame(h, hidden, channels_last)
        assert torch.isnan(d_h).all()  # the conftest poisoning is in force
        if reset_after:
            d_gh, d_rz, d_n = conv_gru._empty_frame(h, 3 * hidden, channels_last), None, None
        else:
            d_gh, (d_rz, d_n) = None, d_gx.split_with_sizes((2 * hidden, hidden), 1)
        d_w = conv_gru._step_backward(plan, plan.math, g1, g2, h, weights, gates, aux, d_gx, d_gh, d_rz, d_n, d_h,
                                      True)
        results.append((d_gx, d_gh, d_h, torch.cat(d_w)))
    return (gx, h, weight_hh, bias_ih, bias_hh), g1 if g2 is None else g1 + g2, results[0], results[1]


def _check_step(dtype, reset_after, spec, inputs, grad, fused, default):
    """The fused backward step and the default one are two algorithms: each is
    measured against the float64 reference step."""
    names = ("d_gates_x", "d_gates_h", "d_h", "d_weight_hh")
    ref = fused_naive.reference_backward_step(reset_after, spec, grad.double(), *(t.double() for t in inputs))
    for name, got, want, exact in zip(names, fused, default, ref):
        if want is None:
            assert got is None and exact is None, name
        elif exact is None:
            torch.testing.assert_close(got, want, **TOLERANCE[dtype], msg=lambda m: f"{name} vs the default path: {m}")
        else:
            assert_close_to_reference(got, want, exact, names=("fused", "default"), what=name)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("spec_id", list(SPECS))
def test_float32_step_equals_default_and_reference(device, bwd_calls, spec_id, reset_after, layout):
    spec = SPECS[spec_id]
    hidden = 20 if spec_id == "3x3" else 5
    inputs, grad, fused, default = _one_step(device, torch.float32, reset_after, spec, hidden, (7, 9),
                                             layout == "cl", grad2=spec_id != "1x5")
    assert bwd_calls == [True]  # the fused plan ran it; the other plan (fused_step off) never asks
    _check_step(torch.float32, reset_after, spec, inputs, grad, fused, default)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_step(device, bwd_calls, dtype, reset_after, layout):
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bfloat16 kernels need a GPU (the Triton interpreter has no bfloat16)")
    spec = SPECS["3x3-dil2"]
    inputs, grad, fused, default = _one_step(device, dtype, reset_after, spec, 5, (7, 9), layout == "cl")
    assert bwd_calls[0] is True
    _check_step(dtype, reset_after, spec, inputs, grad, fused, default)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_float64_step(device, float64_kernels, bwd_calls, reset_after):
    if device.type == "cuda":
        pytest.skip("float64 tl.dot is exercised under the interpreter only (not a production dtype)")
    spec = SPECS["5x1"]
    inputs, grad, fused, default = _one_step(device, torch.float64, reset_after, spec, 5, (7, 9), True)
    assert bwd_calls[0] is True
    _check_step(torch.float64, reset_after, spec, inputs, grad, fused, default)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_channel_blocks_and_mixed_layouts(device, bwd_calls, reset_after):
    """40 hidden channels: two output-channel blocks (BLOCK_N 32, the second
    partial) and 2-4 reduction blocks per tap (BLOCK_K 32 over H, 2H or 3H);
    the gradients channels_last and the saved gates contiguous (reset_before),
    the other way round (reset_after)."""
    spec = SPECS["3x3"]
    state_cl = not reset_after
    inputs, grad, fused, default = _one_step(device, torch.float32, reset_after, spec, 40, (3, 5), state_cl,
                                             saved_channels_last=not state_cl)
    _check_step(torch.float32, reset_after, spec, inputs, grad, fused, default)
    assert bwd_calls == [True]


# ----------------------------------------------------------------------------
# Sequences through the operator: the carried gradient, reverse, wgrad over all T
# ----------------------------------------------------------------------------


def _sequence_grads(device, dtype, reset_after, reverse, spec, steps, hidden, size, channels_last, fused,
                    package_settings):
    package_settings(fused_step="1" if fused else "0")
    gen = torch.Generator().manual_seed(1)
    batch = 2
    gx = _rand(gen, device, dtype, steps, batch, 3 * hidden, *size)
    h0 = torch.tanh(_rand(gen, device, dtype, batch, hidden, *size))
    if channels_last:
        gx = torch.stack([f.contiguous(memory_format=torch.channels_last) for f in gx])
        h0 = h0.contiguous(memory_format=torch.channels_last)
    weight_hh = _rand(gen, device, dtype, 3 * hidden, hidden, *spec.kernel_size, scale=0.3)
    bias_ih, bias_hh = _rand(gen, device, dtype, 3 * hidden), _rand(gen, device, dtype, 3 * hidden)
    grad = _rand(gen, device, dtype, steps, batch, hidden, *size)
    leaves = [t.detach().clone().requires_grad_() for t in (gx, h0, weight_hh, bias_ih, bias_hh)]
    out = conv_gru.conv_gru_sequence(*leaves, spec, reset_after, reverse, True)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (gx, h0, weight_hh, bias_ih, bias_hh)]
    ref_out = sequence_naive.conv_gru_sequence_ref(*ref_leaves, spec, reset_after, reverse)
    ref = torch.autograd.grad(ref_out, ref_leaves, grad.double())
    return got, ref


@pytest.mark.triton_kernels
@pytest.mark.parametrize("case", ["reset_before-forward-nchw", "reset_before-reverse-cl",
                                  "reset_after-forward-cl", "reset_after-reverse-nchw"])
def test_sequence_gradients(device, package_settings, bwd_calls, case):
    form, direction, layout = case.split("-")
    reset_after, reverse, cl = form == "reset_after", direction == "reverse", layout == "cl"
    spec, steps = SPECS["3x3-dil2"] if reset_after else SPECS["1x5"], 2
    args = (device, torch.float32, reset_after, reverse, spec, steps, 6, (5, 7), cl)
    got, ref = _sequence_grads(*args, True, package_settings)
    assert bwd_calls == [True] * steps, "the fused backward did not run at every step"
    default, _ = _sequence_grads(*args, False, package_settings)
    assert bwd_calls == [True] * steps  # at 0 the plan never asks
    names = ("d_gates_x", "d_h0", "d_weight_hh", "d_bias_ih", "d_bias_hh")
    for name, g, d, r in zip(names, got, default, ref):
        assert_close_to_reference(g, d, r, names=("fused", "default"), what=name)


# ----------------------------------------------------------------------------
# Through the modules: d_input
# ----------------------------------------------------------------------------


def _module_grads(module, x, h0, fused, package_settings):
    package_settings(fused_step="1" if fused else "0")  # in the plans' keys: no stale plan either way
    for p in module.parameters():
        p.grad = None
    x, h0 = (t.detach().clone().requires_grad_() for t in (x, h0))
    out = module(x, h0)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(out.device)
    out.backward(grad)
    return grad, x.grad, h0.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.triton_kernels
@pytest.mark.parametrize("kind", ["cell-reset_before-cl", "cell-reset_after", "bidirectional-reset_before"])
def test_modules_input_gradient(device, package_settings, dgrad_launches, kind):
    import convgru_triton as cg

    what, form, *cl = kind.split("-")
    reset_after = form == "reset_after"
    torch.manual_seed(0)
    if what == "cell":
        module = cg.ConvGRUCell2d(3, 6, (3, 3), reset_after=reset_after, dilation=(2, 1), backend="triton").to(device)
        x, h0 = torch.randn(2, 3, 7, 9, device=device), torch.randn(2, 6, 7, 9, device=device)
        if cl:
            x, h0 = (t.contiguous(memory_format=torch.channels_last) for t in (x, h0))
        steps = 1
    else:
        module = cg.ConvGRU2d(3, 6, (5, 1), reset_after=reset_after, bidirectional=True, backend="triton").to(device)
        x, h0 = torch.randn(2, 2, 3, 6, 5, device=device), torch.randn(2, 2, 6, 6, 5, device=device)
        steps = 2 * x.shape[0]  # both directions
    grad, *got = _module_grads(module, x, h0, True, package_settings)
    per_step = ["_conv_dgrad_bwd_kernel"] if reset_after else ["_conv_dgrad_reset_gate_bwd_kernel",
                                                               "_conv_dgrad_bwd_kernel"]
    if what == "cell":  # the cell's plan: d_input through the dgrad kernel too (ACCUMULATE=False)
        per_step = per_step + ["_conv_dgrad_bwd_kernel"]
    assert dgrad_launches == per_step * steps, "the fused backward did not run at every step"
    _, *default = _module_grads(module, x, h0, False, package_settings)
    assert set(got[2]) == set(default[2]) and got[2]
    # The fused and the default backward are two algorithms: each against float64.
    _, ref_inputs, ref_params = float64_training_step(module, (x, h0), grad)
    for name, g, d, r in [("d input", got[0], default[0], ref_inputs[0]), ("d h0", got[1], default[1], ref_inputs[1])]:
        assert_close_to_reference(g, d, r, names=("fused", "default"), what=name)
    for name in default[2]:
        assert_close_to_reference(got[2][name], default[2][name], ref_params[name], names=("fused", "default"),
                                  what=f"d {name}")
    if what == "cell":  # and the reference: the input convolution, then autograd through the *_ref step
        params = [t.detach().double().requires_grad_() for t in
                  (module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh)]
        xr, hr = x.detach().double().requires_grad_(), h0.detach().double().requires_grad_()
        spec = ConvSpec((3, 3), (2, 1))
        out = sequence_naive.conv_gru_cell_ref(conv_same(xr, params[0], spec), hr, *params[1:], spec, reset_after)
        ref = torch.autograd.grad(out, [xr, hr] + params, grad.double())
        names = ["d input", "d h0", "d weight_ih", "d weight_hh", "d bias_ih", "d bias_hh"]
        mine = [got[0], got[1]] + [got[2][n] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        for name, g, r in zip(names, mine, ref):
            torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=3e-5, msg=lambda m: f"{name} vs reference: {m}")


# ----------------------------------------------------------------------------
# The weight-gradient kernel and the input's dgrad (ACCUMULATE=False), launched alone
# ----------------------------------------------------------------------------


def _near_reference(got, ref, dtype, what):
    """``got`` (in ``dtype``) within ``RTOL[dtype]`` of the float64 reference's
    largest magnitude; an unwritten (NaN) element fails."""
    assert got.dtype == dtype and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    scale = ref.abs().max().item()
    err = reference_error(got, ref)
    assert err <= RTOL[dtype] * scale + TINY, f"{what}: {err:.3g} from the float64 reference (scale {scale:.3g})"


def _skip_dtype(device, dtype):
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bfloat16 kernels need a GPU (the Triton interpreter has no bfloat16)")
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 tl.dot is exercised under the interpreter only (not a production dtype)")


_DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_FMT = {"nchw": torch.contiguous_format, "cl": torch.channels_last}

#: (dtype, spec, O rows, C channels, map, layouts of dy/src[/src2], bias, split).
#: N = 2 and 5x9 or 7x9 maps: 90 or 126 pixels, 3-4 float32 pixel blocks (BLOCK_P
#: 32; float16 64: 2); C = 40: two channel blocks (BLOCK_C 32); C = 16 (BLOCK_C
#: 16) and 32 (float16, BLOCK_C 32) with a bias: the bias's column of ones (column
#: C) in a channel block of its own, as at RAFT's C = 128 and 256; O = 15 or 60 in
#: one row tile of 16 or 64 (more than one: the forced-tile case). split 10 of 15
#: and 40 = 2H of 60 (H = 20, W_hh of a GRU): not multiples of the row tile.
WGRAD_CASES = {
    "f32-3x3-nchw-bias": ("f32", "3x3", 15, 7, (7, 9), "nchw/nchw", True, None),
    "f32-1x5-cl-c40": ("f32", "1x5", 15, 40, (5, 9), "cl/cl", False, None),
    "f32-5x1-dycl-srcnchw-bias-o60-c16": ("f32", "5x1", 60, 16, (7, 9), "cl/nchw", True, None),
    "f32-3x3dil2-dynchw-srccl-bias-split10": ("f32", "3x3-dil2", 15, 7, (7, 9), "nchw/cl/nchw", True, 10),
    "f32-2x4dil1x3-h20-split40": ("f32", "2x4-dil1x3", 60, 20, (5, 9), "cl/nchw/cl", False, 40),
    "f64-2x4dil1x3-bias-split10": ("f64", "2x4-dil1x3", 15, 7, (7, 9), "nchw/cl/cl", True, 10),
    "f16-3x3-cl-bias-c32": ("f16", "3x3", 15, 32, (5, 9), "cl/cl", True, None),
    "f16-1x5-nchw-split10": ("f16", "1x5", 15, 7, (7, 9), "nchw/nchw/cl", True, 10),
    "bf16-3x3dil2-cl-h20-split40-bias": ("bf16", "3x3-dil2", 60, 20, (7, 9), "cl/cl/nchw", True, 40),
}


def _wgrad_case(device, dtype, spec, rows, channels, size, layouts, bias, split, seed=0):
    """Launch ``_launch_wgrad`` into NaN-poisoned d_w and d_b; returns (got, reference)."""
    gen = torch.Generator().manual_seed(seed)
    fmts = [_FMT[f] for f in layouts.split("/")]
    dy = _rand(gen, device, dtype, 2, rows, *size).contiguous(memory_format=fmts[0])
    src = _rand(gen, device, dtype, 2, channels, *size).contiguous(memory_format=fmts[1])
    src2 = None if split is None else _rand(gen, device, dtype, 2, channels, *size).contiguous(memory_format=fmts[2])
    d_w = torch.full((rows, channels, *spec.kernel_size), float("nan"), device=device, dtype=dtype)
    d_b = torch.full((rows,), float("nan"), device=device, dtype=dtype) if bias else None
    fused_step._launch_wgrad(spec, dy, src, d_w, d_b, src2, split)
    ref = fused_naive.wgrad_ref(spec, dy.double(), src.double(), None if src2 is None else src2.double(), split, bias)
    return (d_w, d_b), ref


@pytest.mark.triton_kernels
@pytest.mark.parametrize("case", list(WGRAD_CASES))
def test_wgrad_kernel_equals_reference(device, case):
    dtype_id, spec_id, rows, channels, size, layouts, bias, split = WGRAD_CASES[case]
    dtype, spec = _DTYPES[dtype_id], SPECS[spec_id]
    _skip_dtype(device, dtype)
    (d_w, d_b), (ref_w, ref_b) = _wgrad_case(device, dtype, spec, rows, channels, size, layouts, bias, split)
    _near_reference(d_w, ref_w, dtype, "d_w")
    if bias:
        _near_reference(d_b, ref_b, dtype, "d_b")


@pytest.mark.triton_kernels
@pytest.mark.parametrize("split", [pytest.param(None, marks=pytest.mark.slow), 40], ids=["one_source", "split40"])
def test_wgrad_kernel_several_row_tiles(device, split):
    """Forced 16-wide tiles: rows 60 in 4 row tiles (split 40: 3 over rows 0-39,
    the last partial, ending at the split; 2 over rows 40-59, the last partial),
    2 channel blocks of C = 20, 4 pixel blocks of 54 pixels; the bias of every
    row tile written once."""
    from convgru_triton import _tuning

    with _tuning.forced_tile(_tuning.TileConfig(16, 16, 16, 4, 2)):
        (d_w, d_b), (ref_w, ref_b) = _wgrad_case(device, torch.float32, SPECS["1x5"], 60, 20, (3, 9),
                                                 "nchw/cl/nchw", True, split, seed=1)
    _near_reference(d_w, ref_w, torch.float32, "d_w")
    _near_reference(d_b, ref_b, torch.float32, "d_b")


#: (dtype, spec, C = d_x's channels, O = dy's channels, map, layouts of dy/d_x).
DGRAD_CASES = {
    "f32-3x3-nchw": ("f32", "3x3", 7, 15, (7, 9), "nchw/nchw"),
    "f32-2x4dil1x3-dynchw-dxcl-c40-o60": ("f32", "2x4-dil1x3", 40, 60, (5, 9), "nchw/cl"),
    "f64-1x5-dycl-dxnchw": ("f64", "1x5", 7, 15, (7, 9), "cl/nchw"),
    "f16-5x1-cl": ("f16", "5x1", 7, 15, (7, 9), "cl/cl"),
    "bf16-3x3dil2-nchw": ("bf16", "3x3-dil2", 7, 60, (7, 9), "nchw/nchw"),
}


@pytest.mark.triton_kernels
@pytest.mark.parametrize("case", list(DGRAD_CASES))
def test_dgrad_kernel_without_accumulation(device, case):
    """``_conv_dgrad_bwd_kernel`` with ``ACCUMULATE=False`` (the one-step cell's
    d_x = dgrad(d_gx, W_ih)) into a NaN-poisoned d_x: the data gradient of
    ``conv_same(x, W)`` for the output gradient dy, by autograd in float64;
    then with ``ACCUMULATE`` (the default) the same again added to it."""
    dtype_id, spec_id, channels, rows, size, layouts = DGRAD_CASES[case]
    dtype, spec = _DTYPES[dtype_id], SPECS[spec_id]
    _skip_dtype(device, dtype)
    gen = torch.Generator().manual_seed(2)
    fmt_dy, fmt_dx = (_FMT[f] for f in layouts.split("/"))
    dy = _rand(gen, device, dtype, 2, rows, *size).contiguous(memory_format=fmt_dy)
    w = _rand(gen, device, dtype, rows, channels, *spec.kernel_size, scale=0.3)
    d_x = torch.full((2, channels, *size), float("nan"), device=device, dtype=dtype).contiguous(memory_format=fmt_dx)
    S = fused_step._strides
    launch = (fused_step._conv_dgrad_bwd_kernel, spec, d_x, rows, (dy, w, d_x), (*S(dy), *S(w), *S(d_x)))
    fused_step._launch_dgrad(*launch, ACCUMULATE=False)
    x = torch.zeros(2, channels, *size, dtype=torch.float64, device=device, requires_grad=True)
    (ref,) = torch.autograd.grad(conv_same(x, w.double(), spec), x, dy.double())
    _near_reference(d_x, ref, dtype, "d_x")
    if dtype == torch.float32:
        fused_step._launch_dgrad(*launch)
        _near_reference(d_x, 2 * ref, dtype, "d_x accumulated")


# ----------------------------------------------------------------------------
# Declining
# ----------------------------------------------------------------------------


@pytest.mark.triton_kernels
def test_declines_without_writing(device, package_settings):
    """Mixed dtypes, the switch at 0, bfloat16 under the interpreter, a 3-D
    state: ``False``, every output still NaN."""
    spec, hidden = SPECS["3x3"], 4
    h = torch.rand(1, hidden, 3, 4, device=device)
    gates, aux, grad = torch.rand(1, 3 * hidden, 3, 4, device=device), torch.rand_like(h), torch.rand_like(h)
    w = torch.rand(3 * hidden, hidden, 3, 3, device=device)
    weights = w.split_with_sizes((2 * hidden, hidden))
    math = conv_gru.plan(spec, False, False, True).math

    def run(**over):
        args = dict(grad=grad, h=h, weights=weights, gates=gates, aux=aux)
        args.update(over)
        d_gx = torch.full((1, 3 * hidden, 3, 4), float("nan"), device=device, dtype=args["h"].dtype)
        d_h = torch.full_like(args["h"], float("nan"))
        ran = fused_step.backward_step(False, spec, math, args["grad"], None, args["h"], args["weights"],
                                       args["gates"], args["aux"], d_gx, None, d_h)
        assert torch.isnan(d_gx).all() and torch.isnan(d_h).all()
        return ran

    assert not run(grad=grad.double())  # mixed dtypes
    assert not run(weights=tuple(t.half() for t in weights))
    assert not run(h=h[0])  # not (N, H, Y, X)
    if device.type == "cpu":
        assert not run(**{k: v.bfloat16() for k, v in dict(grad=grad, h=h, gates=gates, aux=aux).items()},
                       weights=tuple(t.bfloat16() for t in weights))  # no bfloat16 in the interpreter
    package_settings(fused_step="0")
    assert not run()


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
from convgru_triton._conv import ConvSpec
from convgru_triton.ops.fused_step import kernels as fs
from convgru_triton.ops.fused_step import naive as fused_naive
records = []
# RAFT's 1/8 map (N=6, 46x62), hidden 128, the 3x3 ConvGRU; compiled, never launched.
spec, n, hid, y, x = ConvSpec((3, 3), (1, 1)), 6, 128, 46, 62
with tc.compile_without_launch(90, records):
    # bfloat16 in both layouts; float16 (the same tensor-core path) channels_last only: each compile ~1.5 s.
    for dtype, cl in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)):
        fmt = torch.channels_last if cl else torch.contiguous_format
        d_gx = torch.zeros(n, 3 * hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
        h = torch.zeros(n, hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
        w = torch.zeros(3 * hid, hid, 3, 3, dtype=dtype)
        S = fs._strides
        d_rz, d_n = d_gx.split_with_sizes((2 * hid, hid), 1)
        w_rz, w_n = w.split_with_sizes((2 * hid, hid))
        fs._launch_dgrad(fs._conv_dgrad_reset_gate_bwd_kernel, spec, h, hid, (d_n, w_n, d_gx, h, d_gx, h),
                         (*S(d_n), *S(w_n), *S(d_gx), *S(h), *S(d_gx), *S(h)))
        fs._launch_dgrad(fs._conv_dgrad_bwd_kernel, spec, h, 2 * hid, (d_rz, w_rz, h), (*S(d_rz), *S(w_rz), *S(h)))
        fs._launch_dgrad(fs._conv_dgrad_bwd_kernel, spec, h, 3 * hid, (d_gx, w, h), (*S(d_gx), *S(w), *S(h)))
out = []
for rec in records:
    ptx = tc.ptx(rec.kernel)
    res = tc.resource_usage(rec.kernel)
    out.append(dict(name=rec.name, dtype=str(rec.signature.get("dy_ptr")), C=rec.constexprs.get("C"),
                    bx=rec.constexprs.get("BLOCK_X"), regs=res["regs"], stack=res["stack"], local=res["local"],
                    wgmma=ptx.count("wgmma.mma_async"), warps=rec.num_warps))
print(json.dumps({"kernels": out}))
"""


@pytest.fixture(scope="module")
def sm90_kernels():
    return compile_for_sm90(_CODEGEN, "the fused backward kernels")


@pytest.mark.slow
def test_sm90_every_kernel_compiles(sm90_kernels):
    got = sorted((k["name"], k["dtype"], k["C"], k["bx"] == 0) for k in sm90_kernels)
    want = sorted((name, dtype, c, cl) for dtype, cl in (("*bf16", False), ("*bf16", True), ("*fp16", True))
                  for name, c in (("_conv_dgrad_reset_gate_bwd_kernel", 128), ("_conv_dgrad_bwd_kernel", 256),
                                  ("_conv_dgrad_bwd_kernel", 384)))
    assert got == want


@pytest.mark.slow
def test_sm90_uses_wgmma(sm90_kernels):
    bad = [f"{k['name']} {k['dtype']} C={k['C']}" for k in sm90_kernels if k["wgmma"] == 0]
    assert not bad, "no wgmma.mma_async in the PTX (no Hopper tensor cores):\n" + "\n".join(bad)


@pytest.mark.slow
def test_sm90_no_spills(sm90_kernels):
    bad = [f"{k['name']} {k['dtype']} C={k['C']}: {k['regs']} registers, stack {k['stack']} B, local {k['local']} B"
           for k in sm90_kernels if k["stack"] or k["local"]]
    assert not bad, "spills to local memory:\n" + "\n".join(bad)


# The weight-gradient kernel at RAFT's bfloat16 shapes, as the cell's plan
# launches it: W_ih (dy = d_gx, 384 rows, from x, 256 channels, with b_ih),
# W_hh reset_before (from h and, rows 256-383, r * h: 128 channels each, no bias)
# and W_hh reset_after (from h, with b_hh); kernels (1, 5) and (3, 3), NCHW and
# channels_last. Compiled, never launched.
_WGRAD_CODEGEN = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
sys.path.insert(0, sys.argv[1])
from bench import _triton_compat as tc
error = tc.nvidia_backend_error()
if error:
    print(json.dumps({"skip": error})); sys.exit(0)
from convgru_triton._conv import ConvSpec
from convgru_triton.ops.fused_step import kernels as fs
records, tags = [], []
n, c_in, hid, y, x = 6, 256, 128, 46, 62
dtype = torch.bfloat16
with tc.compile_without_launch(90, records):
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        for kernel in ((1, 5), (3, 3)):
            spec = ConvSpec(kernel, (1, 1))
            d_gx = torch.zeros(n, 3 * hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
            inp = torch.zeros(n, c_in, y, x, dtype=dtype).contiguous(memory_format=fmt)
            h = torch.zeros(n, hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
            aux, b = torch.zeros_like(h), torch.zeros(3 * hid, dtype=dtype)
            for source, args in (("x", (inp, torch.empty(3 * hid, c_in, *kernel, dtype=dtype), b)),
                                 ("h+rh", (h, torch.empty(3 * hid, hid, *kernel, dtype=dtype), None, aux, 2 * hid)),
                                 ("h", (h, torch.empty(3 * hid, hid, *kernel, dtype=dtype), b))):
                before = len(records)
                fs._launch_wgrad(spec, d_gx, *args)
                tags.extend([("cl" if cl else "nchw", "x".join(map(str, kernel)), source)] * (len(records) - before))
out = []
for rec, (layout, kernel, source) in zip(records, tags):
    res = tc.resource_usage(rec.kernel)
    c = rec.constexprs
    out.append(dict(name=rec.name, layout=layout, kernel=kernel, source=source, C=c.get("C"),
                    two=bool(c.get("TWO_SOURCES")), bias=bool(c.get("HAS_BIAS")), regs=res["regs"],
                    stack=res["stack"], local=res["local"], wgmma=tc.ptx(rec.kernel).count("wgmma.mma_async"),
                    warps=rec.num_warps))
print(json.dumps({"kernels": out}))
"""


@pytest.fixture(scope="module")
def sm90_wgrad_kernels():
    return compile_for_sm90(_WGRAD_CODEGEN, "the weight-gradient kernel")


#: As tests/test_fused_step.py: the defaults keep 32 of a thread's 255 registers free.
REGISTER_HEADROOM = 32


def _wgrad_row(k):
    return (f"{k['layout']} {k['kernel']} from {k['source']} (C={k['C']}, two sources {k['two']}, bias {k['bias']}): "
            f"{k['regs']} registers, stack {k['stack']} B, local {k['local']} B, {k['wgmma']} wgmma, "
            f"{k['warps']} warps")


@pytest.mark.slow
def test_sm90_wgrad_every_variant_compiles(sm90_wgrad_kernels):
    got = sorted((k["name"], k["layout"], k["kernel"], k["source"], k["C"], k["two"], k["bias"])
                 for k in sm90_wgrad_kernels)
    want = sorted(("_conv_wgrad_kernel", layout, kernel, source, c, two, bias)
                  for layout in ("nchw", "cl") for kernel in ("1x5", "3x3")
                  for source, c, two, bias in (("x", 256, False, True), ("h+rh", 128, True, False),
                                               ("h", 128, False, True)))
    assert got == want


@pytest.mark.slow
def test_sm90_wgrad_no_spills_registers(sm90_wgrad_kernels):
    bad = [_wgrad_row(k) for k in sm90_wgrad_kernels
           if k["stack"] or k["local"] or k["regs"] > 255 - REGISTER_HEADROOM]
    assert not bad, f"spills, or fewer than {REGISTER_HEADROOM} registers free:\n" + "\n".join(bad)


@pytest.mark.slow
def test_sm90_wgrad_uses_wgmma(sm90_wgrad_kernels):
    bad = [_wgrad_row(k) for k in sm90_wgrad_kernels if k["wgmma"] == 0]
    assert not bad, "no wgmma.mma_async in the PTX (no Hopper tensor cores):\n" + "\n".join(bad)
