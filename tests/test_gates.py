"""The fused ConvGRU step (Triton kernels + autograd) against its reference.

One step through the sequence operator with the Triton gate math
(:func:`fused_step`) and ``conv_gru_cell_ref`` take the same arguments; every
output and every gradient must agree. The launchers are also checked one by
one against their ``*_ref`` twins. On CPU the kernels run under the Triton
interpreter, on a GPU compiled (tests marked ``triton_kernels``; the others
check the launch geometry without running a kernel).
"""

import pytest
import torch

from convgru_triton import _tuning
from convgru_triton._conv import ConvSpec
from convgru_triton.ops.gates import kernels as op
from convgru_triton.ops.sequence.op import conv_gru_sequence
from convgru_triton.ops.sequence.naive import conv_gru_cell_ref
from convgru_triton.ops.gates.naive import (
    gru_reset_after_bwd_ref,
    gru_reset_after_fwd_ref,
    gru_reset_gate_bwd_ref,
    gru_reset_gate_fwd_ref,
    gru_update_bwd_ref,
    gru_update_fwd_ref,
)


def fused_step(gates_x, h, weight_hh, bias_ih, bias_hh, spec, reset_after):
    """One step: the sequence operator over T = 1 with the Triton gate kernels."""
    return conv_gru_sequence(gates_x.unsqueeze(0), h, weight_hh, bias_ih, bias_hh, spec, reset_after, False, True)[0]

TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _inputs(device, dtype, batch, hidden, spatial, kernel, bias=True, seed=0):
    """Random (gates_x, h, weight_hh, bias_ih, bias_hh) for one step."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    gates_x = rand(batch, 3 * hidden, *spatial)
    h = rand(batch, hidden, *spatial)
    weight_hh = rand(3 * hidden, hidden, *kernel, scale=0.3)
    bias_ih = rand(3 * hidden) if bias else None
    bias_hh = rand(3 * hidden) if bias else None
    return gates_x, h, weight_hh, bias_ih, bias_hh


def _compare(device, dtype, gates_x, h, weight_hh, bias_ih, bias_hh, spec, reset_after, grad_seed=1):
    """Run both implementations, compare h' and the gradients of every input."""
    leaves_t = [t.detach().clone().requires_grad_(True) if t is not None else None
                for t in (gates_x, h, weight_hh, bias_ih, bias_hh)]
    leaves_r = [t.detach().clone().to(torch.float64 if dtype != torch.float64 else dtype).requires_grad_(True)
                if t is not None else None for t in (gates_x, h, weight_hh, bias_ih, bias_hh)]
    out_t = fused_step(*leaves_t, spec, reset_after)
    out_r = conv_gru_cell_ref(*leaves_r, spec, reset_after)
    tol = TOLERANCE[dtype]
    assert out_t.dtype == dtype and out_t.shape == h.shape
    torch.testing.assert_close(out_t.double(), out_r.double(), **tol)

    grad = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    present_t = [t for t in leaves_t if t is not None]
    present_r = [t for t in leaves_r if t is not None]
    grads_t = torch.autograd.grad(out_t, present_t, grad.to(device=device, dtype=dtype))
    grads_r = torch.autograd.grad(out_r, present_r, grad.to(device=device, dtype=out_r.dtype))
    names = [n for n, t in zip(("gates_x", "h", "weight_hh", "bias_ih", "bias_hh"), leaves_t) if t is not None]
    for name, g_t, g_r in zip(names, grads_t, grads_r):
        assert g_t.dtype == dtype, name
        # Weight and bias gradients sum over every pixel: scale the tolerance.
        scale = 1.0 if name in ("gates_x", "h") else max(1.0, g_r.abs().max().item())
        torch.testing.assert_close(
            g_t.double(), g_r.double(), atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}"
        )
    return out_t


