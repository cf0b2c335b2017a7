"""Numerics at the edges: half precision against a float64 reference and against
eager PyTorch in the same precision, saturated and non-finite pre-activations
over whole sequences, float64 gradcheck through the kernels, and 64-bit offsets
for tensors past 2**31 elements.

On CPU the Triton kernels run under the interpreter (see conftest), which has no
bfloat16: bfloat16 cases run on a GPU only. The measured bounds are quoted in
docs/errors.md, "Errors and numerics".

The offset checks run the kernels in a child process (a wrong offset can crash
the process): ``python tests/test_numerics.py offsets --device cpu|cuda --case
batch|plane`` prints one JSON object, kernel -> result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from convgru_triton import ConvGRU, ConvGRU1d, conv_gru

# Run as a script (the offset checks' child process), CUDA must stay uninitialised
# in the parent: the kernels run in forked children.
_AS_SCRIPT = __name__ == "__main__"
DEVICE = torch.device("cuda" if not _AS_SCRIPT and torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RESET = pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
HALF_DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(
        torch.bfloat16,
        id="bfloat16",
        marks=pytest.mark.skipif(not ON_GPU, reason="bfloat16 needs compiled kernels: the interpreter has no bfloat16"),
    ),
]


# ----------------------------------------------------------------------------
# Half precision: storage float16/bfloat16, math float32 inside the kernels
# ----------------------------------------------------------------------------

# Bounds the tests enforce (docs/errors.md quotes them with the measured values):
# output / h_n: max |error| against float64; gradients: max |error| / max |gradient|.
HALF_BOUNDS = {
    torch.float16: dict(out=2e-3, grad=4e-3),
    torch.bfloat16: dict(out=1.6e-2, grad=3.2e-2),  # 8x float16: 3 mantissa bits fewer
}


def _run_sequence(model, x, hx, grad_out, grad_hn):
    x = x.detach().requires_grad_(True)
    hx = hx.detach().requires_grad_(True)
    out, h_n = model(x, hx)
    loss = (out.double() * grad_out).sum() + (h_n.double() * grad_hn).sum()
    grads = torch.autograd.grad(loss, [x, hx] + list(model.parameters()))
    return out.double(), h_n.double(), [g.double() for g in grads]


def half_precision_errors(dtype, reset_after, device, seed=0):
    """Errors of a 2-layer bidirectional ConvGRU over 6 steps in ``dtype`` against
    the same model in float64, for the Triton kernels and for eager PyTorch in
    ``dtype`` (same convolutions, gate math op by op in ``dtype``).
    Returns {backend: (output error, h_n error, worst relative gradient error)}."""
    torch.manual_seed(seed)
    kwargs = dict(num_layers=2, bidirectional=True, reset_after=reset_after, device=device)
    reference = ConvGRU(3, 4, 3, dtype=torch.float64, backend="torch", **kwargs)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 3, 8, 9, generator=gen, dtype=torch.float64).to(device)
    hx = (0.5 * torch.randn(4, 2, 4, 8, 9, generator=gen, dtype=torch.float64)).to(device)
    grad_out = torch.randn(6, 2, 8, 8, 9, generator=gen, dtype=torch.float64).to(device)
    grad_hn = torch.randn(4, 2, 4, 8, 9, generator=gen, dtype=torch.float64).to(device)
    want = _run_sequence(reference, x, hx, grad_out, grad_hn)
    errors = {}
    for backend in ("triton", "torch"):
        model = ConvGRU(3, 4, 3, dtype=dtype, backend=backend, **kwargs)
        model.load_state_dict({k: v.to(dtype) for k, v in reference.state_dict().items()})
        got = _run_sequence(model, x.to(dtype), hx.to(dtype), grad_out, grad_hn)
        grad_error = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got[2], want[2]))
        errors[backend] = (
            (got[0] - want[0]).abs().max().item(),
            (got[1] - want[1]).abs().max().item(),
            grad_error,
        )
    return errors


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@RESET
@pytest.mark.triton_kernels
def test_half_precision_sequence_error(dtype, reset_after, record_property):
    """Within the documented bounds of float64, and never worse than twice the
    error of eager PyTorch run in the same precision."""
    errors = half_precision_errors(dtype, reset_after, DEVICE)
    record_property("errors", errors)
    (k_out, k_hn, k_grad), (e_out, e_hn, e_grad) = errors["triton"], errors["torch"]
    bound = HALF_BOUNDS[dtype]
    assert max(k_out, k_hn) <= bound["out"], errors
    assert k_grad <= bound["grad"], errors
    assert k_out <= 2 * e_out and k_hn <= 2 * e_hn and k_grad <= 2 * e_grad, errors


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in units in the last place of ``got``'s dtype at the
    float64 value ``want`` (the spacing of the binade ``want`` lies in)."""
    info = torch.finfo(got.dtype)
    mantissa_bits = {torch.float16: 11, torch.bfloat16: 8}[got.dtype]
    want = want.double()
    _, exponent = torch.frexp(want)  # want = m * 2**exponent, 0.5 <= |m| < 1
    spacing = torch.ldexp(torch.ones_like(want), exponent - mantissa_bits).clamp_min(info.tiny * info.eps)
    spacing = torch.where(want == 0, torch.full_like(want, info.tiny * info.eps), spacing)
    return ((got.double() - want).abs() / spacing).max().item()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.triton_kernels
