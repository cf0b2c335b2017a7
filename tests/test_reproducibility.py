"""Reproducibility: the forward and backward of both backends give bitwise equal
results run after run (the gate kernels use no atomics; every sum has a fixed
order), and the whole layer runs under ``torch.use_deterministic_algorithms(True)``
with every padding mode, calling no operation that has no deterministic CUDA
implementation. docs/errors.md, "Errors and numerics", lists the settings (the
``deterministic`` fixture of conftest.py). On a GPU, cuDNN's convolutions are
bitwise reproducible only in that mode: its default weight-gradient algorithms
add with atomics; every convolution of the package goes through aten's
convolution and convolution_backward, which pass the mode on to cuDNN.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from convgru_triton import ConvGRU1d, ConvGRU2d

BACKENDS = ["triton", "torch"]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]

# Operations PyTorch documents as raising under use_deterministic_algorithms(True)
# on CUDA (torch.use_deterministic_algorithms docstring), as profiler names.
NONDETERMINISTIC_CUDA_OPS = (
    "aten::reflection_pad1d_backward", "aten::reflection_pad2d_backward", "aten::reflection_pad3d_backward",
    "aten::upsample_linear1d_backward", "aten::upsample_bilinear2d_backward", "aten::upsample_bicubic2d_backward",
    "aten::upsample_trilinear3d_backward", "aten::avg_pool3d_backward", "aten::_adaptive_avg_pool2d_backward",
    "aten::_adaptive_avg_pool3d_backward", "aten::adaptive_max_pool2d_backward",
    "aten::fractional_max_pool2d_backward", "aten::fractional_max_pool3d_backward", "aten::max_unpool1d",
    "aten::max_unpool2d", "aten::max_unpool3d", "aten::nll_loss_forward", "aten::nll_loss2d_forward",
    "aten::_ctc_loss_backward", "aten::_embedding_bag_backward", "aten::put_", "aten::histc", "aten::bincount",
    "aten::median", "aten::grid_sampler_2d_backward", "aten::cumsum", "aten::scatter_reduce",
)


def _model(backend, padding_mode, reset_after, device, dtype=torch.float32, dims=2, num_layers=2):
    torch.manual_seed(0)
    cls = ConvGRU2d if dims == 2 else ConvGRU1d
    return cls(3, 4, (3, 2) if dims == 2 else 3, num_layers=num_layers, bidirectional=True, reset_after=reset_after,
               padding_mode=padding_mode, dtype=dtype, backend=backend, device=device)


def _forward_backward(model, dtype=torch.float32):
    """Output, final state and every gradient of one forward and backward pass
    on fixed data (the same every call), on the model's device."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)  # draws on the CPU: the same values on every device
    spatial = (5, 6) if isinstance(model, ConvGRU2d) else (7,)
    batch = 2 if device.type == "cuda" else 1  # the interpreter runs one program per sample and kernel
    x = torch.randn(3, batch, 3, *spatial, generator=gen).to(device, dtype).requires_grad_(True)
    hx = torch.randn(2 * model.num_layers, batch, 4, *spatial, generator=gen).to(device, dtype).requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out, h_n = model(x, hx)
    g_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    ((out * g_out).sum() + h_n.sum()).backward()
    return [out.detach(), h_n.detach(), x.grad, hx.grad] + [p.grad for p in model.parameters()]


