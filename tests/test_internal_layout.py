"""The internal layout policy: where the package computes in
channels_last (``CONVGRU_TRITON_LAYOUT``, ``convgru_triton._layout``), a
caller's NCHW tensors are converted once per call, every convolution sees
channels_last operands, results and every gradient equal the policy-off path
(``keep``) and the reference, and outputs come back in the caller's layout.

On the CPU the policy is forced on with ``override_settings(layout="channels_last")``
(its default there is off); on CUDA the same tests run on the fixture's device.

The two layouts run different convolution algorithms, which round
differently: their float32 results are compared through a float64 reference
(``_tolerance.assert_close_to_reference``), never with a tolerance meant for
one algorithm.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import simulated_environment
from torch.utils._python_dispatch import TorchDispatchMode

from convgru_triton import ConvGRU2d, ConvGRU3d, ConvGRUCell2d, ConvGRUCell3d, SepConvGRUCell2d, functional
from convgru_triton._conv import ConvSpec, conv_same
from convgru_triton._layout import LAYOUT_ENV_VAR, internal_memory_format
from convgru_triton._settings import override
from convgru_triton.ops.sequence.naive import conv_gru_cell_ref, conv_gru_sequence_ref

from _tolerance import assert_all_close_to_reference

BACKENDS = ["torch", "triton"]
CL = {2: torch.channels_last, 3: torch.channels_last_3d}
COPY_OPS = {"aten.copy_.default", "aten.clone.default", "aten._to_copy.default"}
CONV_OPS = {"aten.convolution.default", "aten.convolution_backward.default"}


@pytest.fixture
def layout(package_settings):
    """Sets the layout setting for the test (its generation is in the plan keys)."""
    return lambda value: package_settings(layout=value)


def _stride_order(t: torch.Tensor):
    return tuple(sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: (t.stride(d), -d)))


def _channels_innermost(t: torch.Tensor) -> bool:
    return t.dim() < 4 or t.shape[1] < 2 or t.stride(1) == 1


class _Recorder(TorchDispatchMode):
    """Records the copies that change a tensor's layout, and whether each
    convolution's tensor operands have channels innermost."""

    def __init__(self):
        super().__init__()
        self.copies, self.nchw_convs, self.convs = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name in COPY_OPS:
            dst, src = (args[0], args[1]) if name == "aten.copy_.default" else (out, args[0])
            if src.dim() == dst.dim() and 0 not in src.stride() and _stride_order(src) != _stride_order(dst):
                self.copies.append(f"{name} {tuple(src.shape)} {src.stride()} -> {dst.stride()}")
        elif name in CONV_OPS:
            self.convs += 1
            operands = [a for a in args[:3] if isinstance(a, torch.Tensor)]
            if not all(_channels_innermost(a) for a in operands):
                self.nchw_convs.append(f"{name} {[(tuple(a.shape), a.stride()) for a in operands]}")
        return out


def _in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return t.contiguous()
    return t.contiguous(memory_format=CL[t.dim() - 2])


def _spatial(dims):
    return (5, 7) if dims == 2 else (3, 4, 5)  # not multiples of any block size


def _assert_layout(t: torch.Tensor, channels_last: bool, what: str):
    if channels_last:
        assert _channels_innermost(t) and not t.is_contiguous(), f"{what} is not channels_last: {t.stride()}"
    else:
        assert t.is_contiguous(), f"{what} is not contiguous (the caller's NCHW): {t.stride()}"


def _grads(outputs, tensors):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.manual_seed(123)
    # Drawn in logical order (randn_like would follow each output's layout), in
    # float32 whatever the output's dtype: the float64 reference gets the same values.
    cotangents = [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, tensors, cotangents)


def _float64_leaf(t):
    return None if t is None else t.detach().double().requires_grad_()


# --- the policy ---------------------------------------------------------------

def test_policy_default_and_override():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with override(layout="auto"):
        assert internal_memory_format(cuda, torch.bfloat16, 2) == torch.channels_last
        assert internal_memory_format(cuda, torch.float16, 3) == torch.channels_last_3d
        assert internal_memory_format(cuda, torch.float32, 2) is None
        assert internal_memory_format(cpu, torch.bfloat16, 2) is None
        assert internal_memory_format(cuda, torch.bfloat16, 1) is None
    with override(layout="channels_last"):
        assert internal_memory_format(cpu, torch.float64, 2) == torch.channels_last
        assert internal_memory_format(cpu, torch.float32, 1) is None
    with override(layout="keep"):
        assert internal_memory_format(cuda, torch.bfloat16, 2) is None