def test_half_gate_math_rounds_once(dtype):
    """The gate kernels alone: from half inputs, every output is the float64
    result rounded once (within 0.51 units in the last place: float32 math inside),
    and at least as close as the same formulas run op by op in half precision."""
    from convgru_triton.ops.gates import kernels as op
    from convgru_triton.ops.gates import naive

    gen = torch.Generator().manual_seed(5)
    n, hidden, spatial = 2, 3, (6, 7)

    def rand(*shape, fn=None):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return (fn(t) if fn else t).to(device=DEVICE, dtype=dtype)

    gx, gh, h = rand(n, 3 * hidden, *spatial), rand(n, 3 * hidden, *spatial), rand(n, hidden, *spatial, fn=torch.tanh)
    b_ih, b_hh = rand(3 * hidden), rand(3 * hidden)
    d64 = [t.double() for t in (gx, gh, h, b_ih, b_hh)]

    h_new, (gates, aux) = op._reset_after_fwd(gx, gh, h, b_ih, b_hh, save=True)
    want = naive.gru_reset_after_fwd_ref(*d64)
    eager = naive.gru_reset_after_fwd_ref(gx, gh, h, b_ih, b_hh)
    kernel_ulps = [_ulps(h_new, want[0]), _ulps(gates, torch.cat(want[1:4], 1)), _ulps(aux, want[4])]
    eager_ulps = [_ulps(eager[0], want[0]), _ulps(torch.cat(eager[1:4], 1), torch.cat(want[1:4], 1))]
    assert max(kernel_ulps) <= 0.51, kernel_ulps
    assert kernel_ulps[0] <= eager_ulps[0] and kernel_ulps[1] <= eager_ulps[1], (kernel_ulps, eager_ulps)

    grad = rand(n, hidden, *spatial)
    d_gx, d_gh, d_h = op._reset_after_bwd(grad, None, (gates, aux), h, False)
    r, z, cand = (gates[:, i * hidden : (i + 1) * hidden] for i in range(3))
    want_b = naive.gru_reset_after_bwd_ref(*(t.double() for t in (grad, r, z, cand, aux, h)))
    assert max(_ulps(d_gx, want_b[0]), _ulps(d_gh, want_b[1]), _ulps(d_h, want_b[2])) <= 0.51

    gates2, rh = op._reset_gate_fwd(gx, gh[:, : 2 * hidden], h, b_ih, b_hh)
    want_r, want_z, want_rh = naive.gru_reset_gate_fwd_ref(d64[0], d64[1][:, : 2 * hidden], *d64[2:])
    gh_n = rand(n, hidden, *spatial)
    h_new2 = op._update_fwd(gx, gh_n, gates2, h, b_ih, b_hh, save=True)
    want_h, want_n = naive.gru_update_fwd_ref(d64[0], gh_n.double(), gates2[:, hidden : 2 * hidden].double(), *d64[2:])
    assert max(_ulps(gates2[:, :hidden], want_r), _ulps(gates2[:, hidden : 2 * hidden], want_z),
               _ulps(rh, want_rh), _ulps(h_new2, want_h), _ulps(gates2[:, 2 * hidden :], want_n)) <= 0.51


