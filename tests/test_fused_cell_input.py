"""The one-step cell's input convolution inside the fused step:
``fused_step.forward_step(..., x=, weight_ih=)`` and the cell's path through it
(``conv_gru.fused_cell_step``, from ``functional._replay_cell``).

* The kernels with the input (HAS_X) write h', gates and aux equal to
  :func:`fused_step.reference_step` of ``gx = conv_same(x, W_ih)``, into
  NaN-poisoned buffers, on shapes that are not block multiples.
* With ``CONVGRU_TRITON_FUSED_STEP=1``, ConvGRUCell2d's output and every
  gradient (input, hx, weight_ih, weight_hh, biases) equal the default path
  (``=0``) and the float64 reference, float32 and float16 (the interpreter
  has no bfloat16), both formulations, kernels (3, 3) and (1, 5), a dilation,
  NCHW and channels_last, with and without biases, more than one channel
  block; the input convolution ran inside the kernels (no convolution in the
  forward at all: the hidden one is fused too).
* SepConvGRUCell2d (two cells) and a 3-step loop feeding h' back.
* Declines to cuDNN + the gate kernels: autocast with another dtype, torch.compile, vmap.
* The backward on the fused path (plan buffers NaN-poisoned): the training
  backward of ConvGRUCell2d and SepConvGRUCell2d (both formulations) calls no
  convolution (no aten.convolution_backward), launches the Triton dgrad and
  wgrad kernels it should, and gives the default path's gradients. The
  default path's gradients too with frozen weights and trainable biases, with
  a saved-tensor hook that hands x (or every 4-D saved tensor) back in the
  other layout after the plan's first step, and with x without gradient (hx
  given or None).
* Bound launches replayed on CPU (``replayed``: a plan binds its fused
  launches to a stand-in that checks each replay's strides and alignment
  against those it was bound with, then runs the interpreter): three training
  steps whose saved-tensor hooks hand x and the weights back in another
  layout or at another address than the step that bound them (a misaligned
  or expanded x, channels_last) give the default path's gradients.
* The HAS_X kernels compiled for sm_90 on this machine (a subprocess with a
  fake sm_90 target, as tests/test_fused_step.py does) use wgmma and spill
  nothing at RAFT's bfloat16 shape.
"""

from __future__ import annotations

import contextlib

import functools
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import convgru_triton as cg
from convgru_triton import functional
from convgru_triton._conv import ConvSpec, conv_same
from convgru_triton.ops.fused_step import kernels as fused_step
from convgru_triton.ops.fused_step import naive as fused_naive
from convgru_triton.ops.sequence import naive as sequence_naive
from convgru_triton.ops.sequence import op as conv_gru
from conftest import compile_for_sm90
from _tolerance import assert_close_to_reference


TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    """No plan made before (by another test) may answer."""
    monkeypatch.setattr(conv_gru, "_PLANS", {})
    monkeypatch.setattr(functional, "_CELL_PLANS", {})


@pytest.fixture
def launches(monkeypatch):
    """Each forward_step call as (with the input x, ran)."""
    calls = []
    launch = fused_step.forward_step

    def counted(*args, **kwargs):
        ran = launch(*args, **kwargs)
        calls.append((kwargs.get("x") is not None, ran))
        return ran

    monkeypatch.setattr(fused_step, "forward_step", counted)
    return calls


def _set_mode(package_settings, value):
    package_settings(fused_step=value)  # in the plans' keys: no plan made under another value answers


