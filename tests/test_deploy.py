"""Deployment paths: ONNX export with both exporters checked against
ONNX Runtime, torch.jit.trace and script, torch.export and its decomposition,
meta and fake tensors, torch.func transforms, in-place ops on outputs.

ONNX export runs on CPU tensors (export is independent of the device the
model trains on). The dynamo exporter takes seconds per model, so it exports
every configuration at once, wrapped in one module.
"""

import io
import warnings

import pytest
import torch

import convgru_triton
from convgru_triton import (
    ConvGRU1d,
    ConvGRU2d,
    ConvGRU3d,
    ConvGRUCell1d,
    ConvGRUCell2d,
    ConvGRUCell3d,
    SepConvGRUCell2d,
)

onnx = pytest.importorskip("onnx", reason="the ONNX tests need onnx (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install -e '.[test]')")

# torch.jit.trace/save/load/script are deprecated upstream; they are still what
# this file tests, so their deprecation notes are not news here.
# The slow tier: exports (ONNX, torch.export, tracing) take seconds to a minute each.
pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
              pytest.mark.slow]

# The exported model's relative error bound: max |ORT - torch| / max |torch| in float32.
RTOL = 1e-5


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


def _cases():
    """(name, module, inputs): every public module, and between them every
    option: layers, bidirectional, batch_first, dropout (eval),
    both formulations, every padding mode, no bias, dilation, even kernels,
    given and missing initial states, unbatched input."""
    torch.manual_seed(0)
    return [
        ("cell1d_reflect", ConvGRUCell1d(3, 4, 3, padding_mode="reflect"), (_x(2, 3, 6, seed=1),)),
        ("cell2d_replicate_even_reset_after", ConvGRUCell2d(3, 4, (3, 2), reset_after=True, padding_mode="replicate"),
         (_x(2, 3, 5, 6, seed=2), _x(2, 4, 5, 6, seed=3))),
        ("cell3d_circular_nobias", ConvGRUCell3d(3, 4, 3, padding_mode="circular", bias=False), (_x(2, 3, 3, 4, 5, seed=4),)),
        ("sepcell2d", SepConvGRUCell2d(3, 4, 3, reset_after=True), (_x(2, 3, 5, 6, seed=5),)),
        ("gru1d_2layers_bidir_dropout_circular", ConvGRU1d(3, 4, 3, num_layers=2, bidirectional=True, dropout=0.5,
                                                          reset_after=True, padding_mode="circular"),
         (_x(2, 2, 3, 6, seed=6),)),
        ("gru2d_2layers_batch_first_reflect_dilated", ConvGRU2d(3, 4, 3, num_layers=2, batch_first=True, dilation=2,
                                                               padding_mode="reflect"),
         (_x(2, 2, 3, 5, 6, seed=7), _x(2, 2, 4, 5, 6, seed=8))),
        ("gru3d_bidir_replicate", ConvGRU3d(3, 4, 3, bidirectional=True, padding_mode="replicate"),
         (_x(2, 2, 3, 3, 4, 4, seed=9),)),
        ("cell2d_unbatched", ConvGRUCell2d(3, 4, 3), (_x(3, 5, 6, seed=10), _x(4, 5, 6, seed=11))),
    ]


CASE_NAMES = [name for name, _, _ in _cases()]


class _All(torch.nn.Module):
    """Every case in one module: one dynamo export instead of one per case."""

    def __init__(self, cases):
        super().__init__()
        self.models = torch.nn.ModuleList([m for _, m, _ in cases])
        self.arity = [len(args) for _, _, args in cases]

    def forward(self, *inputs):
        outputs, i = [], 0
        for model, n in zip(self.models, self.arity):
            out = model(*inputs[i: i + n])
            outputs += list(out) if isinstance(out, tuple) else [out]
            i += n
        return tuple(outputs)


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


def _check_standard_onnx(proto):
    """Opset >= 17, default-domain operators only, no local functions."""
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 17, opsets
    assert not list(proto.functions), [f.name for f in proto.functions]
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    ops = {n.op_type for n in proto.graph.node}
    assert "Conv" in ops and "Sigmoid" in ops and "Tanh" in ops, ops
    onnx.checker.check_model(proto)