# ----------------------------------------------------------------------------
# Saturation and non-finite values over whole sequences
# ----------------------------------------------------------------------------

INF = float("inf")
# Pre-activations per pixel (columns) over 4 steps; with W_ih = 1, W_hh = 0 and
# no bias every gate sees a = x: z = sigmoid(a), n = tanh(a), h' = h + z (n - h).
# a = +1e4/+inf: z = n = 1, h' = 1.  a = -1e4/-inf: z = 0, h' = h.  a = 0: h' = h / 2.
SATURATING_STEPS = [
    [INF, -INF, 1e4, 0.0, -1e4, INF, -INF, 0.0],
    [-INF, -1e4, 0.0, INF, 1e4, INF, -INF, 0.0],
    [-1e4, -INF, -INF, 0.0, -1e4, INF, -INF, 1e4],
    [1e4, -1e4, 0.0, -1e4, INF, INF, -INF, -INF],
]


def _expected_saturated_states(h0):
    h, states = h0.clone(), []
    for row in SATURATING_STEPS:
        a = torch.tensor(row, dtype=torch.float64)
        h = torch.where(a > 0, torch.ones_like(h), torch.where(a < 0, h, h / 2))
        states.append(h.clone())
    return torch.stack(states)


def _saturation_model(dtype, backend, reset_after):
    model = ConvGRU1d(1, 1, 1, bias=False, reset_after=reset_after, dtype=dtype, backend=backend, device=DEVICE)
    with torch.no_grad():
        model.weight_ih_l0.fill_(1.0)
        model.weight_hh_l0.zero_()
    return model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@RESET