SHAPES = [
    pytest.param(1, (2,), (19,), (3,), id="1d"),
    pytest.param(2, (3,), (7, 9), (3, 3), id="2d"),
    pytest.param(2, (2,), (5, 11), (1, 5), id="2d-kernel1x5"),
    pytest.param(3, (2,), (3, 5, 4), (3, 3, 3), id="3d"),
]


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("dims,batch,spatial,kernel", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(device, dims, batch, spatial, kernel, reset_after, dtype):
    spec = ConvSpec.create(dims, kernel)
    args = _inputs(device, dtype, batch[0], 5, spatial, kernel)
    _compare(device, dtype, *args, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_without_bias(device, reset_after):
    spec = ConvSpec.create(2, 3)
    args = _inputs(device, torch.float64, 2, 4, (6, 5), (3, 3), bias=False)
    _compare(device, torch.float64, *args, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_every_block_size(device, monkeypatch, block_size, reset_after):
    """Planes of 3 * 7 * 9 = 189 elements cut by blocks that do not divide them."""
    monkeypatch.setattr(_tuning, "launch_config", lambda *a, **k: _tuning.LaunchConfig(block_size, 2))
    spec = ConvSpec.create(2, 3)
    args = _inputs(device, torch.float64, 3, 3, (7, 9), (3, 3))
    _compare(device, torch.float64, *args, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_padding_modes_and_dilation(device, padding_mode, reset_after):
    spec = ConvSpec.create(2, (3, 2), dilation=(2, 1), padding_mode=padding_mode)
    args = _inputs(device, torch.float64, 2, 3, (6, 7), (3, 2))
    _compare(device, torch.float64, *args, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_channels_last_in_and_out(device, reset_after):
    spec = ConvSpec.create(2, 3)
    gates_x, h, weight_hh, bias_ih, bias_hh = _inputs(device, torch.float64, 2, 4, (5, 6), (3, 3))
    gates_x = gates_x.to(memory_format=torch.channels_last)
    h = h.to(memory_format=torch.channels_last)
    out = _compare(device, torch.float64, gates_x, h, weight_hh, bias_ih, bias_hh, spec, reset_after)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.triton_kernels
def test_channels_last_3d(device):
    spec = ConvSpec.create(3, 3)
    gates_x, h, weight_hh, bias_ih, bias_hh = _inputs(device, torch.float64, 2, 3, (3, 4, 5), (3, 3, 3))
    gates_x = gates_x.to(memory_format=torch.channels_last_3d)
    h = h.to(memory_format=torch.channels_last_3d)
    out = _compare(device, torch.float64, gates_x, h, weight_hh, bias_ih, bias_hh, spec, True)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_non_contiguous_views(device, reset_after):
    """Sliced gates, a state taken from a wider tensor and a transposed one."""
    spec = ConvSpec.create(2, 3)
    gates_x, h, weight_hh, bias_ih, bias_hh = _inputs(device, torch.float64, 2, 3, (6, 10), (3, 3))
    gates_x = gates_x[..., ::2]  # (2, 9, 6, 5), spatial dims not mergeable
    h = torch.cat([h, h], dim=1)[:, 1:4, :, ::2].transpose(2, 3).contiguous().transpose(2, 3)
    assert not h.is_contiguous() and not gates_x.is_contiguous()
    _compare(device, torch.float64, gates_x, h, weight_hh, bias_ih, bias_hh, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_expanded_incoming_gradient(device, reset_after):
    """``out.sum().backward()`` hands the backward a stride-0 gradient."""
    spec = ConvSpec.create(2, 3)
    args = _inputs(device, torch.float64, 2, 3, (5, 5), (3, 3))
    leaves = [t.clone().requires_grad_(True) for t in args]
    fused_step(*leaves, spec, reset_after).sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in args]
    conv_gru_cell_ref(*ref_leaves, spec, reset_after).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.triton_kernels
def test_only_some_inputs_need_grad(device):
    spec = ConvSpec.create(2, 3)
    gates_x, h, weight_hh, bias_ih, bias_hh = _inputs(device, torch.float64, 2, 3, (5, 5), (3, 3))
    for reset_after in (False, True):
        w = weight_hh.clone().requires_grad_(True)
        (g_w,) = torch.autograd.grad(fused_step(gates_x, h, w, bias_ih, bias_hh, spec, reset_after).sum(), w)
        w_ref = weight_hh.clone().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(conv_gru_cell_ref(gates_x, h, w_ref, bias_ih, bias_hh, spec, reset_after).sum(), w_ref)
        torch.testing.assert_close(g_w, g_ref)


@pytest.mark.triton_kernels
def test_no_grad_forward(device):
    spec = ConvSpec.create(2, 3)
    args = _inputs(device, torch.float32, 2, 3, (5, 7), (3, 3))
    for reset_after in (False, True):
        with torch.no_grad():
            out = fused_step(*args, spec, reset_after)
        torch.testing.assert_close(out, conv_gru_cell_ref(*args, spec, reset_after), atol=2e-5, rtol=2e-5)


@pytest.mark.triton_kernels
def test_float16(device):
    """Half storage with float32 math inside the kernels."""
    spec = ConvSpec.create(2, 3)
    args = _inputs(device, torch.float16, 2, 4, (5, 7), (3, 3))
    for reset_after in (False, True):
        _compare(device, torch.float16, *args, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 needs compiled kernels: the interpreter has no bfloat16")
def test_bfloat16(device):
    spec = ConvSpec.create(2, 3)
    args = _inputs(device, torch.bfloat16, 2, 4, (5, 7), (3, 3))
    for reset_after in (False, True):
        _compare(device, torch.bfloat16, *args, spec, reset_after)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_gradcheck(device, reset_after, deterministic):
    """Under deterministic algorithms: gradcheck also requires that backward
    twice gives bitwise equal results (nondet_tol=0), and cuDNN's default
    weight-gradient convolution adds with atomics (on an H200: "Backward is not
    reentrant"). The gate kernels are deterministic by themselves
    (test_reproducibility.py)."""
    spec = ConvSpec.create(2, (3, 2))
    args = _inputs(device, torch.float64, 2, 2, (4, 3), (3, 2))
    leaves = tuple(t.requires_grad_(True) for t in args)
    assert torch.autograd.gradcheck(
        lambda *xs: fused_step(*xs, spec, reset_after), leaves, eps=1e-6, atol=1e-6, fast_mode=True, nondet_tol=0.0
    )


@pytest.mark.triton_kernels
def test_double_backward_raises(device):
    spec = ConvSpec.create(2, 3)
    args = [t.requires_grad_(True) for t in _inputs(device, torch.float64, 1, 2, (4, 4), (3, 3))]
    out = fused_step(*args, spec, True)
    v = torch.ones_like(out, requires_grad=True)  # as gradgradcheck does
    (g,) = torch.autograd.grad(out, args[1], v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* is not supported"):
        g.sum().backward()


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_saturated_pre_activations(device, reset_after):
    """Pre-activations of +-1e4 and +-inf saturate the gates, never give NaN;
    NaN in the input propagates."""
    spec = ConvSpec.create(1, 1)
    hidden = 1
    values = torch.tensor([1e4, -1e4, float("inf"), float("-inf"), 0.0, 3.0], dtype=torch.float32)
    h = torch.tensor([[[0.5, -0.25, 0.75, 1.0, -1.0, 0.1]]], device=device)
    gates_x = values.repeat(3).view(1, 3, 6).to(device)
    weight_hh = torch.zeros(3 * hidden, hidden, 1, device=device)
    out = fused_step(gates_x, h, weight_hh, None, None, spec, reset_after)
    ref = conv_gru_cell_ref(gates_x, h, weight_hh, None, None, spec, reset_after)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref)
    # z = 1, n = 1 for +1e4/+inf; z = 0 keeps h for -1e4/-inf.
    torch.testing.assert_close(out[0, 0, :4].cpu(), torch.tensor([1.0, -0.25, 1.0, 1.0]))

    gates_nan = gates_x.clone()
    gates_nan[0, 2, 5] = float("nan")
    out_nan = fused_step(gates_nan, h, weight_hh, None, None, spec, reset_after)
    assert torch.isnan(out_nan[0, 0, 5]) and not torch.isnan(out_nan[0, 0, :5]).any()


def test_empty_batch(device):
    spec = ConvSpec.create(2, 3)
    gates_x, h, weight_hh, bias_ih, bias_hh = _inputs(device, torch.float32, 0, 3, (4, 4), (3, 3))
    for reset_after in (False, True):
        h_ = h.clone().requires_grad_(True)
        out = fused_step(gates_x, h_, weight_hh, bias_ih, bias_hh, spec, reset_after)
        assert out.shape == (0, 3, 4, 4)
        out.sum().backward()
        assert h_.grad.shape == h_.shape


# --- the launchers one by one, against their *_ref twins -------------------------


def _gate_inputs(device, hidden=3, spatial=(5, 7), batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    return rand, batch, hidden, spatial


@pytest.mark.triton_kernels
def test_reset_after_launchers_sum_two_incoming_gradients(device):
    """The backward kernel adds the output gradient to the state gradient itself."""
    rand, n, hidden, spatial = _gate_inputs(device)
    gx, gh, h = rand(n, 3 * hidden, *spatial), rand(n, 3 * hidden, *spatial), rand(n, hidden, *spatial)
    b_ih, b_hh = rand(3 * hidden), rand(3 * hidden)
    h_new, saved = op._reset_after_fwd(gx, gh, h, b_ih, b_hh, save=True)
    ref_h_new, r, z, cand, hn = gru_reset_after_fwd_ref(gx, gh, h, b_ih, b_hh)
    torch.testing.assert_close(h_new, ref_h_new)
    torch.testing.assert_close(saved[0], torch.cat([r, z, cand], 1))
    torch.testing.assert_close(saved[1], hn)

    g1, g2 = rand(n, hidden, *spatial), rand(n, hidden, *spatial)
    d_gx, d_gh, d_h = op._reset_after_bwd(g1, g2, saved, h, channels_last=False)
    ref_gx, ref_gh, ref_h = gru_reset_after_bwd_ref(g1 + g2, r, z, cand, hn, h)
    torch.testing.assert_close(d_gx, ref_gx)
    torch.testing.assert_close(d_gh, ref_gh)
    torch.testing.assert_close(d_h, ref_h)

    # The backward ref is the derivative of the forward ref.
    leaves = [t.clone().requires_grad_(True) for t in (gx, gh, h)]
    auto = torch.autograd.grad(gru_reset_after_fwd_ref(*leaves, b_ih, b_hh)[0], leaves, g1 + g2)
    for got, want in zip((ref_gx, ref_gh, ref_h), auto):  # d_h: the direct part, gh depends on h via the conv only
        torch.testing.assert_close(got, want)


@pytest.mark.triton_kernels
def test_reset_before_launchers_sum_two_incoming_gradients(device):
    rand, n, hidden, spatial = _gate_inputs(device)
    gx, gh_rz, gh_n, h = (rand(n, 3 * hidden, *spatial), rand(n, 2 * hidden, *spatial),
                          rand(n, hidden, *spatial), rand(n, hidden, *spatial))
    b_ih, b_hh = rand(3 * hidden), rand(3 * hidden)
    gates, rh = op._reset_gate_fwd(gx, gh_rz, h, b_ih, b_hh)
    r, z, ref_rh = gru_reset_gate_fwd_ref(gx, gh_rz, h, b_ih, b_hh)
    torch.testing.assert_close(gates[:, :hidden], r)
    torch.testing.assert_close(gates[:, hidden : 2 * hidden], z)
    torch.testing.assert_close(rh, ref_rh)
    h_new = op._update_fwd(gx, gh_n, gates, h, b_ih, b_hh, save=True)
    ref_h_new, cand = gru_update_fwd_ref(gx, gh_n, z, h, b_ih, b_hh)
    torch.testing.assert_close(h_new, ref_h_new)
    torch.testing.assert_close(gates[:, 2 * hidden :], cand)

    # Backward of the update half, fed two incoming gradients.
    g1, g2 = rand(n, hidden, *spatial), rand(n, hidden, *spatial)
    d_gates = torch.full_like(gx, float("nan"))
    d_h = op._update_bwd(g1, g2, gates, h, d_gates)
    ref_az, ref_an, ref_h = gru_update_bwd_ref(g1 + g2, z, cand, h)
    torch.testing.assert_close(d_gates[:, hidden : 2 * hidden], ref_az)
    torch.testing.assert_close(d_gates[:, 2 * hidden :], ref_an)
    torch.testing.assert_close(d_h, ref_h)
    leaves = [t.clone().requires_grad_(True) for t in (gx, gh_n, z, h)]
    auto_gx, auto_ghn, auto_z, auto_h = torch.autograd.grad(
        gru_update_fwd_ref(leaves[0], leaves[1], leaves[2], leaves[3], b_ih, b_hh)[0], leaves, g1 + g2
    )
    torch.testing.assert_close(ref_an, auto_gx[:, 2 * hidden :])
    torch.testing.assert_close(ref_an, auto_ghn)
    torch.testing.assert_close(ref_az, auto_z * z * (1 - z))
    torch.testing.assert_close(ref_h, auto_h)

    # Backward of the reset half: d(r*h) -> d a_r, and d h += d(r*h) * r.
    d_rh = rand(n, hidden, *spatial)
    d_h_before = d_h.clone()
    op._reset_gate_bwd(d_rh, gates, h, d_gates, d_h)
    ref_ar, ref_h_add = gru_reset_gate_bwd_ref(d_rh, r, h)
    torch.testing.assert_close(d_gates[:, :hidden], ref_ar)
    torch.testing.assert_close(d_h, d_h_before + ref_h_add)
    leaves = [t.clone().requires_grad_(True) for t in (gx, gh_rz, h)]
    _, _, rh_auto = gru_reset_gate_fwd_ref(*leaves, b_ih, b_hh)
    auto_gx, _, auto_h = torch.autograd.grad(rh_auto, leaves, d_rh)
    torch.testing.assert_close(ref_ar, auto_gx[:, :hidden])
    torch.testing.assert_close(ref_h_add, auto_h)


def test_launch_grid_covers_int64_offsets():
    """The grid and layout arguments for a state past 2**31 elements in total
    (each sample's gates below 2**31) are computed without overflow."""
    shape = (5, 512, 1024, 1024)
    big = torch.empty_strided(shape, (512 * 1024**2, 1024**2, 1024, 1), device="meta")
    assert big.numel() > 2**31
    geo = op._Geometry(big, _tuning.default_config(big.dtype))
    block = _tuning.default_config(big.dtype).block_size
    assert (geo.rows, geo.inner) == (512, 1024**2) and not geo.channels_last
    assert geo.grid == (5 * 512 * (1024**2 // block),)
    # The sample strides the kernels derive (channels x spatial) pass 2**31 only
    # after the multiplication by the 64-bit sample index.
    assert geo.strides[3][0] == 3 * 512 * 1024**2 < 2**31
    too_big = torch.empty_strided((1, 1024, 1024, 1024), (1024**3, 1024**2, 1024, 1), device="meta")
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 per sample"):
        op._Geometry(too_big, _tuning.default_config(too_big.dtype))


def test_launch_follows_the_configuration_in_force(device):
    """Launch geometries are cached per output shape, but never past a change of
    configuration: a forced or tuned block size takes effect at the next launch."""
    out = torch.empty(2, 3, 8, 8, device=device)  # 64 pixels: rows start on 16-byte boundaries, no cap on the block
    seen = []
    for block in (16, 64, 128, 16):
        with _tuning.forced_config(_tuning.LaunchConfig(block, 1)):
            geo = op._geometry("gru_update_fwd", out)
        seen.append(geo.common["BLOCK_R"] * geo.common["BLOCK_I"])
    assert seen == [16, 64, 128, 16]


def test_geometry_cache_is_bounded_and_keeps_replays_per_geometry(monkeypatch, device):
    """The geometry cache is cleared when full, and compiled kernels kept for
    replay live in their geometry: a geometry made again (a new configuration,
    or after a clear) starts with none, so a launch can never replay a kernel
    compiled for other constexprs."""
    monkeypatch.setattr(op, "_GEOMETRIES", {})
    monkeypatch.setattr(op, "_MAX_GEOMETRIES", 3)
    for width in range(1, 5):
        op._geometry("gru_update_fwd", torch.empty(1, 2, 3, width, device=device))
    assert len(op._GEOMETRIES) == 1
    out = torch.empty(1, 2, 3, 4, device=device)
    geo = op._geometry("gru_update_fwd", out)
    geo.replays[("stale",)] = None
    assert op._geometry("gru_update_fwd", out) is geo
    with _tuning.forced_config(_tuning.LaunchConfig(64, 2)):
        forced = op._geometry("gru_update_fwd", out)
    assert forced is not geo and not forced.replays
    after = op._geometry("gru_update_fwd", out)
    assert after is not forced and not after.replays


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_mixed_layouts_are_made_dense_once_per_call(device, monkeypatch, reset_after):
    """channels_last input pre-activations with a contiguous state, and the
    stride-0 gradient of ``out.sum()``: the sequence operator converts each once
    per call, so no launch has to copy a frame (``_conforming`` is the launchers'
    copying path); results equal the reference stepped by autograd."""
    spec = ConvSpec.create(2, 3)
    steps, hidden = 3, 4
    gen = torch.Generator().manual_seed(3)
    gates_x = torch.randn(steps, 2, 3 * hidden, 5, 6, generator=gen, dtype=torch.float64)
    gates_x = gates_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3).to(device)  # channels_last frames
    h0 = torch.randn(2, hidden, 5, 6, generator=gen, dtype=torch.float64).to(device)
    weight_hh = (torch.randn(3 * hidden, hidden, 3, 3, generator=gen, dtype=torch.float64) * 0.3).to(device)
    bias = torch.randn(3 * hidden, generator=gen, dtype=torch.float64).to(device)
    copies = []
    conforming = op._conforming
    monkeypatch.setattr(op, "_conforming", lambda *args: copies.append(args[1][0].shape) or conforming(*args))

    leaves = [t.clone().requires_grad_(True) for t in (gates_x, h0, weight_hh)]
    states = conv_gru_sequence(leaves[0], leaves[1], leaves[2], bias, bias, spec, reset_after, False, True)
    states.sum().backward()
    assert not copies, f"launches copied tensors of shapes {copies}"

    ref_leaves = [t.clone().requires_grad_(True) for t in (gates_x, h0, weight_hh)]
    h, ref_states = ref_leaves[1], []
    for t in range(steps):
        h = conv_gru_cell_ref(ref_leaves[0][t], h, ref_leaves[2], bias, bias, spec, reset_after)
        ref_states.append(h)
    torch.stack(ref_states).sum().backward()
    torch.testing.assert_close(states, torch.stack(ref_states))
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.triton_kernels
def test_strided_output_standing_in_for_unsaved_outputs(device):
    """Without ``save`` the reset-after forward passes h' for the pointers of
    the gates and aux it does not store. An h' the launch cannot write in place
    (a strided view) gets one scratch buffer, copied back once: a second,
    unwritten copy must not overwrite the result."""
    rand, n, hidden, spatial = _gate_inputs(device)
    gx, gh, h = rand(n, 3 * hidden, *spatial), rand(n, 3 * hidden, *spatial), rand(n, hidden, *spatial)
    b_ih, b_hh = rand(3 * hidden), rand(3 * hidden)
    h_new = torch.zeros(n, 2, hidden, *spatial, dtype=h.dtype, device=device)[:, 0]
    op._reset_after_fwd(gx, gh, h, b_ih, b_hh, False, h_new=h_new)
    torch.testing.assert_close(h_new, gru_reset_after_fwd_ref(gx, gh, h, b_ih, b_hh)[0])


def test_align_follows_the_tensors_not_the_biases(monkeypatch, device):
    """ALIGN (the vector width the kernels are compiled for) must divide every
    tensor's start; the biases are indexed per channel, not with it, so a bias
    off a 16-byte boundary must not narrow the accesses of every tensor. (A
    recorder stands in for the kernel; replay is off, so that every launch
    reaches it and none needs a GPU driver.)"""
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(kwargs["ALIGN"])

    monkeypatch.setattr(op, "_gru_reset_gate_fwd_kernel", Recorder())
    monkeypatch.setattr(op, "_DIRECT_LAUNCH", False)

    def randn(*shape):
        return torch.randn(*shape, device=device)

    gx, gh, h = randn(2, 12, 4, 8), randn(2, 8, 4, 8), randn(2, 4, 4, 8)
    bias_ih, bias_hh = randn(12), randn(12)
    flat = randn(2 * 12 + 2)
    off_ih, off_hh = flat[1:13], flat[14:26]  # 4 bytes past a 16-byte boundary
    assert off_ih.data_ptr() % 16 and off_hh.data_ptr() % 16
    for b_ih, b_hh in ((bias_ih, bias_hh), (off_ih, off_hh)):
        op._reset_gate_fwd(gx, gh, h, b_ih, b_hh)
    assert seen == [4, 4]  # 8 float32 pixels a row: 16-byte rows, whatever the biases
    off_h = randn(h.numel() + 1)[1:].view_as(h)
    op._reset_gate_fwd(gx, gh, off_h, bias_ih, bias_hh)
    assert seen[-1] == 1  # a tensor off the boundary does narrow them