def _run_ort(proto, inputs):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _assert_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        err = ((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        assert err <= RTOL, f"relative error {err:.2e} > {RTOL:.0e}"


def _export_torchscript(model, args, **kwargs) -> "onnx.ModelProto":
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=17, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(model, args, **kwargs) -> "onnx.ModelProto":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, args, dynamo=True, opset_version=18, verbose=False, **kwargs).model_proto


# --- ONNX ---------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(CASE_NAMES)), ids=CASE_NAMES)
def test_onnx_torchscript_exporter_matches_ort(index):
    name, model, args = _cases()[index]
    model.eval()
    proto = _export_torchscript(model, args)
    _check_standard_onnx(proto)
    with torch.no_grad():
        expected = _flat(model(*args))
    _assert_close(_run_ort(proto, args), expected)


def test_onnx_dynamo_exporter_matches_ort_every_module():
    cases = _cases()
    model = _All(cases).eval()
    args = tuple(a for _, _, case_args in cases for a in case_args)
    proto = _export_dynamo(model, args)
    _check_standard_onnx(proto)
    with torch.no_grad():
        expected = list(model(*args))
    _assert_close(_run_ort(proto, args), expected)


def _dynamic_case():
    torch.manual_seed(0)
    model = ConvGRU2d(3, 4, 3, bidirectional=True).eval()
    return model, _x(2, 2, 3, 5, 6), _x(2, 3, 3, 7, 4, seed=1)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_dynamic_batch_and_spatial_sizes(exporter):
    """Exported with one batch and spatial size, run by ORT with others."""
    model, x, other = _dynamic_case()
    if exporter == "dynamo":
        dim = torch.export.Dim.DYNAMIC
        proto = _export_dynamo(model, (x,), dynamic_shapes={"input": {1: dim, 3: dim, 4: dim}})
    else:
        axes = {1: "batch", 3: "height", 4: "width"}
        proto = _export_torchscript(model, (x,), input_names=["input"], output_names=["output", "h_n"],
                                    dynamic_axes={"input": axes, "output": axes, "h_n": axes})
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], int) and isinstance(dims[2], int), dims  # T and channels stay static
    assert all(isinstance(d, str) for d in (dims[1], dims[3], dims[4])), dims
    with torch.no_grad():
        for inp in (x, other):
            _assert_close(_run_ort(proto, (inp,)), list(model(inp)))


def test_onnx_from_exported_program_with_decompositions():
    """torch.export keeps the fast operator; convgru_triton.deploy.decompositions()
    turns it into standard ATen ops, which the ONNX exporter translates."""
    torch.manual_seed(0)
    model = ConvGRU2d(3, 4, 3, reset_after=True).eval()
    x = _x(2, 2, 3, 5, 6)
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "convgru_triton.conv_gru_fwd.default" in targets
    decomposed = ep.run_decompositions(convgru_triton.deploy.decompositions())
    targets = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert not any("convgru_triton" in t for t in targets), targets
    with torch.no_grad():
        expected = list(model(x))
    _assert_close(list(decomposed.module()(x)), expected)
    proto = _export_dynamo(decomposed, ())
    _check_standard_onnx(proto)
    _assert_close(_run_ort(proto, (x,)), expected)


def test_decomposition_saves_what_the_operator_saves():
    """With save=True the decomposition returns the operator's gates and aux too."""
    from convgru_triton.deploy import _conv_gru_fwd_decomposition
    from convgru_triton.ops.sequence.op import _conv_gru_fwd

    for reset_after in (False, True):
        args = (_x(3, 2, 6, 4, 5), _x(2, 2, 4, 5, seed=1), _x(6, 2, 3, 3, seed=2) * 0.3, _x(6, seed=3), _x(6, seed=4),
                [3, 3], [1, 1], "reflect", reset_after, True, False, True)
        for got, expected in zip(_conv_gru_fwd_decomposition(*args), _conv_gru_fwd(*args)):
            torch.testing.assert_close(got, expected)


# --- TorchScript ------------------------------------------------------------------


# case index -> the batch dim of each input (doubled to check other batch sizes)
TRACE_CASES = {0: (0,), 3: (0,), 5: (0, 1)}


@pytest.mark.parametrize("index", list(TRACE_CASES), ids=[CASE_NAMES[i] for i in TRACE_CASES])
def test_jit_trace_equals_eager(index):
    """The traced module equals eager, also for another batch size (T, the
    number of steps, is fixed by the trace), and saves and loads."""
    _, model, args = _cases()[index]
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # the package's checks stay quiet
        traced = torch.jit.trace(model, args)
    bigger = tuple(torch.cat([a, a.flip(d)], dim=d) for a, d in zip(args, TRACE_CASES[index]))
    with torch.no_grad():
        for inputs in (args, bigger):
            _assert_close(_flat(traced(*inputs)), _flat(model(*inputs)))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own deprecation note
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        _assert_close(_flat(loaded(*args)), _flat(model(*args)))


def test_jit_trace_refuses_another_sequence_length():
    """T is fixed by the trace: a longer or shorter sequence raises, rather
    than running the traced number of steps."""
    model = ConvGRU2d(3, 4, 3, batch_first=True).eval()
    traced = torch.jit.trace(model, (_x(2, 3, 3, 5, 6),))
    for steps in (2, 4):
        with pytest.raises(RuntimeError, match=f"Expected 3 elements in a list but found {steps}"):
            traced(_x(2, steps, 3, 5, 6))