def test_bad_setting_names_the_variable(device):
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    with pytest.raises(ValueError, match=f"layout \\({LAYOUT_ENV_VAR}\\) must be one of 'auto', 'channels_last', "
                                         "'keep' .*got 'nhwc'"):
        with override(layout="nhwc"):
            pass
    with simulated_environment(CONVGRU_TRITON_LAYOUT="nhwc"):
        with pytest.raises(ValueError, match=f"environment variable {LAYOUT_ENV_VAR} must be one of 'auto', "
                                             "'channels_last', 'keep' .*got 'nhwc'"):
            cell(torch.randn(2, 3, 5, 7, device=device))
        with override(layout="keep"):  # an override of the setting lifts the error of its variable
            cell(torch.randn(2, 3, 5, 7, device=device))


# --- the cell -----------------------------------------------------------------

CELL_CASES = [  # (dims, caller channels_last, hx given, batched)
    (2, False, True, True), (2, True, True, True), (2, False, False, True), (2, False, True, False),
    (3, False, True, True), (3, True, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims,caller_cl,with_hx,batched", CELL_CASES,
                         ids=[f"{d}d-{'cl' if c else 'nchw'}-{'hx' if h else 'nohx'}{'' if b else '-unbatched'}"
                              for d, c, h, b in CELL_CASES])
def test_cell_equals_policy_off_and_reference(layout, device, backend, dims, caller_cl, with_hx, batched):
    torch.manual_seed(0)
    reset_after = dims == 3
    cell = (ConvGRUCell2d if dims == 2 else ConvGRUCell3d)(3, 4, 3, reset_after=reset_after, backend=backend,
                                                           device=device)
    x = _in_layout(torch.randn((2, 3) + _spatial(dims), device=device), caller_cl)
    h = _in_layout(torch.randn((2, 4) + _spatial(dims), device=device), caller_cl) if with_hx else None
    if not batched:
        x, h = x[0], None if h is None else h[0]
    leaves = [t.requires_grad_() for t in (x, h) if t is not None]
    wrt = leaves + list(cell.parameters())

    results = {}
    for setting in ("keep", "channels_last"):
        layout(setting)
        out = cell(x, h)
        results[setting] = (out, _grads(out, wrt))
    out, grads = results["channels_last"]
    _assert_layout(out if batched else out.unsqueeze(0), caller_cl and batched, "h'")

    # The reference cell in float64, from the same values.
    spec = ConvSpec.create(dims, cell.kernel_size, 1, "zeros")
    x64, h64 = _float64_leaf(x), _float64_leaf(h)
    params64 = {name: _float64_leaf(p) for name, p in cell.named_parameters()}
    xb = x64 if batched else x64.unsqueeze(0)
    if h64 is None:
        hb = torch.zeros((xb.shape[0], 4) + xb.shape[2:], device=device, dtype=torch.float64)
    else:
        hb = h64 if batched else h64.unsqueeze(0)
    ref = conv_gru_cell_ref(conv_same(xb, params64["weight_ih"], spec), hb, params64["weight_hh"],
                            params64["bias_ih"], params64["bias_hh"], spec, reset_after)
    ref = ref if batched else ref.squeeze(0)
    wrt64 = [t for t in (x64, h64) if t is not None] + list(params64.values())
    ref_grads = _grads(ref, wrt64)
    names = ("channels_last", "keep")
    assert_all_close_to_reference([out], [results["keep"][0]], [ref], labels=["h'"], names=names)
    labels = ["d_x", "d_hx"][:len(leaves)] + [f"d_{name}" for name in params64]
    assert_all_close_to_reference(grads, results["keep"][1], ref_grads, labels=labels, names=names)
    # The parameters' .grad, accumulated by autograd, in each parameter's own layout.
    cell.zero_grad(set_to_none=True)
    cell(x, h).sum().backward()
    for name, p in cell.named_parameters():
        assert p.grad.stride() == p.stride(), f"{name}.grad strides {p.grad.stride()}, parameter {p.stride()}"


# Layout-changing copies per cell call, measured on the CPU (torch 2.13,
# TRITON_INTERPRET=1) with an NCHW caller whose input, hx and parameters are
# leaves: forward, the four operands converted and h' converted back (5);
# backward, autograd's accumulation of the four leaves' channels_last
# gradients into their NCHW layouts (4; a non-leaf input's gradient flows on
# channels_last, uncopied). Same for both backends.
CELL_COPIES_CPU = {"torch": (5, 4), "triton": (5, 4)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_convolutions_channels_last_and_copies_counted(layout, device, backend):
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device)
    x = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    h = torch.randn(2, 4, 5, 7, device=device, requires_grad=True)
    counts = {}
    for setting in ("keep", "channels_last"):
        layout(setting)
        cell(x, h)  # planned: the recorded call is a replay
        with _Recorder() as fwd:
            out = cell(x, h)
        x.grad = h.grad = None  # fresh gradients: accumulating into existing ones copies nothing
        cell.zero_grad(set_to_none=True)
        with _Recorder() as bwd:
            out.sum().backward()
        counts[setting] = (len(fwd.copies), len(bwd.copies))
        if setting == "channels_last":
            assert fwd.convs >= 2 and bwd.convs >= 2
            assert not fwd.nchw_convs and not bwd.nchw_convs, fwd.nchw_convs + bwd.nchw_convs
        else:
            assert fwd.nchw_convs, "the policy-off path should hand NCHW tensors to the convolutions"
    assert counts["keep"] == (0, 0)
    fwd_copies, bwd_copies = counts["channels_last"]
    assert fwd_copies <= 4 + 1 and bwd_copies <= 4 + 1, counts  # one per input tensor, one for the output
    if device.type == "cpu":
        assert counts["channels_last"] == CELL_COPIES_CPU[backend], (counts, bwd.copies)


def test_channels_last_caller_and_module_copy_nothing_but_the_state(layout, device):
    """A channels_last caller's tensors are not copied; a channels_last module's
    weights neither: only the NCHW state in and out."""
    layout("channels_last")
    cell = ConvGRUCell2d(3, 4, 3, device=device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    h = torch.randn(2, 4, 5, 7, device=device)
    cell(x, h)
    with _Recorder() as rec:
        out = cell(x, h)
    assert len(rec.copies) == 2, rec.copies  # hx in, h' out
    assert out.is_contiguous()
    h = h.contiguous(memory_format=torch.channels_last)
    with _Recorder() as rec:
        out = cell(x, h)
    assert rec.copies == [] and not out.is_contiguous()


# --- the sequence -------------------------------------------------------------

def _sequence_ref(module, x, hx):
    """conv_gru's definition from the reference cell: per layer and direction
    the input convolution of every frame and conv_gru_sequence_ref."""
    dims, directions = x.dim() - 3, 2 if module.bidirectional else 1
    spec = ConvSpec.create(dims, module.kernel_size, 1, "zeros")
    seq = x.transpose(0, 1) if module.batch_first else x
    finals = []
    for layer in range(module.num_layers):
        outs = []
        for direction in range(directions):
            w_ih, w_hh, b_ih, b_hh = module.all_weights[layer * directions + direction]
            gates = torch.stack([conv_same(f, w_ih, spec) for f in seq.unbind(0)])
            states = conv_gru_sequence_ref(gates, hx[layer * directions + direction], w_hh, b_ih, b_hh, spec,
                                           False, direction == 1)
            outs.append(states)
            finals.append(states[0] if direction else states[-1])
        seq = torch.cat(outs, dim=2)
    return (seq.transpose(0, 1) if module.batch_first else seq), torch.stack(finals)


SEQ_CASES = [  # (dims, batch_first, bidirectional, layers, caller channels_last, backend)
    (2, False, False, 1, False, "torch"), (2, True, True, 2, False, "torch"), (2, True, False, 2, True, "torch"),
    (3, False, True, 2, False, "torch"), (2, False, True, 1, False, "triton"), (2, True, False, 1, True, "triton"),
]


@pytest.mark.parametrize("dims,batch_first,bidirectional,layers,caller_cl,backend", SEQ_CASES,
                         ids=[f"{d}d-{'bf' if b else 'tf'}-{'bi' if bi else 'uni'}-L{n}-{'cl' if c else 'nchw'}-{k}"
                              for d, b, bi, n, c, k in SEQ_CASES])
def test_sequence_equals_policy_off_and_reference(layout, device, dims, batch_first, bidirectional, layers,
                                                  caller_cl, backend):
    torch.manual_seed(0)
    gru = (ConvGRU2d if dims == 2 else ConvGRU3d)(3, 4, 3, num_layers=layers, bidirectional=bidirectional,
                                                  batch_first=batch_first, backend=backend, device=device)
    directions = 2 if bidirectional else 1
    steps, batch = 3, 2
    frames = torch.randn((batch * steps, 3) + _spatial(dims), device=device)
    frames = _in_layout(frames, caller_cl).unflatten(0, (batch, steps) if batch_first else (steps, batch))
    x = frames.requires_grad_()
    hx = torch.randn((layers * directions, batch, 4) + _spatial(dims), device=device, requires_grad=True)
    wrt = [x, hx] + list(gru.parameters())
    results = {}
    for setting in ("keep", "channels_last"):
        layout(setting)
        with _Recorder() as rec:
            out = gru(x, hx)
        results[setting] = (out, _grads(out, wrt), rec)
    (output, h_n), grads, rec = results["channels_last"]
    assert not rec.nchw_convs, rec.nchw_convs
    # Forward copies: the sequence (unless already channels_last), hx, two
    # weights per layer and direction, output (unless the caller's is
    # channels_last) and h_n back to hx's NCHW.
    expected = (0 if caller_cl else 2) + 2 + 2 * layers * directions
    assert len(rec.copies) == expected, rec.copies
    frame = output[:, 0] if batch_first else output[0]
    assert _channels_innermost(frame) == caller_cl and frame.stride(-1) == (4 * directions if caller_cl else 1), \
        f"an output frame's strides {frame.stride()}"
    _assert_layout(h_n, False, "h_n")
    if not caller_cl:  # (a channels_last caller with an NCHW hx: the keep path follows hx, this the input)
        assert output.stride() == results["keep"][0][0].stride()
    gru64 = copy.deepcopy(gru).double()
    x64, hx64 = _float64_leaf(x), _float64_leaf(hx)
    ref = _sequence_ref(gru64, x64, hx64)
    ref_grads = _grads(ref, [x64, hx64] + list(gru64.parameters()))
    names = ("channels_last", "keep")
    assert_all_close_to_reference((output, h_n), results["keep"][0], ref, labels=["output", "h_n"], names=names)
    labels = ["d_x", "d_hx"] + [f"d_{name}" for name, _ in gru.named_parameters()]
    assert_all_close_to_reference(grads, results["keep"][1], ref_grads, labels=labels, names=names)


# --- SepConvGRU and a RAFT-style loop ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("caller_cl", [False, True], ids=["nchw", "cl"])
def test_raft_loop_equals_policy_off(layout, device, backend, caller_cl):
    """RAFT's update loop: a SepConvGRU stepped 12 times, the state fed back,
    a loss over every step's state; the package's conversions counted per step."""
    torch.manual_seed(0)
    steps = 12
    sep = SepConvGRUCell2d(6, 4, 5, backend=backend, device=device)
    x = _in_layout(torch.randn(2, 6, 5, 7, device=device), caller_cl).requires_grad_()
    h0 = _in_layout(torch.randn(2, 4, 5, 7, device=device), caller_cl).requires_grad_()
    wrt = [x, h0] + list(sep.parameters())
    # The reference: the same loop in float64 on the eager backend, policy off.
    sep64 = SepConvGRUCell2d(6, 4, 5, backend="torch", device=device, dtype=torch.float64)
    sep64.load_state_dict(sep.state_dict())
    x64, h64 = _float64_leaf(x), _float64_leaf(h0)
    runs = [("keep", sep, x, h0, wrt), ("channels_last", sep, x, h0, wrt),
            ("reference", sep64, x64, h64, [x64, h64] + list(sep64.parameters()))]
    results = {}
    for setting, module, x_in, h_in, leaves in runs:
        layout("keep" if setting == "reference" else setting)
        module(x_in, h_in)  # planned
        h, outs = h_in, []
        with _Recorder() as rec:
            for _ in range(steps):
                h = module(x_in, h)
                outs.append(h)
        loss = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
        results[setting] = (h, torch.autograd.grad(loss, leaves), rec)
    h, grads, rec = results["channels_last"]
    assert not rec.nchw_convs, rec.nchw_convs
    # Per step: the four weights, and for an NCHW caller input and state in
    # and h' out (once for both halves).
    assert len(rec.copies) == steps * (4 if caller_cl else 7), rec.copies
    _assert_layout(h, caller_cl, "h'")
    names = ("channels_last", "keep")
    assert_all_close_to_reference([h], [results["keep"][0]], [results["reference"][0]], labels=["h"], names=names)
    labels = ["d_x", "d_h0"] + [f"d_{name}" for name, _ in sep.named_parameters()]
    assert_all_close_to_reference(grads, results["keep"][1], results["reference"][1], labels=labels, names=names)


def test_channels_last_module_three_copies_per_step(layout, device):
    """With the module's weights channels_last (module.to(memory_format=...)),
    an NCHW caller's SepConvGRU step costs three conversions: input, state, h'."""
    layout("channels_last")
    sep = SepConvGRUCell2d(6, 4, 5, device=device).to(memory_format=torch.channels_last)
    x, h = torch.randn(2, 6, 5, 7, device=device), torch.randn(2, 4, 5, 7, device=device)
    sep(x, h)
    with _Recorder() as rec:
        out = sep(x, h)
    assert len(rec.copies) == 3, rec.copies
    assert not rec.nchw_convs and out.is_contiguous()


# --- autocast and torch.compile ---------------------------------------------------

@pytest.mark.parametrize("kind", ["cell", "sep"])
def test_autocast_one_copy_per_tensor(layout, device, kind):
    """Under autocast the layout change and autocast's cast are one copy per
    tensor; results and gradients equal the policy-off path under autocast."""
    torch.manual_seed(0)
    module = (ConvGRUCell2d(3, 4, 3, device=device) if kind == "cell" else SepConvGRUCell2d(3, 4, 5, device=device))
    x = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    h = torch.randn(2, 4, 5, 7, device=device, requires_grad=True)
    wrt = [x, h] + list(module.parameters())
    results = {}
    for setting in ("keep", "channels_last"):
        layout(setting)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            module(x, h)
            with _Recorder() as rec:
                out = module(x, h)
        results[setting] = (out, _grads(out.float(), wrt), rec)
    out, grads, rec = results["channels_last"]
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert not rec.nchw_convs, rec.nchw_convs
    # input, hx, and two weights per half, each one _to_copy (cast + layout); h' back.
    weights = 2 if kind == "cell" else 4
    assert sum("_to_copy" in c for c in rec.copies) == 2 + weights, rec.copies
    assert len(rec.copies) == 2 + weights + 1, rec.copies
    tol = dict(rtol=2e-2, atol=2e-2)  # bfloat16, summed in a different order
    torch.testing.assert_close(out.float(), results["keep"][0].float(), **tol)
    for g, g_keep in zip(grads, results["keep"][1]):
        torch.testing.assert_close(g, g_keep, **tol)


def test_not_applied_under_compile(layout, device):
    """torch.compile traces the cell without the policy (Inductor chooses the
    layouts): one graph, no break, the eager result."""
    layout("channels_last")
    torch._dynamo.reset()
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    x, h = torch.randn(2, 3, 5, 7, device=device), torch.randn(2, 4, 5, 7, device=device)
    compiled = torch.compile(cell, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, h), cell(x, h))
    assert functional._internal_format(device, torch.float32, 2, None) == torch.channels_last


def test_bad_value_raises_inside_vmap_and_jit_trace(environment_at_import, device):
    """Where the policy is not applied (vmap, jit.trace), a bad value still
    raises, as it does in eager mode, rather than being ignored there."""
    environment_at_import(CONVGRU_TRITON_LAYOUT="nhwc")
    x = torch.randn(2, 4, 3, 5, 7, device=device)  # a sequence (T=2, N=4), or vmapped cell inputs (N=4)
    for module in (ConvGRU2d(3, 4, 3, device=device), ConvGRUCell2d(3, 4, 3, device=device)):
        with pytest.raises(ValueError, match="CONVGRU_TRITON_LAYOUT must be one of .*got 'nhwc'"):
            torch.vmap(module)(x.unsqueeze(0) if isinstance(module, ConvGRU2d) else x)
        with pytest.raises(ValueError, match="CONVGRU_TRITON_LAYOUT must be one of .*got 'nhwc'"):
            torch.jit.trace(module, (x if isinstance(module, ConvGRU2d) else x[0],), check_trace=False)


def test_not_applied_inside_vmap(layout, device):
    """torch.vmap cannot make channels_last copies (NYI in torch): inside a
    functorch transform the cell, the sequence and SepConvGRU keep the layout."""
    layout("channels_last")
    torch.manual_seed(0)
    x, h = torch.randn(2, 3, 3, 5, 7, device=device), torch.randn(2, 3, 4, 5, 7, device=device)
    for module in (ConvGRUCell2d(3, 4, 3, device=device), SepConvGRUCell2d(3, 4, 5, device=device)):
        expected = module(x.flatten(0, 1), h.flatten(0, 1)).unflatten(0, (2, 3))
        torch.testing.assert_close(torch.vmap(module)(x, h), expected)
    gru = ConvGRU2d(3, 4, 3, device=device)
    seq = torch.randn(2, 4, 3, 3, 5, 7, device=device)  # vmapped over dim 0: (T=4, N=3, C=3, 5, 7)
    out, h_n = torch.vmap(gru)(seq)
    for i in range(2):
        torch.testing.assert_close(out[i], gru(seq[i])[0])
