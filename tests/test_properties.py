"""Property-based tests: Hypothesis draws shapes (odd and even sizes, 1-D/2-D/3-D,
kernel sizes, dilation, padding modes), layouts (contiguous, channels_last,
sliced, transposed, expanded views), formulations, layers, directions and dtypes,
runs them through the fused Triton kernels (the interpreter on CPU) and the
eager backend, and compares outputs and gradients with an independent float64
reference written here (F.pad + convNd + the gate equations, step by step).

Profiles (environment variable ``CONVGRU_HYPOTHESIS_PROFILE``):

* ``ci`` (default): a fixed seed (derandomized) and a bounded number of
  examples, so that CI time stays small and failures reproduce.
* ``thorough``: many more random examples, for a local run::

      CONVGRU_HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from convgru_triton import ConvGRU1d, ConvGRU2d, ConvGRU3d  # noqa: E402
from convgru_triton._conv import ConvSpec  # noqa: E402
from convgru_triton.ops.sequence.op import conv_gru_sequence  # noqa: E402

# bfloat16 is drawn only where the kernels are compiled (the interpreter has
# none): known at collection, before the ``device`` fixture, from the same rule.
ON_GPU = torch.cuda.is_available()

# The conftest's autouse fixture (NaN-poisoned kernel outputs) and the ``device``
# fixture are function scoped and stay in force for every example of a test:
# that is intended (``device`` never changes within a session).
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
PROFILE = os.environ.get("CONVGRU_HYPOTHESIS_PROFILE", "ci")
SETTINGS = settings.get_profile(PROFILE)
# Examples per test as a share of the profile's budget (the op-level test is cheaper).
SEQUENCE_SETTINGS = settings(SETTINGS, max_examples=SETTINGS.max_examples)
OPERATOR_SETTINGS = settings(SETTINGS, max_examples=max(1, SETTINGS.max_examples * 3 // 5))

MODULES = {1: ConvGRU1d, 2: ConvGRU2d, 3: ConvGRU3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
DTYPES = [torch.float64, torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Tolerances against the float64 reference; gradients: atol scaled by max |gradient|.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1.2e-1, rtol=1.2e-1),
}


# ----------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------


def ref_conv(x, weight, dilation, padding_mode):
    """'Same' convolution, stride 1: total padding d * (k - 1) per dim, the
    smaller half on the left (PyTorch's padding='same' split)."""
    pads = []
    for k, d in reversed(list(zip(weight.shape[2:], dilation))):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    x = F.pad(x, pads, mode="constant" if padding_mode == "zeros" else padding_mode)
    return CONV[weight.dim() - 2](x, weight, dilation=tuple(dilation))


def _bias(b, lo, hi, like):
    if b is None:
        return 0.0
    return b[lo:hi].view(1, -1, *([1] * (like.dim() - 2)))


def ref_step_from_gates(gx, h, weight_hh, b_ih, b_hh, dilation, padding_mode, reset_after):
    """One step from the input pre-activations gx = W_i * x (no bias):
    r, z = sigmoid(...), n = tanh(...), h' = (1 - z) h + z n."""
    H = h.shape[1]
    a_r = gx[:, :H] + _bias(b_ih, 0, H, h)
    a_z = gx[:, H : 2 * H] + _bias(b_ih, H, 2 * H, h)
    a_n = gx[:, 2 * H :] + _bias(b_ih, 2 * H, 3 * H, h)
    if reset_after:
        gh = ref_conv(h, weight_hh, dilation, padding_mode)
        r = torch.sigmoid(a_r + gh[:, :H] + _bias(b_hh, 0, H, h))
        z = torch.sigmoid(a_z + gh[:, H : 2 * H] + _bias(b_hh, H, 2 * H, h))
        n = torch.tanh(a_n + r * (gh[:, 2 * H :] + _bias(b_hh, 2 * H, 3 * H, h)))
    else:
        gh = ref_conv(h, weight_hh[: 2 * H], dilation, padding_mode)
        r = torch.sigmoid(a_r + gh[:, :H] + _bias(b_hh, 0, H, h))
        z = torch.sigmoid(a_z + gh[:, H:] + _bias(b_hh, H, 2 * H, h))
        n = torch.tanh(a_n + ref_conv(r * h, weight_hh[2 * H :], dilation, padding_mode) + _bias(b_hh, 2 * H, 3 * H, h))
    return (1 - z) * h + z * n


def ref_sequence(x, hx, params, num_layers, bidirectional, dilation, padding_mode, reset_after):
    """x (T, N, C, *S), hx (L*D, N, H, *S) or None -> (output, h_n)."""
    dirs = 2 if bidirectional else 1
    hidden = params[0][1].shape[1]
    steps = x.shape[0]
    layer_input, finals = x, []
    for layer in range(num_layers):
        outs = []
        for direction in range(dirs):
            w_ih, w_hh, b_ih, b_hh = params[layer * dirs + direction]
            h = hx[layer * dirs + direction] if hx is not None else layer_input.new_zeros(
                (layer_input.shape[1], hidden) + tuple(layer_input.shape[3:]))
            states = [None] * steps
            for t in (range(steps - 1, -1, -1) if direction else range(steps)):
                gx = ref_conv(layer_input[t], w_ih, dilation, padding_mode)
                h = ref_step_from_gates(gx, h, w_hh, b_ih, b_hh, dilation, padding_mode, reset_after)
                states[t] = h
            outs.append(torch.stack(states))
            finals.append(h)
        layer_input = torch.cat(outs, dim=2)
    return layer_input, torch.stack(finals)


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed", "expanded")


def make_layout(values: torch.Tensor, layout: str, channel_dim: int) -> torch.Tensor:
    """A tensor equal to ``values`` stored as ``layout``: channels_last frames,
    a strided slice of a larger tensor, a transposed view, or an expanded
    (stride 0) view when the values allow it (``values`` repeats along dim 0)."""
    shape = tuple(values.shape)
    spatial_dims = len(shape) - channel_dim - 1
    if layout == "channels_last" and spatial_dims in (2, 3):
        fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        frames = values.reshape((-1,) + shape[channel_dim:])
        return frames.contiguous(memory_format=fmt).view(shape) if channel_dim == 1 else \
            frames.contiguous(memory_format=fmt).unflatten(0, shape[:channel_dim])
    if layout == "sliced":
        wide = values.new_zeros(shape[:-1] + (2 * shape[-1],))
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "transposed":
        if spatial_dims >= 2:  # last two spatial dims stored swapped
            return values.transpose(-1, -2).contiguous().transpose(-1, -2)
        return values.transpose(0, 1).contiguous().transpose(0, 1)  # dim 1 major
    if layout == "expanded":
        return values[:1].expand(shape)
    return values.contiguous()


# ----------------------------------------------------------------------------
# Whole modules
# ----------------------------------------------------------------------------


@dataclass
class SequenceCase:
    dims: int
    kernel: Tuple[int, ...]
    dilation: Tuple[int, ...]
    padding_mode: str
    spatial: Tuple[int, ...]
    c_in: int
    hidden: int
    steps: int
    batch: Optional[int]  # None: unbatched input
    num_layers: int
    bidirectional: bool
    reset_after: bool
    bias: bool
    batch_first: bool
    x_layout: str
    hx_layout: Optional[str]  # None: no initial state given
    dtype: torch.dtype
    grad: str  # "random" or "sum" (an expanded incoming gradient)
    seed: int


@st.composite
def sequence_cases(draw):
    dims = draw(st.integers(1, 3))
    max_k = 4 if dims < 3 else 3
    kernel = tuple(draw(st.lists(st.integers(1, max_k), min_size=dims, max_size=dims)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims)))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    spatial = []
    for k, d in zip(kernel, dilation):
        pad = d * (k - 1) - (d * (k - 1)) // 2  # the larger side
        least = {"reflect": pad + 1, "circular": max(pad, 1)}.get(padding_mode, 1)
        spatial.append(draw(st.integers(least, least + (4 if dims < 3 else 2))))
    layers = draw(st.integers(1, 2))
    bidirectional = draw(st.booleans())
    steps = draw(st.integers(1, 3 if layers * (1 + bidirectional) < 4 else 2))
    batch = draw(st.sampled_from([None, 0, 1, 2, 2]))
    x_layout = draw(st.sampled_from(LAYOUTS))
    hx_layout = draw(st.sampled_from((None,) + LAYOUTS))
    return SequenceCase(
        dims=dims, kernel=kernel, dilation=dilation, padding_mode=padding_mode, spatial=tuple(spatial),
        c_in=draw(st.integers(1, 3)), hidden=draw(st.integers(1, 3)), steps=steps, batch=batch,
        num_layers=layers, bidirectional=bidirectional, reset_after=draw(st.booleans()),
        bias=draw(st.booleans()), batch_first=draw(st.booleans()) if batch is not None else False,
        x_layout=x_layout, hx_layout=hx_layout,
        dtype=draw(st.sampled_from(DTYPES[:1] * 3 + DTYPES[1:])),  # float64 half the time
        grad=draw(st.sampled_from(["random", "sum"])), seed=draw(st.integers(0, 2**16)),
    )