def test_sequence_saturates_exactly(dtype, backend, reset_after):
    """+-1e4 and +-inf pre-activations give the exact saturated states at every
    step, no NaN, on both backends and in every dtype."""
    h0 = torch.tensor([0.5, -0.25, 0.75, 1.0, -1.0, 0.125, -0.5, 0.375], dtype=torch.float64)
    x = torch.tensor(SATURATING_STEPS, dtype=torch.float64).view(4, 1, 1, 8)
    model = _saturation_model(dtype, backend, reset_after)
    out, h_n = model(x.to(DEVICE, dtype), h0.view(1, 1, 1, 8).to(DEVICE, dtype))
    want = _expected_saturated_states(h0)
    assert not torch.isnan(out).any()
    assert torch.equal(out.double().cpu().view(4, 8), want)
    assert torch.equal(h_n.double().cpu().view(8), want[-1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@RESET
def test_saturated_gradients_are_zero_not_nan(backend, reset_after):
    """At +-1e4 the gates' derivatives are exactly 0: gradients stay finite and
    equal the float64 reference (float32 and float16 storage)."""
    x = torch.tensor(SATURATING_STEPS, dtype=torch.float64).clamp(-1e4, 1e4).view(4, 1, 1, 8)
    h0 = torch.linspace(-0.9, 0.9, 8, dtype=torch.float64).view(1, 1, 1, 8)
    results = {}
    for dtype in (torch.float64, torch.float32, torch.float16):
        model = _saturation_model(dtype, backend, reset_after)
        xs = x.to(DEVICE, dtype).requires_grad_(True)
        hs = h0.to(DEVICE, dtype).requires_grad_(True)
        out, h_n = model(xs, hs)
        grads = torch.autograd.grad(out.sum() + h_n.sum(), [xs, hs, model.weight_ih_l0, model.weight_hh_l0])
        results[dtype] = [g.double().cpu() for g in grads]
        for g in grads:
            assert torch.isfinite(g).all(), (dtype, grads)
    # Saturated steps pass no gradient to x.
    saturated = x.abs() == 1e4
    assert (results[torch.float64][0][saturated] == 0).all()
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        for got, want in zip(results[dtype], results[torch.float64]):
            torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@RESET
def test_nan_propagates_through_the_sequence(backend, reset_after):
    """A NaN in the input at step 2, sample 0, pixel 4 makes that pixel's state
    NaN from step 2 on (1x1 kernels: it cannot spread in space), and nothing else:
    earlier steps, other pixels and the other sample stay finite. The same for a
    NaN in the initial state, from step 0 on."""
    torch.manual_seed(0)
    model = ConvGRU1d(2, 3, 1, num_layers=2, reset_after=reset_after, backend=backend, device=DEVICE)
    x = torch.randn(5, 2, 2, 9, device=DEVICE)
    x[2, 0, 1, 4] = float("nan")
    out, h_n = model(x)
    nan = torch.isnan(out)
    want = torch.zeros_like(nan)
    want[2:, 0, :, 4] = True
    assert torch.equal(nan, want)
    assert torch.equal(torch.isnan(h_n), want[-1:].expand(2, -1, -1, -1))

    hx = torch.randn(2, 2, 3, 9, device=DEVICE)
    hx[1, 1, 0, 7] = float("nan")  # layer 1, sample 1, pixel 7
    out, _ = model(x.nan_to_num(0.0), hx)
    want = torch.zeros_like(nan)
    want[:, 1, :, 7] = True
    assert torch.equal(torch.isnan(out), want)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_stays_within_the_receptive_field(backend):
    """With 3-wide kernels a NaN in the input at step 2 never reaches earlier
    steps or another sample; in space it spreads at most as far as the
    convolutions reach (two hidden convolutions per step with reset_after=False).
    The spatial part is checked on CPU only: a GPU may pick an FFT convolution,
    which spreads a NaN over the whole image."""
    torch.manual_seed(1)
    model = ConvGRU1d(2, 3, 3, backend=backend, device=DEVICE)
    x = torch.randn(5, 2, 2, 13, device=DEVICE)
    x[2, 0, 0, 6] = float("nan")
    out, _ = model(x)
    nan = torch.isnan(out).cpu()
    assert not nan[:2].any() and not nan[:, 1].any()
    pixels = torch.arange(13)
    for t in range(2, 5):
        assert nan[t, 0, :, 6].all()
        if not ON_GPU:  # step 2: input conv (1) + conv of r * h (1); each later step 2 more
            reach = (pixels - 6).abs() <= 2 + 2 * (t - 2)
            assert not nan[t, 0][:, ~reach].any()


# ----------------------------------------------------------------------------
# float64 gradcheck through the kernels, and double backward
# ----------------------------------------------------------------------------


def _functional_case(reset_after, bidirectional, num_layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dirs = 2 if bidirectional else 1
    hidden, c_in = 2, 2

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(DEVICE).requires_grad_(True)

    params = []
    for layer in range(num_layers):
        for _ in range(dirs):
            c = c_in if layer == 0 else hidden * dirs
            params.append((rand(3 * hidden, c, 3, scale=0.5), rand(3 * hidden, hidden, 3, scale=0.5),
                           rand(3 * hidden), rand(3 * hidden)))
    x, hx = rand(2, 1, c_in, 4), rand(num_layers * dirs, 1, hidden, 4, scale=0.5)
    flat = [x, hx] + [t for p in params for t in p]

    def fn(*tensors):
        x, hx, rest = tensors[0], tensors[1], tensors[2:]
        ps = [tuple(rest[4 * i : 4 * i + 4]) for i in range(len(rest) // 4)]
        out, h_n = conv_gru(x, hx, ps, num_layers=num_layers, bidirectional=bidirectional,
                            reset_after=reset_after, padding_mode="reflect", backend="triton")
        return out, h_n

    return fn, flat


@pytest.mark.parametrize(
    "reset_after, bidirectional, num_layers",
    [(False, True, 1), (True, False, 2)],
    ids=["reset_before-bidirectional", "reset_after-2layers"],
)
@pytest.mark.triton_kernels
def test_gradcheck_whole_sequence_through_kernels(reset_after, bidirectional, num_layers):
    """float64 gradcheck of the functional sequence (input, state and every
    weight and bias) with the Triton gate kernels, reflect padding."""
    fn, inputs = _functional_case(reset_after, bidirectional, num_layers)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


# The registered operator (torch.compile) raises its own message; eager mode runs
# the implementation as a once-differentiable autograd.Function.
DOUBLE_BACKWARD = r"double backward .* is not supported"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradgradcheck_raises_clear_error(backend):
    """Double backward is not supported on either backend: gradgradcheck gets a
    RuntimeError that says so (not a wrong second derivative)."""
    model = ConvGRU1d(2, 2, 3, dtype=torch.float64, backend=backend, device=DEVICE)
    x = torch.randn(2, 1, 2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.gradgradcheck(lambda t: model(t)[0], (x,), fast_mode=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_penalty_raises_not_silently_wrong(backend):
    """A gradient penalty, |d out / d x|^2 differentiated again, needs the
    second derivative of the gate math: it must raise, not silently leave out
    the ConvGRU's part (x.grad None, weight_hh.grad None)."""
    model = ConvGRU1d(2, 2, 3, dtype=torch.float64, backend=backend, device=DEVICE)
    x = torch.randn(2, 1, 2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out, _ = model(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        g.pow(2).sum().backward()


# ----------------------------------------------------------------------------
# Offsets past 2**31: the kernels in a child process
# ----------------------------------------------------------------------------

KERNELS = ("reset_after_fwd", "reset_after_bwd", "reset_gate_fwd", "update_fwd", "update_bwd", "reset_gate_bwd")


class _Arena:
    """Tensors (N, C, *S) for one offset case.

    CPU: every tensor is a strided view into one large, lazily committed
    allocation (only the pages touched become memory): the strides put the
    elements the kernels touch up to 2**32 elements from the base pointer while
    the tensors themselves hold a few elements, so the interpreter runs a handful
    of programs. ``case='batch'``: 3 samples, 2**31 + 4096 elements apart (a
    sample stride a (T, N, 3H, *S) gate buffer of a batch_first input can have):
    the offset ``sample * stride`` needs 64 bits. ``case='plane'``: one sample
    as large as the kernels allow, 3 x hidden x spatial just below 2**31: its
    channel stride ``cs`` makes the gate offsets (up to ``5 * cs``) approach 2**31.

    CUDA: real contiguous tensors: 17 samples of 8 x 4096 x 4096 (2.3e9
    elements per state tensor) and one sample of 64 x 2730 x 4096 (3 x 64 x
    2730 x 4096 = 2.147e9 < 2**31 gate elements).
    """

    SLOTS = 16

    def __init__(self, case, device, dtype):
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type == "cuda":
            self.hidden = 8 if case == "batch" else 64
            self.batch = 17 if case == "batch" else 1
            self.spatial = (4096, 4096) if case == "batch" else (2730, 4096)
            self.select = [(slice(0, 1), slice(None), slice(0, 1), slice(0, 64)),
                           (slice(-1, None), slice(None), slice(-1, None), slice(-64, None))]
            return
        self.hidden, self.spatial, self.select = 2, (5,), [(slice(None),)]
        inner = self.spatial[0]
        if case == "batch":
            self.batch, self.channel_stride = 3, self.SLOTS * inner
            self.sample_stride = 2**31 + 4096
        else:
            self.batch, self.channel_stride = 1, (2**31 - 256) // (3 * self.hidden)
            self.sample_stride = 3 * self.hidden * self.channel_stride
        size = (self.batch - 1) * self.sample_stride + 3 * self.hidden * self.channel_stride + self.SLOTS * inner
        self.storage = torch.empty(size, dtype=dtype)  # virtual; only touched pages are committed
        self.used = 0

    def bytes_needed(self, channel_units: int) -> int:
        numel = self.batch * channel_units * self.hidden
        for s in self.spatial:
            numel *= s
        return numel * torch.finfo(self.dtype).bits // 8

    def new(self, channels: int, fill: bool = True) -> torch.Tensor:
        if self.device.type == "cuda":
            t = torch.empty((self.batch, channels) + self.spatial, device=self.device, dtype=self.dtype)
            return t.normal_() if fill else t
        offset, self.used = self.used * self.spatial[0], self.used + 1
        assert self.used <= self.SLOTS
        t = self.storage.as_strided((self.batch, channels) + self.spatial,
                                    (self.sample_stride, self.channel_stride, 1), offset)
        if fill:
            t.copy_(torch.randn(t.shape, dtype=torch.float64))
        return t


# Per kernel: how many hidden-sized tensors it needs (memory estimate on CUDA).
_UNITS = dict(reset_after_fwd=12, reset_after_bwd=13, reset_gate_fwd=10, update_fwd=9, update_bwd=10, reset_gate_bwd=9)


def _check_kernel(kernel: str, arena: _Arena) -> float:
    """Run ``kernel``'s launcher on the arena's tensors; return the largest
    error against its reference, relative to 1 + |reference|."""
    from convgru_triton.ops.gates import kernels as op
    from convgru_triton.ops.gates import naive

    H, new, dtype, dev = arena.hidden, arena.new, arena.dtype, arena.device
    b_ih = torch.randn(3 * H, dtype=torch.float64).to(dev, dtype)
    b_hh = torch.randn(3 * H, dtype=torch.float64).to(dev, dtype)
    errors = []

    def gates_tensor():
        g = new(3 * H)  # r, z in (0, 1), n in (-1, 1), as the forward saves them
        g[:, : 2 * H].sigmoid_()
        g[:, 2 * H :].tanh_()
        return g

    def check(pairs):
        for sel in arena.select:
            for got, ref_fn in pairs:
                want = ref_fn(sel)
                errors.append(((got[sel].double() - want).abs() / (1 + want.abs())).max().item())

    def d(t, sel):
        return t[sel].double()

    def slot(t, i, sel):
        return t[sel][:, i * H : (i + 1) * H].double()

    bi, bh = b_ih.double(), b_hh.double()
    if kernel == "reset_after_fwd":
        gx, gh, h = new(3 * H), new(3 * H), new(H)
        h_new, gates, aux = new(H, False), new(3 * H, False), new(H, False)
        op._reset_after_fwd(gx, gh, h, b_ih, b_hh, True, h_new=h_new, gates=gates, aux=aux)

        def ref(sel):
            return naive.gru_reset_after_fwd_ref(d(gx, sel), d(gh, sel), d(h, sel), bi, bh)

        check([(h_new, lambda s: ref(s)[0]), (gates, lambda s: torch.cat(ref(s)[1:4], 1)), (aux, lambda s: ref(s)[4])])
    elif kernel == "reset_after_bwd":
        grad, gates, aux, h = new(H), gates_tensor(), new(H), new(H)
        d_gx, d_gh, d_h = new(3 * H, False), new(3 * H, False), new(H, False)
        op._reset_after_bwd(grad, None, (gates, aux), h, False, d_gx=d_gx, d_gh=d_gh, d_h=d_h)

        def ref(sel):
            return naive.gru_reset_after_bwd_ref(d(grad, sel), slot(gates, 0, sel), slot(gates, 1, sel),
                                                 slot(gates, 2, sel), d(aux, sel), d(h, sel))

        check([(d_gx, lambda s: ref(s)[0]), (d_gh, lambda s: ref(s)[1]), (d_h, lambda s: ref(s)[2])])
    elif kernel == "reset_gate_fwd":
        gx, gh_rz, h = new(3 * H), new(2 * H), new(H)
        gates, rh = new(3 * H, False), new(H, False)
        op._reset_gate_fwd(gx, gh_rz, h, b_ih, b_hh, gates=gates, rh=rh)

        def ref(sel):
            return naive.gru_reset_gate_fwd_ref(d(gx, sel), d(gh_rz, sel), d(h, sel), bi, bh)

        check([(gates[:, : 2 * H], lambda s: torch.cat(ref(s)[:2], 1)), (rh, lambda s: ref(s)[2])])
    elif kernel == "update_fwd":
        gx, gh_n, gates, h = new(3 * H), new(H), gates_tensor(), new(H)
        h_new = new(H, False)
        z = {i: d(gates, sel)[:, H : 2 * H].clone() for i, sel in enumerate(arena.select)}
        op._update_fwd(gx, gh_n, gates, h, b_ih, b_hh, True, h_new=h_new)

        def ref(sel):
            i = arena.select.index(sel)
            return naive.gru_update_fwd_ref(d(gx, sel), d(gh_n, sel), z[i], d(h, sel), bi, bh)

        check([(h_new, lambda s: ref(s)[0]), (gates[:, 2 * H :], lambda s: ref(s)[1])])
    elif kernel == "update_bwd":
        grad, grad2, gates, h = new(H), new(H), gates_tensor(), new(H)
        d_gates, d_h = new(3 * H, False), new(H, False)
        op._update_bwd(grad, grad2, gates, h, d_gates, d_h=d_h)

        def ref(sel):
            return naive.gru_update_bwd_ref(d(grad, sel) + d(grad2, sel), slot(gates, 1, sel),
                                            slot(gates, 2, sel), d(h, sel))

        check([(d_gates[:, H : 2 * H], lambda s: ref(s)[0]), (d_gates[:, 2 * H :], lambda s: ref(s)[1]),
               (d_h, lambda s: ref(s)[2])])
    elif kernel == "reset_gate_bwd":
        d_rh, gates, h, d_h = new(H), gates_tensor(), new(H), new(H)
        d_gates = new(3 * H, False)
        before = {i: d(d_h, sel).clone() for i, sel in enumerate(arena.select)}
        op._reset_gate_bwd(d_rh, gates, h, d_gates, d_h)

        def ref(sel):
            return naive.gru_reset_gate_bwd_ref(d(d_rh, sel), slot(gates, 0, sel), d(h, sel))

        check([(d_gates[:, :H], lambda s: ref(s)[0]),
               (d_h, lambda s: before[arena.select.index(s)] + ref(s)[1])])
    else:
        raise ValueError(kernel)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return max(errors)


def _offsets_main(device: str, case: str) -> dict:
    """Each kernel in a forked child (a wrong offset may kill it); returns
    kernel -> "ok", "wrong result: ...", "crashed: ..." or "skipped: ..."."""
    torch.set_num_threads(1)
    results = {}
    for kernel in KERNELS:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            try:
                arena = _Arena(case, device, torch.float16)
                need = arena.bytes_needed(_UNITS[kernel])
                if arena.device.type == "cuda" and need > 0.9 * torch.cuda.mem_get_info()[0]:
                    msg = f"skipped: needs {need / 2**30:.0f} GiB of GPU memory"
                else:
                    err = _check_kernel(kernel, arena)
                    msg = "ok" if err <= 2e-3 else f"wrong result: max relative error {err:.3g}"
            except Exception as exc:  # a CUDA error on an illegal address, for example
                msg = f"crashed: {type(exc).__name__}: {exc}"[:500]
            os.write(write_fd, msg.encode())
            os._exit(0)
        os.close(write_fd)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read_fd, "rb") as pipe:
            msg = pipe.read().decode()
        if os.WIFSIGNALED(status):
            msg = f"crashed: killed by signal {os.WTERMSIG(status)}"
        results[kernel] = msg or "crashed: no result"
    return results


@pytest.fixture(scope="module")
def offset_results():
    """kernel results per case, from one child process per case (run lazily)."""
    cache = {}

    def get(case):
        if case not in cache:
            env = dict(os.environ)
            env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
            if not ON_GPU:
                env["TRITON_INTERPRET"] = "1"
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "offsets", "--device", DEVICE.type, "--case", case],
                env=env, capture_output=True, text=True, timeout=540,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        return cache[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_offsets_past_2_31_elements_across_the_batch(kernel, offset_results):
    """Samples whose elements lie past 2**31 (and 2**32) from the start of the
    tensor: the (sample * sample stride) offsets are 64-bit. On CPU, strided
    views over a lazily committed 8 GiB allocation (interpreter); on a GPU, real
    tensors of 17 x 8 x 4096 x 4096 half elements (2.3e9 per state tensor)."""
    result = offset_results("batch")[kernel]
    if result.startswith("skipped"):
        pytest.skip(result)
    assert result == "ok", f"{kernel}: {result}"


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_offsets_in_the_largest_allowed_sample(kernel, offset_results):
    """One sample as large as the kernels accept (3 x hidden x spatial < 2**31,
    32-bit offsets within a sample): the gate offsets near 2**31 are right. On
    CPU, strided views with hidden = 2 and channel stride (2**31 - 256) // 6
    (interpreter); on a GPU, a real state of 1 x 64 x 2730 x 4096 half elements."""
    result = offset_results("plane")[kernel]
    if result.startswith("skipped"):
        pytest.skip(result)
    assert result == "ok", f"{kernel}: {result}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    offsets = sub.add_parser("offsets", help="run every kernel on tensors with offsets past 2**31")
    offsets.add_argument("--device", choices=["cpu", "cuda"], required=True)
    offsets.add_argument("--case", choices=["batch", "plane"], required=True)
    args = parser.parse_args()
    print(json.dumps(_offsets_main(args.device, args.case)))


_GX_STRIDE_SCRIPT = r"""
import json, torch
from convgru_triton.ops.gates import kernels as op
from convgru_triton.ops.gates import naive

# float16, 8 x 8 maps: rows start on 16-byte boundaries, so ALIGN = 8 and the
# launcher passes the gx sample stride divided by 8; that quotient fits in 32
# bits while stride = quotient * 8 does not.
H, S = 8, (8, 8)
plane = 3 * H * 64
stride = 2**31 + plane
storage = torch.empty(stride + plane, dtype=torch.float16)  # virtual: only touched pages are committed
gx = storage.as_strided((2, 3 * H) + S, (stride, 64, 8, 1))
gen = torch.Generator().manual_seed(0)
for n in range(2):
    gx[n] = torch.randn((3 * H,) + S, generator=gen)
dense = gx.clone()

def rand(c):
    return torch.randn((2, c) + S, generator=gen).half()

gh, gh_rz, gh_n, h = rand(3 * H), rand(2 * H), rand(H), rand(H)
b_ih, b_hh = torch.randn(3 * H, generator=gen).half(), torch.randn(3 * H, generator=gen).half()
errors = {}
got, _ = op._reset_after_fwd(gx, gh, h, b_ih, b_hh, False)
want, _ = op._reset_after_fwd(dense, gh, h, b_ih, b_hh, False)
errors["reset_after_fwd"] = (got.float() - want.float()).abs().max().item()
g1, rh1 = op._reset_gate_fwd(gx, gh_rz, h, b_ih, b_hh)
g2, rh2 = op._reset_gate_fwd(dense, gh_rz, h, b_ih, b_hh)
errors["reset_gate_fwd"] = max((g1[:, :2 * H].float() - g2[:, :2 * H].float()).abs().max().item(),
                               (rh1.float() - rh2.float()).abs().max().item())
errors["update_fwd"] = (op._update_fwd(gx, gh_n, g2, h, b_ih, b_hh, False).float()
                        - op._update_fwd(dense, gh_n, g2, h, b_ih, b_hh, False).float()).abs().max().item()
print(json.dumps(errors))
"""


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="a CPU check through the interpreter; the GPU covers real batch_first buffers above")
def test_gx_sample_stride_past_2_31_with_wide_alignment():
    """A batch_first input's pre-activations are read from batch-major storage:
    sample stride T x 3H x S, which may pass 2**31 while each sample is small.
    With ALIGN > 1 the stride reaches the kernel as stride / ALIGN (32-bit) and
    must be widened before it is multiplied back (a 32-bit product wrapped and
    read far outside the tensor: a crash under the interpreter, garbage on a GPU).
    Every kernel that reads gx must match the same launch on a dense copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _GX_STRIDE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors == {"reset_after_fwd": 0.0, "reset_gate_fwd": 0.0, "update_fwd": 0.0}, errors
