"""torchvision's RAFT converted (convgru_triton.convert.from_torchvision_raft):
the recurrent block, and the whole model, compute the same flow and the same
gradients as the original, and the weights go back into an unconverted model.

torchvision does not import on a CPU-only torch here (its wheels link CUDA
libraries), so the block and model tests run on stand-ins built to
torchvision's published structure (bench/torchvision_raft_standin.py, written
from its equations); the real raft_large / raft_small are compared where
torchvision imports. Float32 results are held to a float64 reference
(tests/_tolerance.py) with TF32 off (conftest.py)."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from bench.torchvision_raft_standin import RecurrentBlock, TINY_CHANNELS, standin_raft, torchvision_unavailable
from convgru_triton import ConvGRUCell2d, SepConvGRUCell2d
from convgru_triton.convert import (
    TorchvisionRecurrentBlock,
    from_torchvision_raft,
    from_torchvision_recurrent_block,
    to_torchvision_raft_state_dict,
)

from _tolerance import assert_close_to_reference

LAYOUTS = {
    # (kernel sizes, paddings, cell class) of each torchvision model's recurrent block
    "raft_large": (((1, 5), (5, 1)), ((0, 2), (2, 0)), SepConvGRUCell2d),
    "raft_small": ((3,), (1,), ConvGRUCell2d),
}
GATES = ("convr", "convz", "convq")  # this package's row order (r, z, n)
BLOCK = "update_block.recurrent_block."


def _randomise(module, scale=0.5):
    # Larger than the default initialisation: gates far from 0.5, so that a swapped gate shows.
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-scale, scale)
    return module


def _block(name, device, dtype=torch.float32):
    kernels, paddings, _ = LAYOUTS[name]
    tiny = TINY_CHANNELS[name]
    block = RecurrentBlock(input_size=tiny["context"] + tiny["motion"], hidden_size=tiny["hidden"],
                           kernel_size=kernels, padding=paddings)
    return _randomise(block).to(device=device, dtype=dtype)


def _grads_as_torchvision(block: TorchvisionRecurrentBlock):
    """The converted cell's parameter gradients under torchvision's names: the gate's
    rows of weight_hh (state) and weight_ih (input) side by side along the input
    channels, the bias's from bias_ih (bias_hh has the same gradient)."""
    cell = block.cell
    halves = {"1": cell.horizontal, "2": cell.vertical} if isinstance(cell, SepConvGRUCell2d) else {"1": cell}
    grads = {}
    for index, half in halves.items():
        hidden = half.hidden_channels
        for g, gate in enumerate(GATES):
            rows = slice(g * hidden, (g + 1) * hidden)
            grads[f"convgru{index}.{gate}.weight"] = torch.cat([half.weight_hh.grad[rows],
                                                                half.weight_ih.grad[rows]], dim=1)
            grads[f"convgru{index}.{gate}.bias"] = half.bias_ih.grad[rows]
            torch.testing.assert_close(half.bias_hh.grad[rows], half.bias_ih.grad[rows])
    return grads


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 off for every test here, whatever the device (conftest.py does it on CUDA):
    the float32 comparisons assume float32 products. Restored by hand (a property)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------