def _grads(outputs, inputs, grad_outputs):
    wanted = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(got, wanted)]


def _assert_close(got, want, dtype, what, scale_by_max=False):
    tol = TOL[dtype]
    atol = tol["atol"] * (max(1.0, want.abs().max().item()) if scale_by_max and want.numel() else 1.0)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")


def check_sequence_case(case: SequenceCase, backend: str, device: torch.device):
    gen = torch.Generator().manual_seed(case.seed)
    dirs = 2 if case.bidirectional else 1
    model = MODULES[case.dims](
        case.c_in, case.hidden, case.kernel, num_layers=case.num_layers, bias=case.bias,
        batch_first=case.batch_first, bidirectional=case.bidirectional, reset_after=case.reset_after,
        padding_mode=case.padding_mode, dilation=case.dilation, dtype=torch.float64, backend=backend,
    )
    model.to(device, case.dtype)
    params = [tuple(p for p in group) for group in model.all_weights]
    n = 1 if case.batch is None else case.batch
    time_major = (case.steps, n, case.c_in) + case.spatial
    x64 = torch.randn(time_major, generator=gen, dtype=torch.float64)
    hx64 = None
    if case.hx_layout is not None:
        hx64 = 0.5 * torch.randn((case.num_layers * dirs, n, case.hidden) + case.spatial, generator=gen,
                                 dtype=torch.float64)

    # What the module gets: batch_first / unbatched arrangement, then the layout.
    def arrange(t, is_x):
        if case.batch is None:
            t = t.squeeze(1)
        elif case.batch_first and is_x:
            t = t.transpose(0, 1)
        return t

    # The module's input and state: leaf views in the drawn layout (an expanded
    # one repeats its first entry along dim 0); gradients are taken w.r.t. them.
    channel_dim = 1 if case.batch is None else 2
    x_view = make_layout(arrange(x64, True).to(device, case.dtype), case.x_layout, channel_dim)
    x_view.requires_grad_(True)
    hx_in = None
    if hx64 is not None:
        hx_in = make_layout(arrange(hx64, False).to(device, case.dtype), case.hx_layout, channel_dim)
        hx_in.requires_grad_(True)
    out, h_n = model(x_view, hx_in)

    # The reference on float64 copies of exactly the values the module saw.
    ref_params = [tuple(None if p is None else p.detach().double().requires_grad_(True) for p in group)
                  for group in params]
    x_ref = x_view.detach().double().requires_grad_(True)
    hx_ref = None if hx_in is None else hx_in.detach().double().requires_grad_(True)
    x_tm = x_ref.unsqueeze(1) if case.batch is None else (x_ref.transpose(0, 1) if case.batch_first else x_ref)
    hx_tm = None if hx_ref is None else (hx_ref.unsqueeze(1) if case.batch is None else hx_ref)
    out_ref, h_n_ref = ref_sequence(x_tm, hx_tm, ref_params, case.num_layers, case.bidirectional,
                                    case.dilation, case.padding_mode, case.reset_after)
    if case.batch is None:
        out_ref, h_n_ref = out_ref.squeeze(1), h_n_ref.squeeze(1)
    elif case.batch_first:
        out_ref = out_ref.transpose(0, 1)

    assert out.shape == out_ref.shape and h_n.shape == h_n_ref.shape
    assert out.dtype == case.dtype and h_n.dtype == case.dtype
    _assert_close(out, out_ref, case.dtype, "output")
    _assert_close(h_n, h_n_ref, case.dtype, "h_n")

    if case.grad == "sum":  # expanded (stride-0) incoming gradients
        loss = out.sum() + h_n.sum()
        loss_ref = out_ref.sum() + h_n_ref.sum()
    else:
        # Drawn on the CPU (the same values on every device), then rounded to
        # the dtype, so that the module and the reference get the same ones.
        g_out = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64).to(device, case.dtype)
        g_hn = torch.randn(h_n_ref.shape, generator=gen, dtype=torch.float64).to(device, case.dtype)
        loss = (out * g_out).sum() + (h_n * g_hn).sum()
        loss_ref = (out_ref * g_out.double()).sum() + (h_n_ref * g_hn.double()).sum()
    flat = [x_view, hx_in] + [p for group in params for p in group]
    flat_ref = [x_ref, hx_ref] + [p for group in ref_params for p in group]
    grads = _grads(loss, flat, None)
    grads_ref = _grads(loss_ref, flat_ref, None)
    names = ["x", "hx"] + [f"{name}[{i}]" for i in range(len(params))
                           for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    names = [nm for nm, t in zip(names, flat) if t is not None]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == case.dtype, name
        _assert_close(g, g_ref, case.dtype, f"grad {name}", scale_by_max=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "torch"])