def _rand(device, dtype, *shape, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------
# The kernels with the input convolution
# ----------------------------------------------------------------------------


@pytest.mark.triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("case", ["c3-h5-3x3-nchw", "c70-h36-1x5-cl", "c3-h5-3x3dil2-cl-nobias"])
def test_kernels_with_input_equal_reference(device, package_settings, dtype, reset_after, case):
    """C_in 70 and H 36: three (float32, BLOCK_K 32) or two (float16, 64)
    input channel blocks per tap and two output channel blocks (BLOCK_N 32)."""
    package_settings(fused_step="1")
    channels, hidden, kernel, layout, *nobias = case.split("-")
    c_in, hidden = int(channels[1:]), int(hidden[1:])
    spec = ConvSpec((3, 3), (2, 2)) if kernel == "3x3dil2" else ConvSpec(tuple(map(int, kernel.split("x"))), (1, 1))
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = _rand(device, dtype, 2, c_in, 5, 7, seed=1).contiguous(memory_format=fmt)
    h = torch.tanh(_rand(device, dtype, 2, hidden, 5, 7, seed=2)).contiguous(memory_format=fmt)
    w_ih = _rand(device, dtype, 3 * hidden, c_in, *spec.kernel_size, seed=3, scale=0.3)
    w_hh = _rand(device, dtype, 3 * hidden, hidden, *spec.kernel_size, seed=4, scale=0.3)
    b_ih, b_hh = (None, None) if nobias else (_rand(device, dtype, 3 * hidden, seed=5),
                                              _rand(device, dtype, 3 * hidden, seed=6))
    cl = layout == "cl"
    state = conv_gru._empty_frame(h, hidden, cl)
    gates, aux = conv_gru._empty_frame(h, 3 * hidden, cl), conv_gru._empty_frame(h, hidden, cl)
    assert torch.isnan(state).all()  # the conftest poisoning is in force
    weights = conv_gru._hidden_weights(conv_gru.plan(spec, reset_after, False, True), w_hh)
    assert fused_step.forward_step(reset_after, spec, None, h, weights, b_ih, b_hh, state, gates, aux, True,
                                   x=x, weight_ih=w_ih)
    d = [None if t is None else t.double() for t in (x, h, w_ih, w_hh, b_ih, b_hh)]
    ref = fused_naive.reference_step(reset_after, spec, conv_same(d[0], d[2], spec), *d[1:2], *d[3:])
    tol = TOLERANCE[dtype]
    for name, got, want in zip(("h'", "gates", "aux"), (state, gates, aux), ref):
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.triton_kernels
def test_declines_what_it_does_not_take(device, package_settings):
    """A weight_ih of another kernel size or dtype, an input of another size:
    False, nothing written."""
    package_settings(fused_step="1")
    spec = ConvSpec((3, 3), (1, 1))
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    w_hh = _rand(device, torch.float32, 15, 5, 3, 3, seed=3)
    state = torch.full_like(h, float("nan"))
    for x_, w_ih in ((x, _rand(device, torch.float32, 15, 3, 1, 5, seed=4)),
                     (x, _rand(device, torch.float16, 15, 3, 3, 3, seed=4)),
                     (x[:, :, :4], _rand(device, torch.float32, 15, 3, 3, 3, seed=4))):
        assert not fused_step.forward_step(True, spec, None, h, (w_hh,), None, None, state, None, None, False,
                                           x=x_, weight_ih=w_ih)
    assert torch.isnan(state).all()


# ----------------------------------------------------------------------------
# The cell: fused (=1) against the default path (=0) and the float64 reference
# ----------------------------------------------------------------------------


def _train_step(module, x, h0, dtype):
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    h0 = h0.detach().clone().requires_grad_()
    out = module(x, h0)
    grad = _rand(out.device, dtype, *out.shape, seed=9)
    out.backward(grad)
    return [out.detach(), x.grad, h0.grad] + [p.grad for _, p in sorted(module.named_parameters())]


def _reference(module, x, h0, reset_after, spec):
    """Output and gradients of the same step in float64 from the ``*_ref`` math."""
    params = {n: p.detach().double().requires_grad_() for n, p in module.named_parameters()}
    x, h0 = x.detach().double().requires_grad_(), h0.detach().double().requires_grad_()
    gx = conv_same(x, params["weight_ih"], spec)
    out = sequence_naive.conv_gru_cell_ref(gx, h0, params["weight_hh"], params.get("bias_ih"), params.get("bias_hh"), spec,
                                  reset_after)
    # The gradient _train_step hands over (rounded to the module's dtype), in float64.
    out.backward(_rand(out.device, module.weight_ih.dtype, *out.shape, seed=9).double())
    return [out.detach(), x.grad, h0.grad] + [params[n].grad for n in sorted(params)]


NAMES = ["h'", "d input", "d hx"]
#: (C_in, H, kernel, dilation, channels_last, bias). 5x7 maps, N = 2 (70 pixels:
#: not a BLOCK_M multiple); C_in 40: two input channel blocks (float32, BLOCK_K 32).
CELL_CASES = {
    "c3-h5-3x3-nchw": (3, 5, (3, 3), (1, 1), False, True),
    "c3-h5-1x5-cl-nobias": (3, 5, (1, 5), (1, 1), True, False),
    "c40-h20-3x3dil21-cl": (40, 20, (3, 3), (2, 1), True, True),
}
# float16 at the small shapes (the large one costs 2-3 s a run under the interpreter).
CELL_PARAMS = [pytest.param(case, dtype, id=f"{case}-{str(dtype)[6:]}") for case in CELL_CASES
               for dtype in (torch.float32, torch.float16) if dtype == torch.float32 or CELL_CASES[case][1] == 5]


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("case, dtype", CELL_PARAMS)
def test_cell_equals_default_path_and_reference(device, package_settings, launches, case, dtype, reset_after):
    c_in, hidden, kernel, dilation, channels_last, bias = CELL_CASES[case]
    torch.manual_seed(0)
    module = cg.ConvGRUCell2d(c_in, hidden, kernel, bias=bias, reset_after=reset_after, dilation=dilation,
                              backend="triton").to(device=device, dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _rand(device, dtype, 2, c_in, 5, 7, seed=1).contiguous(memory_format=fmt)
    h0 = torch.tanh(_rand(device, dtype, 2, hidden, 5, 7, seed=2)).contiguous(memory_format=fmt)

    _set_mode(package_settings, "0")
    expected = _train_step(module, x, h0, dtype)
    assert launches == []
    _set_mode(package_settings, "1")
    got = _train_step(module, x, h0, dtype)
    assert launches == [(True, True)], "the cell's fused step with its input did not run"
    ref = _reference(module, x, h0, reset_after, ConvSpec(kernel, dilation))

    names = NAMES + [f"d {n}" for n, _ in sorted(module.named_parameters())]
    assert len(got) == len(expected) == len(ref) == len(names)
    # Two algorithms (the fused kernels; cuDNN and the gate kernels), each
    # measured against float64: weight and bias gradients sum over every pixel
    # of the batch, and the two paths sum in different orders.
    for name, g, e, r in zip(names, got, expected, ref):
        assert_close_to_reference(g, e, r, names=("fused", "default"), what=name)


class _Convolutions(TorchDispatchMode):
    """Records the weight shape of every aten.convolution call."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.weights.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.triton_kernels
def test_forward_runs_no_convolution(device, package_settings, launches):
    """With =1 the cell's training forward calls no convolution at all: W_ih * x
    (and W_h * h) ran inside the kernels, gx was never made. With =0 the input
    convolution is a convolution call with W_ih (cuDNN on a GPU)."""
    module = cg.ConvGRUCell2d(3, 5, (3, 3), backend="triton").to(device)
    x = _rand(device, torch.float32, 2, 3, 5, 7, seed=1).requires_grad_()
    for mode, want in (("0", True), ("1", False)):
        _set_mode(package_settings, mode)
        with _Convolutions() as convs:
            out = module(x)
        assert (tuple(module.weight_ih.shape) in convs.weights) == want, (mode, convs.weights)
        if mode == "1":
            assert convs.weights == [] and launches == [(True, True)]
        out.sum().backward()  # and the backward runs on what the fused forward saved


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_without_gradient_and_without_hx(device, package_settings, launches, reset_after, layout):
    """No gradient (no autograd node, scratch buffers) and hx None (zeros made
    by the fused path): h' equals the default path's, in the same layout."""
    module = cg.ConvGRUCell2d(3, 5, (1, 5), reset_after=reset_after, backend="triton").to(device)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = _rand(device, torch.float32, 2, 3, 5, 7, seed=1).contiguous(memory_format=fmt)
    h = _rand(device, torch.float32, 2, 5, 5, 7, seed=2).contiguous(memory_format=fmt)
    results = {}
    for mode in ("0", "1"):
        _set_mode(package_settings, mode)
        with torch.no_grad():
            results[mode] = module(x, h), module(x)
    assert launches == [(True, True)] * 2
    for got, want in zip(results["1"], results["0"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        assert got.stride() == want.stride()


def _grads(fn, inputs, module):
    for p in module.parameters():
        p.grad = None
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(_rand(out.device, out.dtype, *out.shape, seed=9))
    return [out.detach()] + [t.grad for t in inputs] + [p.grad for _, p in sorted(module.named_parameters())]


def _fused_plans(module) -> int:
    """How many fused plans (one per cell, per half of a separable cell) the module holds."""
    plans = []
    for p in module.__dict__.get("_cell_plans", {}).values():
        plans += [p.first, p.second] if hasattr(p, "first") else [p]
    return sum(p is not None and getattr(p, "path", None) == "fused" for p in plans)


def _forward_steps(device, module, steps: int) -> int:
    """The fused steps that went through ``fused_step.forward_step``: every
    step on CPU (the interpreter compiles nothing, so nothing is bound), each
    fused plan's first step on a GPU (later ones replay its bound launches)."""
    return steps if device.type == "cpu" else _fused_plans(module)


def _fused_equals_default(package_settings, launches, fn, inputs, module, runs):
    _set_mode(package_settings, "0")
    expected = _grads(fn, inputs, module)
    _set_mode(package_settings, "1")
    launches.clear()
    got = _grads(fn, inputs, module)
    assert launches == [(True, True)] * _forward_steps(inputs[0].device, module, runs)
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=2e-5, msg=lambda m: f"result {i}: {m}")


@pytest.mark.triton_kernels
def test_sep_conv_gru_cell(device, package_settings, launches):
    """SepConvGRUCell2d: its two cells ((1, 5) then (5, 1)) each run fused with their input."""
    torch.manual_seed(0)
    module = cg.SepConvGRUCell2d(3, 5, kernel_size=5, backend="triton").to(device)
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    _fused_equals_default(package_settings, launches, module, (x, h), module, 2)


@pytest.mark.triton_kernels
def test_three_steps_feeding_h_back(device, package_settings, launches):
    """A 3-step loop (RAFT's refinement): h' of a step is the next step's hx;
    the gradient flows back through all three fused steps."""
    torch.manual_seed(0)
    module = cg.ConvGRUCell2d(3, 5, (3, 3), reset_after=True, backend="triton").to(device)
    xs, h = _rand(device, torch.float32, 3, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)

    def loop(xs, h):
        for x in xs:
            h = module(x, h)
        return h

    _fused_equals_default(package_settings, launches, loop, (xs, h), module, 3)


@pytest.mark.triton_kernels
def test_autocast(device, package_settings, launches):
    """Under autocast float16 the cell's plan casts the float32 input and
    weights once (autocast's rule) and runs the fused step with its input
    convolution, as plain eager after the cast; float16 tensors, already in
    the autocast dtype, run fused without a cast."""
    module = cg.ConvGRUCell2d(3, 5, (3, 3), backend="triton").to(device)
    x = _rand(device, torch.float32, 2, 3, 5, 7, seed=1)
    results = {}
    for mode in ("0", "1"):
        _set_mode(package_settings, mode)
        with torch.autocast(device.type, dtype=torch.float16):
            results[mode] = module(x)
    assert results["1"].dtype == torch.float16
    assert launches and all(with_x and ran for with_x, ran in launches)
    torch.testing.assert_close(results["1"], results["0"], **TOLERANCE[torch.float16])
    module.half()
    with torch.autocast(device.type, dtype=torch.float16):
        out = module(x.half())
    assert launches[-1] == (True, True)
    torch.testing.assert_close(out, results["0"], **TOLERANCE[torch.float16])


@pytest.mark.triton_kernels
def test_autocast_with_the_layout_policy_casts_the_biases(device, package_settings, launches):
    """As on CUDA in float16/bfloat16: the layout policy casts input, hx and
    weights to the autocast dtype in its copy, the float32 biases get
    autocast's cast here, and the step runs fused with the input convolution;
    the same result and float32 parameter gradients as cuDNN + the gate kernels."""
    package_settings(layout="channels_last")  # forces on the CPU what auto does on CUDA
    module = cg.ConvGRUCell2d(3, 5, (3, 3), backend="triton").to(device)
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    results = {}
    for mode in ("0", "1"):
        _set_mode(package_settings, mode)
        module.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16):
            out = module(x, h)
        out.float().square().sum().backward()
        results[mode] = (out, [p.grad.clone() for p in module.parameters()])
    assert launches[-1] == (True, True)  # fused, with the input convolution
    torch.testing.assert_close(results["1"][0], results["0"][0], **TOLERANCE[torch.float16])
    for got, want in zip(results["1"][1], results["0"][1]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.triton_kernels
def test_compile_and_vmap_decline(device, package_settings, launches):
    """torch.compile (the traced step math) and torch.vmap (the operator's
    vmap rule) keep their own paths: the fused cell step is never asked."""
    module = cg.ConvGRUCell2d(3, 5, (3, 3), backend="triton").to(device)
    xs, h = _rand(device, torch.float32, 2, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    _set_mode(package_settings, "1")
    eager = module(xs[0], h)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="eager")(xs[0], h)
    torch._dynamo.reset()
    batched = torch.func.vmap(module, in_dims=(0, None))(xs, h)
    assert launches[0] == (True, True)  # eager: fused with the input
    assert not any(with_x for with_x, _ in launches[1:])
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(batched[0], eager, atol=2e-5, rtol=2e-5)


@pytest.mark.triton_kernels
def test_default_auto_does_not_try_the_fused_cell_step(device, package_settings, launches):
    """Under auto with no tuning file naming the fused path (no shipped file names it)
    the cell's plan decides once for cuDNN + the gate kernels, and no call
    tries the fused step; a path forced to "fused", as a tuned entry would,
    and =1 make plans that run it."""
    from convgru_triton import _tuning

    module = cg.ConvGRUCell2d(3, 5, (3, 3), backend="triton").to(device)
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)

    def paths():
        return sorted(p.path for p in module.__dict__["_cell_plans"].values())

    package_settings(fused_step="auto")
    for _ in range(2):
        module(x, h)
    assert launches == [] and paths() == ["gates"]
    with _tuning.forced_step_path("fused"):
        module(x, h)
    assert launches == [(True, True)] and paths() == ["fused", "gates"]
    _set_mode(package_settings, "1")
    module(x, h)
    assert launches == [(True, True)] * 2 and paths() == ["fused", "fused", "gates"]