def _assert_bitwise_equal(first, second):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a is not None and b is not None, i
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_forward_and_backward_are_bitwise_reproducible(backend, padding_mode, reset_after, device, request):
    """Twice the same computation on the same model, and once more on a model
    built anew from the same seed: every output and gradient bitwise equal."""
    if device.type == "cuda":
        request.getfixturevalue("deterministic")  # cuDNN's convolutions: see the module docstring
    model = _model(backend, padding_mode, reset_after, device)
    first = _forward_backward(model)
    second = _forward_backward(model)
    third = _forward_backward(_model(backend, padding_mode, reset_after, device))
    _assert_bitwise_equal(first, second)
    _assert_bitwise_equal(first, third)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_runs_under_deterministic_algorithms(backend, padding_mode, deterministic, device):
    """With torch.use_deterministic_algorithms(True) (and cuDNN deterministic,
    no benchmarking) the layer runs forward and backward for every padding mode,
    gives bitwise equal results twice, and the same values as without it."""
    model = _model(backend, padding_mode, reset_after=False, device=device, dims=1, num_layers=1)
    first = _forward_backward(model)
    second = _forward_backward(model)
    _assert_bitwise_equal(first, second)
    torch.use_deterministic_algorithms(False)
    free = _forward_backward(model)
    for a, b in zip(first, free):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _ops_called(model):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _forward_backward(model)
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_no_operation_without_a_deterministic_cuda_implementation(backend, padding_mode, deterministic, device):
    """Checked on any device by listing what forward and backward call: none of
    the operations that raise under deterministic mode on CUDA. (Plain
    F.pad(mode='reflect') is one: its backward has no deterministic CUDA kernel,
    so in this mode the input convolution pads with narrow/flip/cat instead.)"""
    called = _ops_called(_model(backend, padding_mode, reset_after=True, device=device, dims=1, num_layers=1))
    assert "aten::convolution_backward" in called  # the trace does see the backward
    bad = sorted(called.intersection(NONDETERMINISTIC_CUDA_OPS))
    assert not bad, f"calls operations with no deterministic CUDA implementation: {bad}"


def test_reflect_padding_outside_deterministic_mode_uses_f_pad(device):
    """The check above can see the difference: without deterministic mode the
    input convolution's reflect padding is F.pad, whose backward is listed."""
    called = _ops_called(_model("torch", "reflect", reset_after=True, device=device, dims=1, num_layers=1))
    assert "aten::reflection_pad1d_backward" in called


def test_gate_kernels_use_no_atomics():
    """Every element of every kernel output is written by exactly one program,
    once: no atomic operation appears in the kernels (so no run-to-run
    variation from the order of atomic adds)."""
    pytest.importorskip("triton")
    from convgru_triton.ops.gates import kernels as conv_gru_cell

    kernels = [obj for name, obj in vars(conv_gru_cell).items() if name.endswith("_kernel")]
    assert len(kernels) == 6
    for kernel in kernels:
        source = inspect.getsource(kernel.fn)
        assert "atomic" not in source, kernel.fn.__name__
    assert "atomic" not in inspect.getsource(conv_gru_cell)


@pytest.mark.gpu
@pytest.mark.triton_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_deterministic_mode_all_padding_modes(dtype, deterministic, device):
    """On a GPU, every padding mode under deterministic mode: no RuntimeError
    from an operation without a deterministic implementation, bitwise equal
    results twice, on the Triton path."""
    if device.type != "cuda":
        pytest.skip("needs CUDA: compiled kernels and cuDNN under deterministic mode (the interpreter is slow "
                    "for every padding mode and formulation; test_runs_under_deterministic_algorithms covers them)")
    for padding_mode in PADDING_MODES:
        for reset_after in (False, True):
            model = _model("triton", padding_mode, reset_after, device, dtype=dtype)
            _assert_bitwise_equal(_forward_backward(model, dtype), _forward_backward(model, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_deterministic_mode_gives_bitwise_equal_gradients(backend, reset_after, deterministic, device):
    """Under deterministic mode, gradients are bitwise equal run after run, in
    float64 (where cuDNN's default weight-gradient algorithm of a small hidden
    convolution is nondeterministic: gradcheck's reentrancy check failed on an
    H200 without this mode): the input, the state, every weight and
    bias, three runs on the same model."""
    model = _model(backend, "zeros", reset_after, device, dtype=torch.float64)
    runs = [_forward_backward(model, torch.float64) for _ in range(3)]
    grads = [run[2:] for run in runs]  # x, hx, then every parameter
    assert len(grads[0]) == 2 + len(list(model.parameters()))
    for later in grads[1:]:
        _assert_bitwise_equal(grads[0], later)
