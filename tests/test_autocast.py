"""Mixed precision as users train with it: ``torch.autocast`` around every
public module and functional form, with input and hx in any mix of float32 and
the autocast dtype.

The rule under test (docs/what-runs-where.md, "Autocast"): the convolutions
follow autocast's own rule, and the gate operator's rule is registered at the
Autocast dispatch keys (ops/sequence/op.py, ``autocast_cast``): floating tensors
other than float64 are cast to the autocast dtype, the step computes in it and
returns it, as ``torch.nn.GRUCell`` does. Parameter gradients come back in
float32, input gradients in each input's own dtype. Outside autocast a dtype
mismatch is a ``ValueError``.

Runs on CUDA (float16 and bfloat16) where there is a GPU, on CPU otherwise
(bfloat16 for the eager backend; float16 for the Triton kernels, whose
interpreter has no bfloat16). Each case is compared with the same module run
in float32 on float32 copies of the inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from convgru_triton import (
    ConvGRU1d,
    ConvGRU2d,
    ConvGRU3d,
    ConvGRUCell1d,
    ConvGRUCell2d,
    ConvGRUCell3d,
    SepConvGRUCell2d,
    conv_gru,
    conv_gru_cell,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LOW = {"float16": F16, "bfloat16": BF16}
# Agreement with float32, relative to the largest magnitude of the compared
# tensor: a few units of the dtype's rounding (2**-8 bf16, 2**-11 fp16) over
# the handful of roundings a step makes.
REL_TOL = {F16: 1e-2, BF16: 4e-2}


# The eager backend in bfloat16 (CPU autocast's dtype; on CUDA the forced
# fallback), the Triton kernels (CUDA's default backend) in float16 and
# bfloat16. The eager backend in float16 would add a quarter to this file's
# time for no rule of its own: the autocast rule is the operator's, the same
# for both backends, and test_grad_scaler_float16 runs float16 on it.
@pytest.fixture(params=[("torch", "bfloat16"), ("triton", "float16"), ("triton", "bfloat16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def mode(request, device):
    """(backend, autocast dtype) for this device."""
    backend, name = request.param
    if device.type == "cpu" and backend == "triton" and name == "bfloat16":
        pytest.skip("the Triton interpreter (CPU) has no bfloat16; CUDA runs this case")
    return backend, LOW[name]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = want.abs().max().item() + 1e-3
    err = (got.float() - want.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} against scale {scale:.3g} in {dtype}"


def _cast(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def _check(module: nn.Module, run, inputs, device, dtype):
    """``run(module, *inputs)`` under autocast against float32, outputs and
    every gradient. ``inputs``: tensors (or None) in the dtypes under test."""
    inputs = [None if t is None else t.requires_grad_() for t in inputs]
    ref_inputs = [_cast(t, F32) for t in inputs]
    ref_out = run(module, *ref_inputs)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    cotangents = [torch.randn_like(o, dtype=F32) for o in ref_out]
    wrt = [t for t in ref_inputs if t is not None] + list(module.parameters())
    ref_grads = torch.autograd.grad(ref_out, wrt, cotangents)

    with torch.autocast(device.type, dtype=dtype):
        out = run(module, *inputs)
    out = out if isinstance(out, tuple) else (out,)
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert o.dtype == dtype, f"output {i} is {o.dtype}, expected the autocast dtype {dtype}"
        assert o.shape == r.shape
        _close(o, r, dtype, f"output {i}")
    given = [t for t in inputs if t is not None]
    grads = torch.autograd.grad([o.float() for o in out], given + list(module.parameters()),
                                cotangents)
    for t, g in zip(given, grads):
        assert g.dtype == t.dtype, f"an input of {t.dtype} got its gradient in {g.dtype}"
    for (name, p), g in zip(module.named_parameters(), grads[len(given):]):
        assert g.dtype == F32, f"{name}.grad is {g.dtype}"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(g).all(), f"gradient {i} not finite"
        _close(g, r, dtype, f"gradient {i}")


MIXES = [("f32", "f32"), ("f32", "low"), ("low", "f32"), ("low", "low"), ("f32", None), ("low", None)]


def _dt(tag, low):
    return F32 if tag == "f32" else low


CELLS = {
    "1d": (lambda b, d: ConvGRUCell1d(3, 4, 3, backend=b, device=d), (7,)),
    "2d": (lambda b, d: ConvGRUCell2d(3, 4, 3, backend=b, device=d), (5, 6)),
    "2d-reset_after": (lambda b, d: ConvGRUCell2d(3, 4, 3, reset_after=True, backend=b, device=d), (5, 6)),
    "3d": (lambda b, d: ConvGRUCell3d(3, 4, (3, 1, 3), backend=b, device=d), (3, 4, 5)),
    "sep": (lambda b, d: SepConvGRUCell2d(3, 4, 5, backend=b, device=d), (5, 6)),
}


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: f"input_{m[0]}-hx_{m[1]}")
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_mixed_dtypes(kind, mix, mode, device):
    backend, low = mode
    torch.manual_seed(0)
    make, spatial = CELLS[kind]
    cell = make(backend, device)
    x = torch.randn(2, 3, *spatial, device=device, dtype=_dt(mix[0], low))
    hx = None if mix[1] is None else torch.tanh(torch.randn(2, 4, *spatial, device=device)).to(_dt(mix[1], low))
    _check(cell, lambda m, x, h: m(x, h), [x, hx], device, low)


def test_unbatched_cell(mode, device):
    backend, low = mode
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device)
    x = torch.randn(3, 5, 6, device=device)
    hx = torch.randn(4, 5, 6, device=device, dtype=low)
    _check(cell, lambda m, x, h: m(x, h), [x, hx], device, low)


SEQUENCES = {
    "2d-2layers-bidirectional-batch_first": (
        lambda b, d: ConvGRU2d(3, 4, 3, num_layers=2, bidirectional=True, batch_first=True, backend=b, device=d),
        (2, 3, 3, 5, 6), (4, 2, 4, 5, 6)),
    "2d-reset_after": (lambda b, d: ConvGRU2d(3, 4, 3, reset_after=True, backend=b, device=d),
                       (3, 2, 3, 5, 6), (1, 2, 4, 5, 6)),
    "2d-unbatched": (lambda b, d: ConvGRU2d(3, 4, 3, num_layers=2, backend=b, device=d), (3, 3, 5, 6), (2, 4, 5, 6)),
    "1d": (lambda b, d: ConvGRU1d(3, 4, 3, backend=b, device=d), (3, 2, 3, 7), (1, 2, 4, 7)),
    "3d": (lambda b, d: ConvGRU3d(3, 4, (1, 3, 3), backend=b, device=d), (2, 2, 3, 3, 4, 5), (1, 2, 4, 3, 4, 5)),
}


@pytest.mark.parametrize("mix", MIXES[:4] + [("low", None)], ids=lambda m: f"input_{m[0]}-hx_{m[1]}")
@pytest.mark.parametrize("kind", list(SEQUENCES))
def test_sequence_mixed_dtypes(kind, mix, mode, device):
    backend, low = mode
    torch.manual_seed(0)
    make, x_shape, h_shape = SEQUENCES[kind]
    model = make(backend, device)
    x = torch.randn(x_shape, device=device, dtype=_dt(mix[0], low))
    hx = None if mix[1] is None else torch.randn(h_shape, device=device).to(_dt(mix[1], low))
    _check(model, lambda m, x, h: m(x, h), [x, hx], device, low)


def test_functional_forms(mode, device):
    backend, low = mode
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device)
    w = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    x = torch.randn(2, 3, 5, 6, device=device, dtype=low)
    hx = torch.randn(2, 4, 5, 6, device=device)
    _check(cell, lambda m, x, h: conv_gru_cell(x, h, *w, backend=backend), [x, hx], device, low)
    xs = torch.randn(3, 2, 3, 5, 6, device=device)
    h0 = torch.randn(1, 2, 4, 5, 6, device=device, dtype=low)
    _check(cell, lambda m, x, h: conv_gru(x, h, [w], backend=backend), [xs, h0], device, low)


def test_loop_feeds_the_state_back_raft_style(mode, device):
    """RAFT's update block under --mixed_precision: float32 context features
    concatenated with autocast-dtype motion features before the cell, the
    returned state fed back for several iterations, then trained."""
    backend, low = mode
    torch.manual_seed(0)
    gru = SepConvGRUCell2d(6, 4, 5, backend=backend, device=device)
    encoder = nn.Conv2d(3, 3, 3, padding=1, device=device)
    context = torch.randn(2, 3, 5, 6, device=device)  # float32, as RAFT's inp after a float() or outside autocast
    image = torch.randn(2, 3, 5, 6, device=device)

    def unroll(ctx, img, autocast):
        with torch.autocast(device.type, dtype=low, enabled=autocast):
            h = torch.tanh(torch.randn(2, 4, 5, 6, device=device, generator=torch.Generator(device).manual_seed(1)))
            states = []
            for _ in range(4):
                motion = encoder(img)  # the autocast dtype under autocast
                x = torch.cat([ctx, motion], dim=1)  # cat promotes the mix to float32
                h = gru(x, h)
                states.append(h)
            return torch.stack(states)

    want = unroll(context, image, False)
    got = unroll(context, image, True)
    assert got.dtype == low
    _close(got, want, low, "states")
    got.float().square().mean().backward()
    for name, p in list(gru.named_parameters()) + list(encoder.named_parameters()):
        assert p.grad is not None and p.grad.dtype == F32 and torch.isfinite(p.grad).all(), name


def test_stacked_layers_fed_their_own_outputs(mode, device):
    backend, low = mode
    torch.manual_seed(0)
    first = ConvGRU2d(3, 4, 3, backend=backend, device=device)
    second = ConvGRU2d(4, 4, 3, backend=backend, device=device)
    x = torch.randn(3, 2, 3, 5, 6, device=device)
    with torch.autocast(device.type, dtype=low):
        out, h_n = first(x)
        out2, h_n2 = second(out, h_n)  # low-precision input and hx
        out3, _ = second(out2.float(), h_n2)  # float32 input, low-precision hx
    assert out.dtype == out2.dtype == out3.dtype == low
    out3.float().sum().backward()
    assert all(p.grad.dtype == F32 and torch.isfinite(p.grad).all() for p in first.parameters())


def test_checkpoint_under_autocast(mode, device):
    """torch.utils.checkpoint recomputes the forward under the autocast state of
    the original call; gradients equal those without checkpointing."""
    backend, low = mode
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device)
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    hx = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)

    def run(checkpointed):
        with torch.autocast(device.type, dtype=low):
            h = hx
            for _ in range(3):
                if checkpointed:
                    h = torch.utils.checkpoint.checkpoint(cell, x, h, use_reentrant=False)
                else:
                    h = cell(x, h)
        return torch.autograd.grad(h.float().sum(), [x, hx, *cell.parameters()])

    for got, want in zip(run(True), run(False)):
        assert got.dtype == want.dtype
        assert_close(got, want)


def test_grad_scaler_float16(device):
    """A float16 training loop with GradScaler: the scaled loss backpropagates
    through the cell, unscale_ finds finite float32 gradients, the step updates
    the weights."""
    torch.manual_seed(0)
    backend = "triton" if device.type == "cuda" else "torch"
    model = SepConvGRUCell2d(3, 4, 5, backend=backend, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    x = torch.randn(2, 3, 5, 6, device=device)
    target = torch.randn(2, 4, 5, 6, device=device)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast(device.type, dtype=F16):
            h = None
            for _ in range(3):
                h = model(x, h)
            loss = (h.float() - target).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() and p.grad.dtype == F32 for p in model.parameters())
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() >= 2.0 ** 10, "an overflow was found: the step was skipped"
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_compiled_under_autocast(mode, device):
    """torch.compile(fullgraph=True) of a cell loop and of a sequence under
    autocast: no graph break, the eager result, the autocast dtype."""
    backend, low = mode
    torch.manual_seed(0)
    cell = SepConvGRUCell2d(3, 4, 5, backend=backend, device=device)
    seq = ConvGRU2d(3, 4, 3, num_layers=2, backend=backend, device=device)
    x = torch.randn(2, 3, 5, 6, device=device)
    xs = torch.randn(3, 2, 3, 5, 6, device=device)

    def loop(x, h):
        with torch.autocast(device.type, dtype=low):
            for _ in range(3):
                h = cell(x, h)
            return h, seq(xs)[0]

    h0 = torch.randn(2, 4, 5, 6, device=device)
    want = loop(x, h0)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loop)(x, h0)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True)(x, h0)
    for g, w in zip(got, want):
        assert g.dtype == low
        _close(g, w, low, "compiled vs eager")


def test_dtype_mismatch_outside_autocast_is_an_error(device):
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    x = torch.randn(2, 3, 5, 6, device=device)
    with pytest.raises(ValueError, match=r"hx must have the same dtype as input \(torch.float32\), got torch.float16"):
        cell(x, torch.zeros(2, 4, 5, 6, device=device, dtype=F16))
    with pytest.raises(ValueError, match=r"input must have the same dtype as weight_ih \(torch.float32\), got "
                                         r"torch.bfloat16"):
        cell(x.to(BF16))
    seq = ConvGRU2d(3, 4, 3, device=device)
    with pytest.raises(ValueError, match="hx must have the same dtype as input"):
        seq(x.unsqueeze(0), torch.zeros(1, 2, 4, 5, 6, device=device, dtype=F16))


def test_float64_is_not_cast_under_autocast(device):
    """Autocast leaves float64 alone (its own rule): a float64 input against
    float32 weights stays a clear error under autocast too."""
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    with torch.autocast(device.type, dtype=BF16):
        with pytest.raises(ValueError, match="after autocast's cast to torch.bfloat16"):
            cell(torch.randn(2, 3, 5, 6, device=device, dtype=torch.float64))


def test_plan_cache_keys_on_autocast(device):
    """A call checked under autocast (mixed dtypes allowed) must not let the
    same mix through afterwards without autocast: the cached plan of the
    checks is keyed on the autocast state."""
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    x = torch.randn(2, 3, 5, 6, device=device)
    h = torch.zeros(2, 4, 5, 6, device=device, dtype=BF16)
    with torch.autocast(device.type, dtype=BF16):
        assert cell(x, h).dtype == BF16
    with pytest.raises(ValueError, match="hx must have the same dtype as input"):
        cell(x, h)


def test_operator_autocast_rule_is_registered(device):
    """The rule lives in the dispatcher: calling the registered operator itself
    under autocast casts its floating inputs, and its backward runs in the
    forward's dtypes even when called inside an autocast region."""
    from convgru_triton.ops.sequence import op as conv_gru

    torch.manual_seed(0)
    gx = torch.randn(2, 1, 6, 4, 5, device=device, requires_grad=True)
    h0 = torch.randn(1, 2, 4, 5, device=device, dtype=BF16, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=BF16):
        states, _, _ = torch.ops.convgru_triton.conv_gru_fwd(
            gx, h0, w, None, None, [3, 3], [1, 1], "zeros", False, False, False, True)
        assert states.dtype == BF16
        states.float().sum().backward()  # backward inside the region
    assert gx.grad.dtype == F32 and h0.grad.dtype == BF16 and w.grad.dtype == F32
    assert conv_gru.autocast_cast(torch.zeros(1, dtype=torch.float64, device=device), device.type, BF16).dtype \
        == torch.float64