# ----------------------------------------------------------------------------
# The cell's backward on the fused path: Triton only, and what it is handed
# ----------------------------------------------------------------------------


class _Ops(TorchDispatchMode):
    """Records every aten overload called inside it."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.funcs.append(func)
        return func(*args, **(kwargs or {}))


def _convolutions(funcs):
    """The convolution calls (forward or backward, any backend's) among ``funcs``."""
    return [f for f in funcs if "convolution" in f.name()]


@pytest.fixture
def poisoned_plans(monkeypatch):
    """Every buffer a cell plan allocates (the backward's d_x, d_h, gate and
    weight gradients included) starts as NaN."""
    from convgru_triton import _plan

    def allocate(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(_plan, "_allocate", allocate)


@pytest.fixture
def bwd_launches(monkeypatch):
    """The fused backward's Triton launches, in order: ``("wgrad", rows,
    source channels, two sources, bias)`` and ``("dgrad", kernel, accumulate)``."""
    calls = []
    wgrad, dgrad = fused_step._launch_wgrad, fused_step._launch_dgrad

    def counted_wgrad(spec, dy, src, d_w, d_b, src2=None, split=None):
        calls.append(("wgrad", dy.shape[1], src.shape[1], src2 is not None, d_b is not None))
        return wgrad(spec, dy, src, d_w, d_b, src2, split)

    def counted_dgrad(kernel, *args, **kwargs):
        calls.append(("dgrad", kernel.__name__, kwargs.get("ACCUMULATE", True)))
        return dgrad(kernel, *args, **kwargs)

    monkeypatch.setattr(fused_step, "_launch_wgrad", counted_wgrad)
    monkeypatch.setattr(fused_step, "_launch_dgrad", counted_dgrad)
    return calls


def _step_recorded(fn, inputs, module, requires_grad, hooks=None):
    """One training step of ``fn(*inputs)``, ``inputs[i]`` requiring grad as
    ``requires_grad[i]``; the backward inside :class:`_Ops` (and ``hooks``, a
    ``saved_tensors_hooks`` (pack, unpack) pair, around the whole step).
    Returns ([output, the inputs' gradients, the parameters' gradients by
    name], the backward's aten calls)."""
    for p in module.parameters():
        p.grad = None
    inputs = [t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires_grad)]
    with torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else contextlib.nullcontext():
        out = fn(*inputs)
        with _Ops() as ops:
            out.backward(_rand(out.device, out.dtype, *out.shape, seed=9))
    return [out.detach()] + [t.grad for t in inputs] + [p.grad for _, p in sorted(module.named_parameters())], ops.funcs


def _check_same(got, expected, names):
    assert len(got) == len(expected) == len(names)
    for name, g, e in zip(names, got, expected):
        if e is None:
            assert g is None, f"{name}: a gradient where the default path has none"
        else:
            torch.testing.assert_close(g, e, atol=1e-4, rtol=2e-5, msg=lambda m: f"{name}: {m}")


def _names(module, inputs):
    params = [f"d {n}" for n, _ in sorted(module.named_parameters())]
    return ["h'"] + [f"d input {i}" for i in range(len(inputs))] + params


def _backward_ops(package_settings, fn, inputs, module, requires_grad=None):
    """The step at fused_step=0 then =1: every result of =1 equals =0's.
    Returns the backward's aten calls of both: (default, fused)."""
    requires_grad = requires_grad or [True] * len(inputs)
    _set_mode(package_settings, "0")
    expected, default_ops = _step_recorded(fn, inputs, module, requires_grad)
    _set_mode(package_settings, "1")
    got, fused_ops = _step_recorded(fn, inputs, module, requires_grad)
    _check_same(got, expected, _names(module, inputs))
    return default_ops, fused_ops


def _per_half(reset_after, hidden, c_in, x_grad=True, weights=True, x_into=False):
    """The fused backward launches of one cell step (one half of a separable
    one; ``x_into``: the first half's, whose input dgrad adds to the second's d_x)."""
    if reset_after:
        calls = [("dgrad", "_conv_dgrad_bwd_kernel", True)]
        calls += [("wgrad", 3 * hidden, hidden, False, True)] if weights else []  # W_hh, b_hh
    else:
        calls = [("dgrad", "_conv_dgrad_reset_gate_bwd_kernel", True), ("dgrad", "_conv_dgrad_bwd_kernel", True)]
        calls += [("wgrad", 3 * hidden, hidden, True, False)] if weights else []  # W_hrz from h, W_hn from r * h
    calls += [("wgrad", 3 * hidden, c_in, False, True)] if weights else []  # W_ih, b_ih (both biases: reset_before)
    return calls + ([("dgrad", "_conv_dgrad_bwd_kernel", x_into)] if x_grad else [])  # d_x, written (or added)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("kind, reset_after", [
    pytest.param("cell", False, id="cell-reset_before"), pytest.param("cell", True, id="cell-reset_after"),
    pytest.param("sep", False, id="sep-reset_before", marks=pytest.mark.slow),  # 2.5 s under the interpreter
    pytest.param("sep", True, id="sep-reset_after")])
