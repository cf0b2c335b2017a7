"""The sequence operator as a torch.library operator: opcheck, torch.compile
with fullgraph and no graph breaks, autocast, and sequence vs per-step."""

import pytest
import torch

from convgru_triton import ConvGRU, ConvGRUCell
from convgru_triton.ops.sequence import op as conv_gru

BACKENDS = ["torch", "triton"]


def _fwd_args(device, reset_after, reverse, use_triton, bias=True, steps=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    hidden, batch, spatial = 2, 2, (4, 3)
    return (
        rand(steps, batch, 3 * hidden, *spatial).requires_grad_(),
        rand(batch, hidden, *spatial).requires_grad_(),
        rand(3 * hidden, hidden, 3, 3, scale=0.3).requires_grad_(),
        rand(3 * hidden).requires_grad_() if bias else None,
        rand(3 * hidden).requires_grad_() if bias else None,
        [3, 3], [1, 1], "zeros", reset_after, reverse, use_triton, True,
    )


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("reset_after,reverse,bias", [(False, False, True), (True, True, True), (False, True, False)])
def test_opcheck(device, reset_after, reverse, bias, use_triton):
    """Schema, fake tensors, autograd registration and AOT dispatch (static and dynamic)."""
    args = _fwd_args(device, reset_after, reverse, use_triton, bias)
    torch.library.opcheck(torch.ops.convgru_triton.conv_gru_fwd.default, args)
    states, gates, aux = conv_gru.conv_gru_fwd(*args)
    grad = torch.randn_like(states)
    bwd_args = (grad, args[1].detach(), args[2].detach(), states.detach(), gates, aux, *args[5:11], bias)
    torch.library.opcheck(torch.ops.convgru_triton.conv_gru_bwd.default, bwd_args)


def _graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_sequence(device, backend):
    """A 2-layer bidirectional ConvGRU compiles with fullgraph=True, no graph
    breaks, and trains to the same gradients as eager."""
    torch.manual_seed(0)
    model = ConvGRU(3, 4, 3, num_layers=2, bidirectional=True, reset_after=backend == "triton",
                    backend=backend, device=device)
    x = torch.randn(4, 2, 3, 6, 5, device=device, requires_grad=True)
    assert _graph_breaks(model, x) == 0

    out, h_n = model(x)
    (out.square().mean() + h_n.mean()).backward()
    eager_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    c_out, c_h_n = compiled(x)
    (c_out.square().mean() + c_h_n.mean()).backward()
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_h_n, h_n)
    for got, want in zip([p.grad for p in model.parameters()] + [x.grad], eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.triton_kernels
def test_compile_fullgraph_cell_loop(device):
    """RAFT-style loop of cell steps compiles without graph breaks."""
    torch.manual_seed(0)
    cell = ConvGRUCell(3, 4, (1, 5), backend="triton", device=device)
    x = torch.randn(2, 3, 5, 7, device=device)

    def loop(x):
        h = None
        for _ in range(3):
            h = cell(x, h)
        return h

    assert _graph_breaks(loop, x) == 0
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(loop, fullgraph=True)(x), loop(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(device, backend):
    """Under autocast the whole layer runs in the autocast dtype (as cuDNN's RNNs
    do), gradients reach the float32 parameters, and the result stays close to
    float32."""
    if device.type == "cpu" and backend == "triton":
        dtype = torch.float16  # the interpreter has no bfloat16
    else:
        dtype = torch.bfloat16
    torch.manual_seed(0)
    model = ConvGRU(3, 4, 3, num_layers=2, backend=backend, device=device)
    x = torch.randn(3, 2, 3, 6, 5, device=device)
    want, _ = model(x)
    with torch.autocast(device.type, dtype=dtype):
        out, h_n = model(x)
    assert out.dtype == dtype and h_n.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.triton_kernels
def test_sequence_equals_cell_loop(device):
    """The whole-sequence operator and a loop of cell steps (one autograd node
    per step) compute the same outputs and gradients."""
    torch.manual_seed(0)
    seq = ConvGRU(3, 4, 3, backend="triton", device=device, dtype=torch.float64)
    cell = ConvGRUCell(3, 4, 3, backend="triton", device=device, dtype=torch.float64)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in seq.state_dict().items()})
    x = torch.randn(5, 2, 3, 6, 5, device=device, dtype=torch.float64, requires_grad=True)
    out, _ = seq(x)
    h, steps = None, []
    for t in range(x.shape[0]):
        h = cell(x[t], h)
        steps.append(h)
    torch.testing.assert_close(torch.stack(steps), out)
    g = torch.randn_like(out)
    want = torch.autograd.grad(torch.stack(steps), [x, *cell.parameters()], g)
    got = torch.autograd.grad(out, [x, *seq.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _post_grad_targets(fn, *args):
    """Every call_function target of the post-grad graphs Inductor compiles for
    ``fn(*args)`` (forward and backward: ``fn`` runs a backward itself), with
    Inductor's caches off so that the graphs are built here."""
    import collections

    seen = collections.Counter()

    def record(graph):
        for node in graph.nodes:
            if node.op == "call_function":
                seen[str(node.target)] += 1

    torch._dynamo.reset()
    with torch._inductor.config.patch(post_grad_custom_post_pass=record, force_disable_caches=True):
        fn(*args)
    return seen


# What the compiled graph must not hold around the operator: clones inserted
# for mutated arguments (the operators mutate nothing), copies for layout
# constraints at the graph level, dtype conversions outside autocast.
_COPIES = ("aten.clone.default", "aten.copy.default", "aten.copy_.default", "aten._to_copy.default",
           "aten.contiguous.default")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_sequence_graph_holds_no_copies(device, backend):
    """The post-grad graph of a compiled 2-layer bidirectional sequence, forward
    and backward: one forward and one backward operator per layer and
    direction, and no clone or copy around them."""
    torch.manual_seed(0)
    model = ConvGRU(3, 4, 3, num_layers=2, bidirectional=True, backend=backend, device=device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 2, 3, 5, 6, device=device, requires_grad=True)

    def train_step(x):
        out, h_n = compiled(x)
        (out.sum() + h_n.sum()).backward()

    seen = _post_grad_targets(train_step, x)
    assert seen["convgru_triton.conv_gru_fwd.default"] == 4, seen
    assert seen["convgru_triton.conv_gru_bwd.default"] == 4, seen
    assert not {k: seen[k] for k in _COPIES if seen[k]}, seen


@pytest.mark.slow
@pytest.mark.triton_kernels
def test_compiled_cell_is_fused_by_inductor(device):
    """A compiled cell step traces the step's math (convolutions and pointwise
    ops, which Inductor fuses), not the opaque operator, and holds no copy."""
    torch.manual_seed(0)
    cell = ConvGRUCell(3, 4, (1, 5), backend="triton", device=device)
    compiled = torch.compile(cell, fullgraph=True)
    x = torch.randn(2, 3, 5, 7, device=device)
    h = torch.randn(2, 4, 5, 7, device=device, requires_grad=True)

    def train_step(x, h):
        compiled(x, compiled(x, h)).sum().backward()

    seen = _post_grad_targets(train_step, x, h)
    assert not any(k.startswith("convgru_triton.") for k in seen), seen
    assert seen["aten.sigmoid.default"] and seen["aten.tanh.default"], seen
    assert not {k: seen[k] for k in _COPIES if seen[k]}, seen


@pytest.mark.slow
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.triton_kernels
def test_compiled_cell_loop_trains_like_eager(device, reset_after):
    """The compiled cell loop (Inductor's fusion of the step's math) gives the
    eager outputs and every gradient."""
    torch.manual_seed(0)
    cell = ConvGRUCell(3, 4, 3, reset_after=reset_after, backend="triton", device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, 5, 6, device=device, dtype=torch.float64, requires_grad=True)

    def loop(x, h):
        for _ in range(3):
            h = cell(x, h)
        return h

    wrt = [x, h0, *cell.parameters()]
    want = loop(x, h0)
    want_grads = torch.autograd.grad(want.square().sum(), wrt)
    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True)(x, h0)
    got_grads = torch.autograd.grad(got.square().sum(), wrt)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.slow
@pytest.mark.triton_kernels
def test_no_recompiles_between_calls_of_the_same_shapes(device):
    """Calls with the same shapes reuse the compiled graphs, also when eager
    calls in between fill the package's plan caches (a traced cache read would
    guard the graph on the cache's contents)."""
    torch.manual_seed(0)
    cell = ConvGRUCell(3, 4, (1, 5), backend="triton", device=device)
    seq = ConvGRU(3, 4, 3, num_layers=2, backend="triton", device=device)
    x = torch.randn(2, 3, 5, 7, device=device)
    xs = torch.randn(3, 2, 3, 5, 7, device=device, requires_grad=True)

    def loop(x):
        h = None
        for _ in range(3):
            h = cell(x, h)
        return h

    torch._dynamo.reset()
    compiled_loop = torch.compile(loop, fullgraph=True)
    compiled_seq = torch.compile(seq, fullgraph=True)
    compiled_loop(x)
    compiled_seq(xs)[0].sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            loop(x)  # eager: fills the caches the traced code must not read
            ConvGRUCell(3, 4, (5, 1), backend="triton", device=device)(x)
            seq(xs)[0].sum().backward()
            compiled_loop(x)
            compiled_seq(xs)[0].sum().backward()