def test_jit_trace_other_spatial_size():
    model = ConvGRUCell2d(3, 4, 3, padding_mode="reflect").eval()
    traced = torch.jit.trace(model, (_x(2, 3, 5, 6),))
    other = _x(3, 3, 8, 4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), model(other), rtol=RTOL, atol=1e-6)


def test_jit_trace_gradients_equal_eager():
    model = ConvGRU1d(3, 4, 3, num_layers=2, bidirectional=True)
    x = _x(3, 2, 3, 6).requires_grad_()
    traced = torch.jit.trace(model, (x,))
    for m in (traced, model):
        out, h_n = m(x)
        (out.square().sum() + h_n.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    # Both backward passes accumulated into the same parameters: eager + traced = 2 * eager.
    model.zero_grad()
    x.grad = None
    out, h_n = model(x)
    (out.square().sum() + h_n.sum()).backward()
    for g, single in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(g, 2 * single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", [ConvGRU2d(3, 4, 3), ConvGRUCell1d(3, 4, 3), SepConvGRUCell2d(3, 4)],
                         ids=["gru", "cell", "sepcell"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_jit_script_raises_naming_trace_and_export(model):
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch\.jit\.script.*torch\.jit\.trace.*torch\.export"):
        torch.jit.script(model)
    wrapper = torch.nn.Sequential(model)  # also as a submodule
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace"):
        torch.jit.script(wrapper)


# --- torch.export -----------------------------------------------------------------


def test_torch_export_save_load_keeps_operator(tmp_path):
    model = ConvGRU2d(3, 4, 3, bidirectional=True).eval()
    x = _x(2, 2, 3, 5, 6)
    ep = torch.export.export(model, (x,))
    path = tmp_path / "gru.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path))
    with torch.no_grad():
        _assert_close(list(loaded.module()(x)), list(model(x)))


# --- meta and fake tensors ------------------------------------------------------------


def _meta_cases():
    return [
        (ConvGRU2d, dict(num_layers=2, bidirectional=True), (4, 2, 3, 6, 7), (4, 2, 10, 6, 7), (4, 2, 5, 6, 7)),
        (ConvGRU3d, dict(batch_first=True, reset_after=True), (2, 3, 3, 2, 4, 5), (2, 3, 5, 2, 4, 5), (1, 2, 5, 2, 4, 5)),
        (ConvGRUCell1d, dict(padding_mode="reflect"), (2, 3, 6), (2, 5, 6), None),
        (SepConvGRUCell2d, dict(), (2, 3, 6, 7), (2, 5, 6, 7), None),
    ]


@pytest.mark.parametrize("case", range(4), ids=["gru2d", "gru3d", "cell1d", "sepcell"])
@pytest.mark.parametrize("mode,backend", [("meta", "auto"), ("fake", "torch"), ("fake", "triton")])
def test_meta_and_fake_forward_backward(case, mode, backend, device, monkeypatch):
    """Shapes, dtypes and devices of outputs and of every gradient, computed
    without data (deferred initialisation, FLOP counting, shape inference):
    the operator's fake implementation runs, not the time loop."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from convgru_triton.ops.sequence import op as conv_gru_module

    def no_loop(*args):
        raise AssertionError("the time loop ran on meta or fake tensors")

    monkeypatch.setattr(conv_gru_module, "_conv_gru_fwd", no_loop)
    cls, kwargs, in_shape, out_shape, h_shape = _meta_cases()[case]
    ctx = FakeTensorMode() if mode == "fake" else torch.device("meta")
    factory = dict(dtype=torch.float64, backend=backend, device=device if mode == "fake" else None)
    with ctx:
        model = cls(3, 5, 3, **factory, **kwargs)
        x = torch.empty(in_shape, dtype=torch.float64, device=factory["device"], requires_grad=True)
        out = model(x)
        outs = _flat(out)
        assert tuple(outs[0].shape) == out_shape
        if h_shape is not None:
            assert tuple(outs[1].shape) == h_shape
        sum(o.sum() for o in outs).backward()
    for t in outs + [x.grad] + [p.grad for p in model.parameters()]:
        assert t.dtype == torch.float64
        if mode == "meta":
            assert t.device.type == "meta"
        else:
            assert isinstance(t, FakeTensor) and t.device == torch.device(device)
    assert tuple(x.grad.shape) == in_shape
    for p in model.parameters():
        assert p.grad.shape == p.shape


def test_meta_under_autocast_context():
    """The autocast query is skipped for devices without autocast (meta)."""
    model = ConvGRU2d(3, 5, 3, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = model(torch.empty(4, 2, 3, 6, 7, device="meta"))
    assert out.shape == (4, 2, 5, 6, 7) and out.device.type == "meta"


# --- torch.func ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vmap_cell_and_sequence_fold_into_batch(device, backend):
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device)
    x = torch.randn(2, 3, 3, 5, 6, device=device)
    h = torch.randn(2, 3, 4, 5, 6, device=device)
    torch.testing.assert_close(torch.vmap(cell)(x, h), cell(x.flatten(0, 1), h.flatten(0, 1)).unflatten(0, (2, 3)))
    # hx not vmapped: broadcast over the vmapped dim
    torch.testing.assert_close(torch.vmap(cell, in_dims=(0, None))(x, h[0]),
                               torch.stack([cell(x[i], h[0]) for i in range(2)]))
    # (smaller with the kernels: on CPU they run under the slow Triton interpreter)
    layers = 2 if backend == "torch" else 1
    gru = ConvGRU2d(3, 4, 3, num_layers=layers, bidirectional=True, backend=backend, device=device)
    xs = torch.randn(2, 2, 2, 3, 5, 4, device=device)  # vmapped dim 2 (of T, N, vmapped, ...)
    out, h_n = torch.vmap(gru, in_dims=2)(xs)
    for i in range(2):
        o, hn = gru(xs[:, :, i])
        torch.testing.assert_close(out[i], o)
        torch.testing.assert_close(h_n[i], hn)


def test_grad_functional_call_and_per_sample_grads(device):
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    gru = ConvGRU1d(3, 4, 3, num_layers=2, reset_after=True, device=device)
    params = {k: v.detach() for k, v in gru.named_parameters()}
    xs = torch.randn(2, 3, 1, 3, 6, device=device)

    def loss(p, x):
        out, h_n = functional_call(gru, p, (x,))
        return out.square().sum() + h_n.sum()

    g = grad(loss)(params, xs[0])
    loss(dict(gru.named_parameters()), xs[0]).backward()
    for k, p in gru.named_parameters():
        torch.testing.assert_close(g[k], p.grad)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(2):
        single = grad(loss)(params, xs[i])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], single[k])


def test_model_ensembling_with_stack_module_state(device):
    """Weights vmapped: one operator call per model, stacked."""
    import copy

    from torch.func import functional_call, grad, stack_module_state, vmap

    torch.manual_seed(0)
    models = [ConvGRU2d(3, 4, 3, device=device) for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 2, 3, 5, 6, device=device)

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    out, h_n = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(models):
        o, h = m(x)
        torch.testing.assert_close(out[i], o)
        torch.testing.assert_close(h_n[i], h)
    g = vmap(grad(lambda p, b, x: run(p, b, x)[0].sum()), in_dims=(0, 0, None))(params, buffers, x)
    models[1](x)[0].sum().backward()
    torch.testing.assert_close(g["weight_hh_l0"][1], models[1].weight_hh_l0.grad)


def test_forward_mode_ad_raises_naming_reverse_mode():
    cell = ConvGRUCell1d(2, 2, 3)
    x = torch.randn(1, 2, 5)
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .* use reverse mode"):
        torch.func.jvp(cell, (x,), (torch.ones_like(x),))


def test_double_backward_under_func_grad_raises():
    from torch.func import grad

    cell = ConvGRUCell1d(2, 2, 3)
    x = torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError, match="double backward"):
        grad(lambda x: grad(lambda x: cell(x).sum())(x).sum())(x)


# --- outputs are ordinary tensors ---------------------------------------------------------


def test_in_place_on_outputs_like_torch_nn_gru():
    torch.manual_seed(0)
    gru = ConvGRU2d(3, 4, 3, num_layers=2)
    x = torch.randn(3, 2, 3, 5, 6, requires_grad=True)
    with torch.no_grad():
        out, h_n = gru(x)
        out += 1
        h_n.mul_(2)
    # h_n is nothing backward reads: in-place is fine with grad too
    out, h_n = gru(x)
    skip = torch.randn_like(h_n)
    h_n += skip
    (out.sum() + h_n.sum()).backward()
    # output is read by the backward: PyTorch's own error, at backward time
    out, h_n = gru(x)
    out += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    for batch_first in (False, True):
        model = ConvGRU2d(3, 4, 3, batch_first=batch_first)
        out, _ = model(x)
        assert out._base is None or batch_first  # batch_first returns a transposed view, as torch.nn.GRU does
        with torch.no_grad():
            out.add_(1)


def test_in_place_on_cell_output():
    cell = ConvGRUCell2d(3, 4, 3)
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        h = cell(x)
        h += 1
    h = cell(x, h)
    h2 = h + 0
    h2 += 1
    cell(x, h2).sum().backward()  # in-place on a result computed from the output: fine
    h = cell(x)
    h += 1  # the output itself is saved for the backward: PyTorch's error at backward time
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cell(x, h).sum().backward()