def test_fused_backward_runs_no_convolution(device, poisoned_plans, package_settings, launches, bwd_launches, kind,
                                            reset_after):
    """With =1 the training backward of ConvGRUCell2d and SepConvGRUCell2d calls
    no convolution (no aten.convolution_backward: no cuDNN): dgrad and wgrad,
    biases included, are the Triton kernels (the separable step's first half
    adds its d_x into the second's: ACCUMULATE); every gradient equals =0's,
    whose backward the recorder sees calling aten.convolution_backward."""
    torch.manual_seed(0)
    if kind == "cell":
        module = cg.ConvGRUCell2d(3, 5, (3, 3), reset_after=reset_after, dilation=(2, 1), backend="triton")
    else:
        module = cg.SepConvGRUCell2d(3, 5, kernel_size=5, reset_after=reset_after, backend="triton")
    module = module.to(device)
    halves = 1 if kind == "cell" else 2
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    default_ops, fused_ops = _backward_ops(package_settings, module, (x, h), module)
    assert torch.ops.aten.convolution_backward.default in default_ops  # the recorder sees the backward
    assert _convolutions(fused_ops) == []
    assert launches == [(True, True)] * halves
    # The separable step backward: the second half, then the first, adding its d_x to the second's.
    want = _per_half(reset_after, 5, 3) + (_per_half(reset_after, 5, 3, x_into=True) if kind == "sep" else [])
    assert bwd_launches == want