@SEQUENCE_SETTINGS
@given(case=sequence_cases())
def test_modules_match_reference(case, backend, device):
    """Outputs, final states and gradients (input, initial state, every weight
    and bias) of a random ConvGRU{1,2,3}d equal the float64 reference, through
    the Triton kernels and through eager PyTorch (the same cases for both)."""
    check_sequence_case(case, backend, device)


# ----------------------------------------------------------------------------
# The sequence operator with kernel-level layouts
# ----------------------------------------------------------------------------

OP_LAYOUTS = ("contiguous", "channels_last", "spatial_stride", "channel_slice", "transposed", "expanded")


def op_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """(B..., C, *S) with C at dim -len(S)-1: layouts the kernels see directly."""
    spatial_dims = values.dim() - 3 if values.dim() >= 4 else values.dim() - 2
    c_dim = values.dim() - spatial_dims - 1
    if layout == "channel_slice":  # channels taken out of a wider tensor: odd sample stride
        shape = list(values.shape)
        shape[c_dim] += 2
        wide = values.new_zeros(shape)
        wide.narrow(c_dim, 1, values.shape[c_dim]).copy_(values)
        return wide.narrow(c_dim, 1, values.shape[c_dim])
    if layout == "spatial_stride":
        return make_layout(values, "sliced", c_dim)
    if layout == "channels_last":
        return make_layout(values, "channels_last", c_dim)
    if layout == "transposed":
        return make_layout(values, "transposed", c_dim)
    if layout == "expanded":
        return values[:1].expand(values.shape)
    return values.contiguous()