# The recurrent block
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_recurrent_block_same_outputs_and_gradients(name, train, backend, device):
    """RAFT's refinement loop over the block (the state fed back, a new input each
    update): the output and the gradients of h, x and every weight equal the
    original's within float32 rounding."""
    torch.manual_seed(0)
    original = _block(name, device).train(train)
    reference = copy.deepcopy(original).double()
    converted = from_torchvision_recurrent_block(copy.deepcopy(original), backend=backend)
    assert isinstance(converted, TorchvisionRecurrentBlock) and isinstance(converted.cell, LAYOUTS[name][2])
    assert converted.training == train and converted.hidden_size == original.hidden_size
    for p in converted.parameters():
        assert p.device.type == device.type and p.dtype == torch.float32 and p.requires_grad
    hidden, inputs = original.hidden_size, original.convgru1.convz.in_channels - original.hidden_size
    h0 = torch.tanh(torch.randn(2, hidden, 6, 7, device=device))
    xs = [torch.randn(2, inputs, 6, 7, device=device) for _ in range(3)]
    weight = torch.randn(2, hidden, 6, 7, device=device)

    def run(module, dtype):
        h = h0.to(dtype, copy=True).requires_grad_()
        x = [t.to(dtype, copy=True).requires_grad_() for t in xs]
        out = h
        for t in x:
            out = module(out, t)
        (out * weight.to(dtype)).sum().backward()
        return out.detach(), [h.grad] + [t.grad for t in x]

    (out_o, grads_o), (out_c, grads_c), (out_r, grads_r) = (run(original, torch.float32),
                                                          run(converted, torch.float32),
                                                          run(reference, torch.float64))
    assert_close_to_reference(out_o, out_c, out_r, names=("original", "converted"), what="h after 3 updates")
    for i, (a, b, r) in enumerate(zip(grads_o, grads_c, grads_r)):
        assert_close_to_reference(a, b, r, names=("original", "converted"), what=f"grad of input {i}")
    params_c = _grads_as_torchvision(converted)
    params_r = {n: p.grad for n, p in reference.named_parameters()}
    assert sorted(params_c) == sorted(n for n, _ in original.named_parameters())
    for n, p in original.named_parameters():
        assert_close_to_reference(p.grad, params_c[n], params_r[n], names=("original", "converted"),
                                  what=f"grad of {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_device_dtype_mode_and_requires_grad_kept(name, dtype, device):
    model = standin_raft(name).to(device=device, dtype=dtype).eval()
    model.update_block.recurrent_block.requires_grad_(False)
    assert from_torchvision_raft(model) is model  # in place
    block = model.update_block.recurrent_block
    assert isinstance(block, TorchvisionRecurrentBlock) and not block.training
    assert all(p.dtype == dtype and p.device.type == device.type and not p.requires_grad
               for p in block.parameters())
    # called as torchvision's UpdateBlock calls its recurrent block: state first
    tiny = TINY_CHANNELS[name]
    h = torch.zeros(1, tiny["hidden"], 4, 5, device=device, dtype=dtype)
    x = torch.ones(1, tiny["context"] + tiny["motion"], 4, 5, device=device, dtype=dtype)
    assert block(h, x).shape == h.shape


# ----------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------


def _torchvision_model(name):
    # Not pytest.importorskip: a torchvision wheel built for CUDA fails on a CPU-only torch
    # with OSError or RuntimeError, which importorskip does not catch.
    reason = torchvision_unavailable()
    if reason:
        pytest.skip(reason)
    from torchvision.models import optical_flow

    return getattr(optical_flow, name)(weights=None)


@contextlib.contextmanager
def _float64_coordinates(model):
    """torchvision builds its pixel grid in float32 whatever the model's dtype; the
    float64 reference needs it in float64 (the stand-ins follow the model's dtype)."""
    if type(model).__module__.startswith("torchvision"):
        from torchvision.models.optical_flow import raft as tv_raft

        grid = tv_raft.make_coords_grid
        tv_raft.make_coords_grid = lambda *args, **kwargs: grid(*args, **kwargs).double()
        try:
            yield
        finally:
            tv_raft.make_coords_grid = grid
    else:
        yield


MODELS = {
    "standin-raft_large": lambda: standin_raft("raft_large"),
    "standin-raft_small": lambda: standin_raft("raft_small"),
    "torchvision-raft_large": lambda: _torchvision_model("raft_large"),
    "torchvision-raft_small": lambda: _torchvision_model("raft_small"),
}
#: A whole network's gradients sum over many more products than one block's: float32
#: against float64 at 1e-4 of each tensor's largest magnitude (the block tests hold
#: 2e-5); the two float32 results must still agree within their measured errors.
MODEL_RTOL = 1e-4


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", sorted(MODELS))
def test_whole_model_same_flow_and_gradients(which, train, device):
    """The converted model's flow predictions (every update) and the gradients of
    every parameter equal the original's, through RAFT's forward."""
    torch.manual_seed(0)
    original = MODELS[which]().to(device).train(train)
    size = 128 if which.startswith("torchvision") else 32
    updates = 2
    reference = copy.deepcopy(original).double()
    converted = from_torchvision_raft(copy.deepcopy(original))
    assert converted.training == train
    image1, image2 = (torch.rand(1, 3, size, size, device=device) * 2 - 1 for _ in range(2))
    weights = [torch.randn(1, 2, size, size, device=device) for _ in range(updates)]

    def run(model, dtype):
        with _float64_coordinates(model) if dtype == torch.float64 else contextlib.nullcontext():
            flows = model(image1.to(dtype), image2.to(dtype), num_flow_updates=updates)
        assert len(flows) == updates
        sum((f * w.to(dtype)).mean() for f, w in zip(flows, weights)).backward()
        return [f.detach() for f in flows]

    flows_o, flows_c, flows_r = run(original, torch.float32), run(converted, torch.float32), \
        run(reference, torch.float64)
    for i, (a, b, r) in enumerate(zip(flows_o, flows_c, flows_r)):
        assert a.dtype == b.dtype == torch.float32
        assert_close_to_reference(a, b, r, rtol=MODEL_RTOL, names=("original", "converted"),
                                  what=f"flow of update {i + 1}")
    grads_c = {n: p.grad for n, p in converted.named_parameters()}
    grads_c.update({BLOCK + n: g for n, g in _grads_as_torchvision(converted.update_block.recurrent_block).items()})
    grads_r = {n: p.grad for n, p in reference.named_parameters()}
    names = [n for n, p in original.named_parameters()]
    assert all(original.get_parameter(n).grad is not None for n in names)
    # The converted block's own gradients, each against its scale ...
    for n in names:
        if n.startswith(BLOCK):
            assert_close_to_reference(original.get_parameter(n).grad, grads_c[n], grads_r[n], rtol=MODEL_RTOL,
                                      names=("original", "converted"), what=f"grad of {n}")
    # ... and the whole model's gradient as one vector, against the scale of its largest
    # entry: some are zero but for rounding (a convolution's bias before a BatchNorm in
    # training mode), so each alone has no scale of its own.
    flat = [torch.cat([g[n].flatten() for n in names]) for g in
            ({n: original.get_parameter(n).grad for n in names}, grads_c, grads_r)]
    assert_close_to_reference(*flat, rtol=MODEL_RTOL, names=("original", "converted"),
                              what="the gradient of every parameter")


@pytest.mark.parametrize("which", sorted(MODELS))
def test_state_dict_round_trip(which, device):
    """A converted model's weights, trained further, load into an unconverted model
    (strict), which then predicts what the converted one does; untrained, the
    round trip gives back the original state dict exactly."""
    torch.manual_seed(1)
    original = MODELS[which]().to(device).eval()
    converted = from_torchvision_raft(copy.deepcopy(original))
    state = to_torchvision_raft_state_dict(converted)
    assert list(state) == list(original.state_dict())
    for key, value in original.state_dict().items():
        assert state[key].dtype == value.dtype and state[key].device == value.device
        assert torch.equal(state[key], value), key
    # A few optimizer steps' worth of change, bias_hh included (nonzero after them).
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    restored = MODELS[which]().to(device).eval()
    restored.load_state_dict(to_torchvision_raft_state_dict(converted), strict=True)
    size = 128 if which.startswith("torchvision") else 32
    image1, image2 = (torch.rand(1, 3, size, size, device=device) for _ in range(2))
    with torch.no_grad():
        got, want = restored(image1, image2, num_flow_updates=2), converted(image1, image2, num_flow_updates=2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


def test_not_a_raft_model():
    with pytest.raises(TypeError, match=r"from_torchvision_raft: expected torchvision's RAFT .*update_block"
                                        r"\.recurrent_block\), got Linear"):
        from_torchvision_raft(nn.Linear(2, 2))
    wrapped = nn.Module()
    wrapped.module = standin_raft("raft_small")
    with pytest.raises(TypeError, match=r"pass model\.module"):
        from_torchvision_raft(wrapped)
    with pytest.raises(TypeError, match="got str"):
        from_torchvision_raft("raft_large")


def test_not_torchvision_recurrent_block():
    model = standin_raft("raft_small")
    model.update_block.recurrent_block = nn.Conv2d(3, 3, 3)
    with pytest.raises(TypeError, match=r"expected torchvision's RAFT RecurrentBlock .*convgru1 and convgru2.*"
                                        r"got Conv2d"):
        from_torchvision_raft(model)
    block = _block("raft_large", torch.device("meta"))
    block.convgru2 = nn.Identity()
    with pytest.raises(TypeError, match=r"recurrent_block\.convgru2 to be torchvision's ConvGRU .*got Identity"):
        from_torchvision_recurrent_block(block)
    del block.convgru2
    block.convgru2 = lambda h, x: x  # a function, but not the pass-through
    with pytest.raises(TypeError, match=r"convgru2 to be torchvision's ConvGRU .*got function"):
        from_torchvision_recurrent_block(block)


def test_unsupported_layouts():
    square = RecurrentBlock(input_size=3, hidden_size=2, kernel_size=(3, 3), padding=(1, 1))
    with pytest.raises(ValueError, match=r"expected convgru1 with \(1, k\) kernels and convgru2 with \(k, 1\).*"
                                         r"got kernels \(3, 3\) and \(3, 3\)"):
        from_torchvision_recurrent_block(square)
    swapped = RecurrentBlock(input_size=3, hidden_size=2, kernel_size=((5, 1), (1, 5)), padding=((2, 0), (0, 2)))
    with pytest.raises(ValueError, match=r"got kernels \(5, 1\) and \(1, 5\)"):
        from_torchvision_recurrent_block(swapped)
    strided = RecurrentBlock(input_size=3, hidden_size=2, kernel_size=(3,), padding=(1,))
    strided.convgru1.convq.stride = (2, 2)
    with pytest.raises(ValueError, match=r"recurrent_block\.convgru1\.convq must have stride 1"):
        from_torchvision_recurrent_block(strided)
    unpadded = RecurrentBlock(input_size=3, hidden_size=2, kernel_size=(3,), padding=(0,))
    with pytest.raises(ValueError, match=r"recurrent_block\.convgru1\.convr must pad"):
        from_torchvision_recurrent_block(unpadded)


def test_partly_frozen_block_and_converted_twice():
    block = RecurrentBlock(input_size=3, hidden_size=2)
    block.convgru2.convq.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"either all or none may require grad; got requires_grad=False for "
                                         r"\['convgru2\.convq\.weight'\]"):
        from_torchvision_recurrent_block(block)
    model = from_torchvision_raft(standin_raft("raft_large"))
    with pytest.raises(ValueError, match="converted already"):
        from_torchvision_raft(model)
    with pytest.raises(ValueError, match="converted already"):
        from_torchvision_recurrent_block(model.update_block.recurrent_block)


def test_state_dict_of_an_unconverted_model():
    with pytest.raises(ValueError, match=r"expected a model converted by from_torchvision_raft .*got a StandInRAFT"):
        to_torchvision_raft_state_dict(standin_raft("raft_small"))
    with pytest.raises(TypeError, match="got dict"):
        to_torchvision_raft_state_dict({})
    with pytest.raises(TypeError, match="expected a ConvGRUCell2d or SepConvGRUCell2d, got Linear"):
        TorchvisionRecurrentBlock(nn.Linear(2, 2))