@pytest.mark.triton_kernels
@pytest.mark.parametrize("case", [pytest.param("both-reset_before", marks=pytest.mark.slow), "both-reset_after",
                                  "weight_hh-reset_after", "weight_ih-reset_before"])
def test_frozen_weights_trainable_biases(device, poisoned_plans, package_settings, launches, bwd_launches, case):
    """Weights not requiring grad, biases trainable, on the fused path: the
    bias gradients (and those of the trainable weight, input and hx) equal the
    default path's; no weight gradient is launched for a frozen weight, and
    its bias's gradient is a sum, not a convolution call."""
    frozen, form = case.split("-")
    reset_after = form == "reset_after"
    torch.manual_seed(0)
    module = cg.ConvGRUCell2d(3, 5, (1, 5), reset_after=reset_after, backend="triton").to(device)
    for name in ("weight_ih", "weight_hh") if frozen == "both" else (frozen,):
        getattr(module, name).requires_grad_(False)
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    _set_mode(package_settings, "0")
    expected, _ = _step_recorded(module, (x, h), module, [True, True])
    _set_mode(package_settings, "1")
    got, fused_ops = _step_recorded(module, (x, h), module, [True, True])
    assert _convolutions(fused_ops) == []
    names = _names(module, (x, h))
    _check_same(got, expected, names)
    grads = dict(zip(names, got))
    assert grads["d bias_ih"] is not None and grads["d bias_hh"] is not None
    for name in ("weight_ih", "weight_hh"):
        assert (grads[f"d {name}"] is None) == (frozen in ("both", name)), name
    assert launches == [(True, True)]
    wgrads = [c for c in bwd_launches if c[0] == "wgrad"]
    want = [c for c, w in ((("wgrad", 15, 5, not reset_after, reset_after), "weight_hh"),
                           (("wgrad", 15, 3, False, True), "weight_ih")) if frozen not in ("both", w)]
    assert wgrads == want