@st.composite
def operator_cases(draw):
    dims = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 6 if dims < 3 else 3), min_size=dims, max_size=dims)))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=dims, max_size=dims)))
    return dict(
        dims=dims, spatial=spatial, kernel=kernel,
        dilation=tuple(draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims))),
        padding_mode=draw(st.sampled_from(["zeros", "replicate", "circular"])),
        hidden=draw(st.integers(1, 4)), steps=draw(st.integers(1, 3)), batch=draw(st.integers(1, 2)),
        reset_after=draw(st.booleans()), reverse=draw(st.booleans()), bias=draw(st.booleans()),
        gx_layout=draw(st.sampled_from(OP_LAYOUTS)), h_layout=draw(st.sampled_from(OP_LAYOUTS)),
        dtype=draw(st.sampled_from(DTYPES[:1] * 2 + DTYPES[1:])), seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.slow
@pytest.mark.triton_kernels
@OPERATOR_SETTINGS
@given(case=operator_cases())
def test_operator_matches_reference_for_any_layout(case, device):
    """The sequence operator with the Triton gate kernels, fed gate
    pre-activations and an initial state in any layout (channels_last, strided,
    channel slices, transposed, stride-0 expanded), equals the reference."""
    spec_kernel = case["kernel"]
    # circular padding needs every size >= its padding: shrink the kernel where not
    sizes = case["spatial"]
    kernel = tuple(k if case["padding_mode"] != "circular" or d * (k - 1) - d * (k - 1) // 2 <= s else 1
                   for k, d, s in zip(spec_kernel, case["dilation"], sizes))
    spec = ConvSpec.create(case["dims"], kernel, case["dilation"], case["padding_mode"])
    gen = torch.Generator().manual_seed(case["seed"])
    H, T, N, dtype = case["hidden"], case["steps"], case["batch"], case["dtype"]

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    gx = op_layout(rand(T, N, 3 * H, *sizes).to(device, dtype), case["gx_layout"])
    h0 = op_layout(rand(N, H, *sizes, scale=0.5).to(device, dtype), case["h_layout"])
    leaves = [gx, h0, rand(3 * H, H, *kernel, scale=0.4).to(device, dtype)]
    leaves += [rand(3 * H).to(device, dtype), rand(3 * H).to(device, dtype)] if case["bias"] else [None, None]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)  # leaf views keep their layout
    states = conv_gru_sequence(gx, h0, leaves[2], leaves[3], leaves[4], spec, case["reset_after"],
                               case["reverse"], True)

    ref_leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in leaves]
    h, ref_states = ref_leaves[1], [None] * T
    for t in (range(T - 1, -1, -1) if case["reverse"] else range(T)):
        h = ref_step_from_gates(ref_leaves[0][t], h, ref_leaves[2], ref_leaves[3], ref_leaves[4],
                                spec.dilation, spec.padding_mode, case["reset_after"])
        ref_states[t] = h
    ref_states = torch.stack(ref_states)
    _assert_close(states, ref_states, dtype, "states")

    g = torch.randn(ref_states.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    got = _grads(states, leaves, g)
    want = _grads(ref_states, ref_leaves, g.double())
    for i, (a, b) in enumerate(zip(got, want)):
        _assert_close(a, b, dtype, f"grad {i}", scale_by_max=True)