def test_converted_raft_gru_runs_raft_mixed_precision_loop(mode, device):
    """RAFT's own SepConvGRU (bench.baselines, RAFT's code) and the package's
    conversion of it, stepped as RAFT's update block steps its GRU under
    --mixed_precision (autocast, a float32 first state, the returned state fed
    back): the same states to the dtype's accuracy, and the conversion trains."""
    from bench.baselines import RaftSepConvGRU
    from convgru_triton.convert import from_raft_sepconvgru

    backend, low = mode
    torch.manual_seed(0)
    raft = RaftSepConvGRU(hidden_dim=4, input_dim=6, device=device)
    ours = from_raft_sepconvgru(raft, backend=backend, device=device)
    h0 = torch.tanh(torch.randn(2, 4, 5, 6, device=device))
    x = torch.randn(2, 6, 5, 6, device=device)

    def unroll(step):
        with torch.autocast(device.type, dtype=low):
            h, states = h0, []
            for _ in range(4):
                h = step(h)
                states.append(h.float())
        return torch.stack(states)

    want = unroll(lambda h: raft(h, x))
    got = unroll(lambda h: ours(x, h))
    _close(got, want, low, "states against RAFT's SepConvGRU")
    got.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == F32 and torch.isfinite(p.grad).all()
               for p in ours.parameters())


def test_torch_func_under_autocast(mode, device):
    """torch.func.grad and vmap of a cell under autocast: the Function that
    carries the operator through the transforms saves its inputs as the
    operator's autocast rule casts them, so its backward sees one dtype."""
    backend, low = mode
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device)
    x = torch.randn(2, 3, 5, 6, device=device)
    h = torch.randn(2, 4, 5, 6, device=device)
    with torch.autocast(device.type, dtype=low):
        got = torch.func.grad(lambda x: cell(x, h).float().sum())(x)
        batched = torch.func.vmap(lambda x: cell(x, h))(x.unsqueeze(0).expand(3, -1, -1, -1, -1))
    x_ref = x.clone().requires_grad_()
    with torch.autocast(device.type, dtype=low):
        out = cell(x_ref, h)
    want, = torch.autograd.grad(out.float().sum(), x_ref)
    assert got.dtype == F32
    _close(got, want, low, "torch.func.grad")
    assert batched.dtype == low
    _close(batched[1], out.detach(), low, "vmap")