@pytest.mark.triton_kernels
@pytest.mark.parametrize("case", ["x-to_cl-reset_before", pytest.param("x-to_nchw-reset_after", marks=pytest.mark.slow),
                                  "all-to_cl-reset_after",
                                  pytest.param("all-to_nchw-reset_before", marks=pytest.mark.slow)])
def test_saved_tensor_hooks_change_the_layout(device, poisoned_plans, package_settings, launches, case):
    """A saved-tensor hook that hands tensors back in the other layout (unpack:
    ``t.contiguous(memory_format=...)``): x alone, or every 4-D saved tensor
    (x, hx, the weights, gates, aux). The plan's first fused step runs without
    the hook (on a GPU it binds its launches to the layouts it saw), the second
    with it: both give the default path's gradients."""
    which, to, form = case.split("-")
    reset_after = form == "reset_after"
    given, back = ((torch.contiguous_format, torch.channels_last) if to == "to_cl"
                   else (torch.channels_last, torch.contiguous_format))
    torch.manual_seed(0)
    module = cg.ConvGRUCell2d(3, 5, (3, 3), reset_after=reset_after, backend="triton").to(device)
    x = _rand(device, torch.float32, 2, 3, 5, 7, seed=1).contiguous(memory_format=given)
    h = _rand(device, torch.float32, 2, 5, 5, 7, seed=2).contiguous(memory_format=given)
    changed = []

    def unpack(t):
        if t.dim() == 4 and (which == "all" or t.shape == x.shape):
            changed.append(tuple(t.shape))
            return t.contiguous(memory_format=back)
        return t

    _set_mode(package_settings, "0")
    expected, _ = _step_recorded(module, (x, h), module, [True, True])
    _set_mode(package_settings, "1")
    names = _names(module, (x, h))
    for hooks in (None, (lambda t: t, unpack)):
        got, ops = _step_recorded(module, (x, h), module, [True, True], hooks)
        _check_same(got, expected, names)
        assert _convolutions(ops) == []
    assert launches == [(True, True)] * _forward_steps(device, module, 2)
    assert tuple(x.shape) in changed and (which == "x" or (15, 5, 3, 3) in changed)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after, hx", [
    pytest.param(False, "none", id="reset_before-none", marks=pytest.mark.slow),
    pytest.param(False, "given", id="reset_before-given"), pytest.param(True, "none", id="reset_after-none"),
    pytest.param(True, "given", id="reset_after-given", marks=pytest.mark.slow)])
def test_input_without_gradient(device, poisoned_plans, package_settings, launches, bwd_launches, reset_after, hx):
    """x not requiring grad (gradients for hx, when given, and the weights
    only), and hx None (zeros made by the plan): the default path's gradients;
    no input dgrad is launched (d_x is not wanted)."""
    torch.manual_seed(0)
    module = cg.ConvGRUCell2d(3, 5, (3, 3), reset_after=reset_after, backend="triton").to(device)
    x, h = _rand(device, torch.float32, 2, 3, 5, 7, seed=1), _rand(device, torch.float32, 2, 5, 5, 7, seed=2)
    if hx == "none":
        fn, inputs, needs = (lambda x: module(x)), (x,), [False]
    else:
        fn, inputs, needs = module, (x, h), [False, True]
    default_ops, fused_ops = _backward_ops(package_settings, fn, inputs, module, needs)
    assert _convolutions(fused_ops) == [] and torch.ops.aten.convolution_backward.default in default_ops
    assert launches == [(True, True)]
    assert bwd_launches == _per_half(reset_after, 5, 3, x_grad=False)


# ----------------------------------------------------------------------------
# Bound launches replayed on CPU
# ----------------------------------------------------------------------------


class _CheckedLaunch:
    """What a plan binds a fused launch to, on CPU: a replay checks that its
    tensors have the strides and 16-byte alignment the launch was bound with
    (a compiled kernel's arguments after the tensors are frozen at binding,
    and Triton specializes pointers on alignment), then runs the kernel under
    the interpreter with those tensors and the frozen arguments."""

    def __init__(self, record, tensors):
        from convgru_triton import _plan

        kernel, grid, positional, keywords, _ = record
        call = {k: v for k, v in keywords.items() if k not in _plan._OPTIONS}
        bound = inspect.signature(kernel.fn).bind(*positional, **call)
        bound.apply_defaults()
        self.kernel, self.grid, self.n = kernel, tuple(grid), len(tensors)
        self.names = list(bound.arguments)
        self.options = {k: v for k, v in keywords.items() if k in _plan._OPTIONS}
        self.tail = tuple(bound.arguments.values())[self.n:]
        # None: a pointer the kernel takes as a constexpr (gx with the cell's input inside)
        self.facts = [None if t is None else (t.stride(), not t.data_ptr() & 15) for t in tensors]
        self.function = self.metadata = None
        self.go = functools.partial(self._run, *self.grid, *(1,) * (3 - len(self.grid)))
        self.replays = 0

    def __call__(self, stream, *tensors):
        self._run(*self.grid, *(1,) * (3 - len(self.grid)), stream, None, None, None, None, None,
                  *tensors, *self.tail)

    def _run(self, *args):
        tensors, tail = args[9:9 + self.n], args[9 + self.n:]
        assert tail == self.tail
        for i, (t, facts) in enumerate(zip(tensors, self.facts)):
            where = f"{self.kernel.fn.__name__} tensor {self.names[i]}"
            if facts is None:
                assert t is None, where
                continue
            stride, aligned = facts
            assert t.stride() == stride, f"{where}: strides {t.stride()}, bound with {stride}"
            assert not (aligned and t.data_ptr() & 15), f"{where}: misaligned, bound aligned"
        self.replays += 1
        self.kernel[self.grid](**dict(zip(self.names, tensors + tail)), **self.options)


@pytest.fixture
def replayed(monkeypatch):
    """Cell plans bind their fused launches on CPU too (:class:`_CheckedLaunch`),
    so that their later steps replay them as on a GPU; yields the bound launches."""
    from convgru_triton import _plan

    bound = []
    build = _plan._build

    def bindable(*args, **kwargs):
        p = build(*args, **kwargs)
        p.bindable = True
        return p

    def bind(record, tensors):
        launch = _CheckedLaunch(record, tensors)
        bound.append(launch)
        return launch

    monkeypatch.setattr(_plan, "_build", bindable)
    monkeypatch.setattr(_plan, "_bind_record", bind)
    return bound


def _misaligned(t):
    """``t``'s values at an address 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape).copy_(t)
    assert out.data_ptr() & 15
    return out


def _clone_all(t):
    return t.clone()


def _dense(t):
    return t.contiguous()


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


#: (x as given, the saved-tensor hooks' unpack per training step): a step
#: without hooks, then one whose hooks hand x (and the rest) back otherwise.
REPLAY_CASES = {
    "plain": ("plain", (None, None, None)),
    "channels_last-hooks": ("channels_last", (None, _dense, None)),
    "misaligned-first-hooked": ("misaligned", (_clone_all, None, None)),
    "expanded-hooks": ("expanded", (None, _dense, None)),
    "channels_last-first-hooked": ("plain", (_channels_last, None, None)),
}


@pytest.mark.triton_kernels
@pytest.mark.parametrize("cls", ["cell", pytest.param("sep", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c.endswith("first-hooked") else [pytest.mark.slow])
                                  for c in REPLAY_CASES])
def test_bound_launches_replayed(device, poisoned_plans, package_settings, replayed, cls, case):
    """Three training steps of one call signature on the fused path with its
    launches bound (on CPU through :class:`_CheckedLaunch`, which asserts that
    every replay gets the strides and alignment it was bound with), some under
    saved-tensor hooks that hand x and the weights back as fresh copies or in
    another layout (a misaligned x bound at a hooked step, then replayed
    without the hook; an expanded x made dense): every gradient equals the
    default path's, and later steps replayed the bound launches."""
    if device.type != "cpu":
        pytest.skip("the CPU stand-in for bound launches (a GPU binds its own: the other tests there)")
    given, unpacks = REPLAY_CASES[case]
    torch.manual_seed(0)
    module = (cg.ConvGRUCell2d(3, 5, (3, 3), backend="triton") if cls == "cell"
              else cg.SepConvGRUCell2d(3, 5, kernel_size=5, backend="triton")).to(device)
    x = _rand(device, torch.float32, 2, 3, 5, 7, seed=1)
    if given == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif given == "misaligned":
        x = _misaligned(x)
    elif given == "expanded":
        x = x[:1].expand(2, -1, -1, -1)
    x.requires_grad_()  # x itself, not a copy: its layout and address are the case
    h = _rand(device, torch.float32, 2, 5, 5, 7, seed=2).requires_grad_()
    grad = _rand(device, torch.float32, 2, 5, 5, 7, seed=9)

    def train_step(unpack):
        for t in (x, h, *module.parameters()):
            t.grad = None
        hooks = (lambda t: t, unpack) if unpack else (None, None)
        with torch.autograd.graph.saved_tensors_hooks(*hooks) if unpack else contextlib.nullcontext():
            out = module(x, h)
        out.backward(grad)
        return [out.detach(), x.grad, h.grad] + [p.grad for _, p in sorted(module.named_parameters())]

    results = {}
    for mode in ("0", "1"):
        _set_mode(package_settings, mode)
        results[mode] = [train_step(unpack) for unpack in unpacks]
    names = _names(module, (x, h))
    for got, expected in zip(results["1"], results["0"]):
        _check_same(got, expected, names)
    assert replayed and sum(launch.replays for launch in replayed) > 0


# ----------------------------------------------------------------------------
# Compiled for sm_90 on this machine (no GPU): wgmma, no spills, registers
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
from convgru_triton.ops.fused_step import kernels as fused_step
from convgru_triton.ops.fused_step import naive as fused_naive
fused_step.supports = lambda spec, dtype, device: True  # CPU tensors through the launcher; compiled, never launched
from convgru_triton import _settings
fused_setting = _settings.override(fused_step="1")  # kept: a collected generator would restore the setting
fused_setting.__enter__()  # for the rest of this process
records, tags = [], []
with tc.compile_without_launch(90, records):
    # RAFT's update block: x 256 channels, hidden 128, the 1/8 map 46x62, N = 6, bfloat16.
    n, c_in, hid, y, x = 6, 256, 128, 46, 62
    dtype = torch.bfloat16
    for reset_after in (False, True):
        for cl in (False, True):
            for kernel in ((1, 5), (3, 3)):
                fmt = torch.channels_last if cl else torch.contiguous_format
                inp = torch.zeros(n, c_in, y, x, dtype=dtype).contiguous(memory_format=fmt)
                h = torch.zeros(n, hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
                w = torch.zeros(3 * hid, hid, *kernel, dtype=dtype)
                w_ih = torch.zeros(3 * hid, c_in, *kernel, dtype=dtype)
                b = torch.zeros(3 * hid, dtype=dtype)
                ws = (w,) if reset_after else w.split_with_sizes((2 * hid, hid))
                gates = torch.empty(n, 3 * hid, y, x, dtype=dtype).contiguous(memory_format=fmt)
                aux, state = torch.empty_like(h), torch.empty_like(h)
                before = len(records)
                for save in (True, False):
                    g, a = (gates, aux) if save or not reset_after else (None, None)
                    fused_step.forward_step(reset_after, ConvSpec(kernel, (1, 1)), None, h, ws, b, b, state, g, a,
                                            save, x=inp, weight_ih=w_ih)
                tags.extend([("cl" if cl else "nchw", "x".join(map(str, kernel)))] * (len(records) - before))
out = []
for rec, (layout, kernel) in zip(records, tags):
    res = tc.resource_usage(rec.kernel)
    out.append(dict(name=rec.name, layout=layout, kernel=kernel, has_x=bool(rec.constexprs.get("HAS_X")),
                    regs=res["regs"], stack=res["stack"], local=res["local"],
                    wgmma=tc.ptx(rec.kernel).count("wgmma.mma_async"), warps=rec.num_warps))
print(json.dumps({"kernels": out}))
"""


@pytest.fixture(scope="module")
def sm90_kernels():
    return compile_for_sm90(_CODEGEN, "the fused kernels with the input")


#: As tests/test_fused_step.py: the defaults keep 32 of a thread's 255 registers free.
REGISTER_HEADROOM = 32


@pytest.mark.slow
def test_sm90_every_variant_compiles(sm90_kernels):
    got = {(k["name"], k["layout"], k["kernel"]) for k in sm90_kernels}
    want = {(n, lay, ks) for n in ("_conv_rz_fwd_kernel", "_conv_n_fwd_kernel", "_conv_reset_after_fwd_kernel")
            for lay in ("nchw", "cl") for ks in ("1x5", "3x3")}
    assert got == want
    assert all(k["has_x"] for k in sm90_kernels)


@pytest.mark.slow
def test_sm90_wgmma_no_spills_registers(sm90_kernels):
    rows = [f"{k['name']} {k['layout']} {k['kernel']}: {k['regs']} registers, stack {k['stack']} B, "
            f"local {k['local']} B, {k['wgmma']} wgmma" for k in sm90_kernels]
    bad = [r for r, k in zip(rows, sm90_kernels)
           if k["wgmma"] == 0 or k["stack"] or k["local"] or k["regs"] > 255 - REGISTER_HEADROOM]
    assert not bad, "no wgmma, spills, or no register headroom:\n" + "\n".join(bad)
