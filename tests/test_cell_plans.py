"""The cell plans (convgru_triton._plan): one frozen plan per call signature.

An eager ConvGRUCell2d or SepConvGRUCell2d step decides everything at the
first call of a signature and replays it after. These tests check that the
replay computes what the general path computes (the float64 reference for
values and every gradient), on both step paths and formulations, in loops that
feed the state back, with buffers poisoned with NaN; and that a plan is made
again whenever a fact it depends on changes, never silently reused.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import convgru_triton as cg
from convgru_triton import _plan

pytestmark = pytest.mark.triton_kernels

PATHS = {"gates": "0", "fused": "1"}


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer a plan allocates starts as NaN."""

    def allocate(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(_plan, "_allocate", allocate)


def _loop(module, x, h, steps=3):
    for _ in range(steps):
        h = module(x, h)
    return h


def _grads(module, x, h, grad_weights):
    x = x.detach().clone().requires_grad_()
    h = None if h is None else h.detach().clone().requires_grad_()
    out = _loop(module, x, h)
    # Weights with positions: a gradient in the wrong place cannot cancel out.
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weights).sum().backward()
    grads = [x.grad] + ([] if h is None else [h.grad]) + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def _pair(cls, device, dtype, reset_after, **kwargs):
    ours = cls(3, 4, reset_after=reset_after, backend="triton", device=device, dtype=dtype, **kwargs)
    ref = cls(3, 4, reset_after=reset_after, backend="torch", device=device, dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def _tolerance(dtype):
    return {torch.float32: 1e-4, torch.float16: 5e-3}[dtype]


# The fused path's variants in the slow tier: seconds each under the interpreter.
@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.slow] if p == "fused" else [])
                                  for p in sorted(PATHS)])
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
@pytest.mark.parametrize("cls", [cg.ConvGRUCell2d, cg.SepConvGRUCell2d], ids=["cell", "sep"])
@pytest.mark.parametrize("hx", ["given", "none"])
def test_plan_equals_reference(device, poisoned, path, reset_after, cls, hx):
    torch.manual_seed(0)
    dtype = torch.float32
    kwargs = {"kernel_size": 3} if cls is cg.ConvGRUCell2d else {}
    with cg.override_settings(fused_step=PATHS[path]):
        ours, ref = _pair(cls, device, dtype, reset_after, **kwargs)
        # 5 x 7 maps: no block multiple.
        x = torch.randn(2, 3, 5, 7, device=device)
        h = None if hx == "none" else torch.randn(2, 4, 5, 7, device=device)
        with torch.no_grad():
            got = _loop(ours, x, h)
            want = _loop(ref, x.double(), None if h is None else h.double())
        torch.testing.assert_close(got.double(), want, rtol=_tolerance(dtype), atol=_tolerance(dtype))
        out, grads = _grads(ours, x, h, True)
        out_ref, grads_ref = _grads(ref, x.double(), None if h is None else h.double(), True)
        torch.testing.assert_close(out.double(), out_ref, rtol=_tolerance(dtype), atol=_tolerance(dtype))
        assert len(grads) == len(grads_ref)
        for g, g_ref in zip(grads, grads_ref):
            assert g is not None and g.dtype == dtype
            torch.testing.assert_close(g.double(), g_ref, rtol=_tolerance(dtype), atol=_tolerance(dtype))
        plans = ours.__dict__["_cell_plans"]
        kinds = {(p.first.path if isinstance(p, _plan.SepPlan) else p.path) for p in plans.values()}
        assert kinds == {path}, f"the {path} path did not run: {kinds}"


@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_plan_with_an_even_kernel_equals_reference(device, poisoned, reset_after):
    """An even kernel pads asymmetrically ('same' output size): the plan's
    convolutions and their backward, bias gradients included, go through the
    padded functions, and still equal the reference in a loop."""
    ours, ref = _pair(cg.ConvGRUCell2d, device, torch.float32, reset_after, kernel_size=(2, 3))
    x, h = torch.randn(2, 3, 5, 6, device=device), torch.randn(2, 4, 5, 6, device=device)
    out, grads = _grads(ours, x, h, True)
    out_ref, grads_ref = _grads(ref, x.double(), h.double(), True)
    torch.testing.assert_close(out.double(), out_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4)
    (plan,) = ours.__dict__["_cell_plans"].values()
    assert plan.path == "gates" and plan.conv_backward.__name__ == "backward_padded"


def test_plan_channels_last_state(device, poisoned):
    """A channels_last state stays channels_last, and its plan's buffers follow it."""
    torch.manual_seed(0)
    ours, ref = _pair(cg.ConvGRUCell2d, device, torch.float32, False, kernel_size=3)
    x = torch.randn(2, 3, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    h = torch.randn(2, 4, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = _loop(ours, x, h)
        want = _loop(ref, x.double(), h.double())
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_plan_reused_and_remade(device):
    """The same signature replays its plan; any fact in the signature makes a new one."""
    cell = cg.ConvGRUCell2d(3, 4, 3, backend="triton", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    with torch.no_grad():
        cell(x, h)
        cell(x, h)
    plans = cell.__dict__["_cell_plans"]
    assert len(plans) == 1
    with torch.no_grad():
        cell(x, None)                                   # no hx
    assert len(plans) == 2
    cell(x, h.requires_grad_())                         # gradients
    assert len(plans) == 3
    with cg.override_settings(fused_step="1"), torch.no_grad():
        cell(x, h)                                      # another setting
    assert len(plans) == 4
    with torch.no_grad():
        cell(torch.randn(1, 3, 5, 6, device=device), torch.randn(1, 4, 5, 6, device=device))  # another size
    assert len(plans) == 5
    before = cell(x, h).detach()
    count = len(plans)
    cell.to(memory_format=torch.channels_last)          # the same Parameters, other strides
    torch.testing.assert_close(cell(x, h), before)
    assert len(plans) == count + 1


def test_plan_follows_replaced_and_updated_weights(device):
    """A plan reads the module's parameters at every call: new values, in place
    or as a new Parameter, are used at once."""
    cell = cg.ConvGRUCell2d(3, 4, 3, backend="triton", device=device)
    ref = cg.ConvGRUCell2d(3, 4, 3, backend="torch", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    for step in range(3):
        ref.load_state_dict(cell.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(cell(x, h), ref(x, h))
            if step == 0:
                cell.weight_hh.mul_(0.5)
            else:
                cell.weight_ih = torch.nn.Parameter(torch.randn_like(cell.weight_ih))


def test_modules_with_plans_copy_and_pickle(device):
    sep = cg.SepConvGRUCell2d(3, 4, backend="triton", device=device)
    x = torch.randn(1, 3, 4, 6, device=device)
    with torch.no_grad():
        want = sep(x)
    assert sep.__dict__["_cell_plans"]
    for other in (copy.deepcopy(sep), pickle.loads(pickle.dumps(sep))):
        assert "_cell_plans" not in other.__dict__
        with torch.no_grad():
            torch.testing.assert_close(other(x), want)


def test_bad_input_after_a_plan_still_raises(device):
    """A signature seen before does not skip the checks of another one."""
    cell = cg.ConvGRUCell2d(3, 4, 3, backend="triton", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    with torch.no_grad():
        cell(x, h)
        with pytest.raises(ValueError, match="hx must have shape"):
            cell(x, torch.randn(1, 4, 4, 5, device=device))
        with pytest.raises(ValueError, match="input must have 3 channels"):
            cell(torch.randn(1, 2, 4, 6, device=device), h)
        with pytest.raises(TypeError, match="input must be a torch.Tensor"):
            cell([1.0], h)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_plan_under_autocast_equals_general_path(device, path):
    """Under autocast (float16 here: the interpreter has no bfloat16) a plan
    casts once and replays: the result and every gradient equal the general
    path's, which casts by the operator's autocast rule; parameter gradients
    stay float32."""
    torch.manual_seed(0)
    with cg.override_settings(fused_step=PATHS[path]):
        sep = cg.SepConvGRUCell2d(3, 4, backend="triton", device=device)
        x, h = torch.randn(2, 3, 5, 7, device=device), torch.randn(2, 4, 5, 7, device=device)
        results = []
        for planned in (True, False):
            step = sep if planned else (lambda x_, h_: _plan._sep_general(sep, x_, h_))
            xx, hh = x.clone().requires_grad_(), h.clone().requires_grad_()
            with torch.autocast(device.type, dtype=torch.float16):
                out = _loop(step, xx, hh)
            assert out.dtype == torch.float16
            out.float().sum().backward()
            results.append([out] + [xx.grad, hh.grad] + [p.grad for p in sep.parameters()])
            sep.zero_grad(set_to_none=True)
        for a, b in zip(*results):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
        assert all(p.grad is None for p in sep.parameters())
        assert results[0][3].dtype == torch.float32


def test_autocast_weight_casts_follow_updates(device):
    """Under autocast, after optimizer steps and a new Parameter (each between
    two autocast regions) the results are the reference's."""
    torch.manual_seed(0)
    cell = cg.ConvGRUCell2d(3, 4, 3, backend="triton", device=device)
    ref = cg.ConvGRUCell2d(3, 4, 3, backend="torch", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
    for step in range(3):
        ref.load_state_dict(cell.state_dict())
        with torch.autocast(device.type, dtype=torch.float16):
            out = cell(x, h)
            want = ref(x, h)
        torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
        out.float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            cell.bias_hh = torch.nn.Parameter(torch.randn_like(cell.bias_hh))
            optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)


@pytest.mark.parametrize("cls", [cg.ConvGRUCell2d, cg.SepConvGRUCell2d], ids=["cell", "sep"])
def test_autocast_weight_casts_kept_for_the_region(device, cls, monkeypatch):
    """A plan casts the weights once per autocast region, as autocast's own
    weight cache does; a new region, an in-place update and a replaced
    Parameter cast again, and where autocast keeps nothing (its cache off,
    inference mode, weights that do not require grad) every call casts."""
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3} if cls is cg.ConvGRUCell2d else {}
    module = cls(3, 4, backend="triton", device=device, **kwargs)
    ref = cls(3, 4, backend="torch", device=device, **kwargs)
    halves = 1 if cls is cg.ConvGRUCell2d else 2
    x, h0 = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    # float16 against float32 weights: a stale cast (the weights halved) is off by far more
    casts = []
    cast_all = _plan._WeightCasts._all
    monkeypatch.setattr(_plan._WeightCasts, "_all", lambda self, *w: casts.append(1) or cast_all(self, *w))

    def check(**autocast):
        ref.load_state_dict(module.state_dict())
        with torch.autocast(device.type, dtype=torch.float16, **autocast):
            out, want = _loop(module, x, h0), _loop(ref, x, h0)
        torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)

    def cast_count(run):  # casts per half
        del casts[:]
        run()
        return len(casts) / halves

    assert cast_count(check) == 1  # three steps, one region
    assert cast_count(check) == 1  # a new region: cast again
    assert cast_count(lambda: check(cache_enabled=False)) == 3

    def in_place_update():
        with torch.autocast(device.type, dtype=torch.float16):
            module(x, h0)
            with torch.no_grad():
                for param in module.parameters():
                    param.mul_(0.5)  # moves the version
            ref.load_state_dict(module.state_dict())
            torch.testing.assert_close(module(x, h0), ref(x, h0), rtol=1e-2, atol=1e-2)

    assert cast_count(in_place_update) == 2

    def replaced_parameter():
        with torch.autocast(device.type, dtype=torch.float16):
            module(x, h0)
            cell = module if cls is cg.ConvGRUCell2d else module.vertical
            cell.weight_hh = torch.nn.Parameter(torch.randn_like(cell.weight_hh))
            ref.load_state_dict(module.state_dict())
            torch.testing.assert_close(module(x, h0), ref(x, h0), rtol=1e-2, atol=1e-2)

    assert cast_count(replaced_parameter) == (halves + 1) / halves  # the replaced one's half again
    with torch.inference_mode():
        assert cast_count(check) == 3
    module.requires_grad_(False)
    assert cast_count(check) == 3


def test_autocast_kept_casts_across_backward_in_one_region(device):
    """Two training iterations inside one autocast region reuse the kept
    casts after the first backward freed its graph: both iterations'
    parameter gradients accumulate as the reference's do."""
    torch.manual_seed(0)
    cell, ref = (cg.ConvGRUCell2d(3, 4, 3, backend=b, device=device) for b in ("triton", "torch"))
    ref.load_state_dict(cell.state_dict())
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    for module in (cell, ref):
        with torch.autocast(device.type, dtype=torch.float16):
            for _ in range(2):
                _loop(module, x, h).float().sum().backward()
    for a, b in zip(cell.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("cls", [cg.ConvGRUCell2d, cg.SepConvGRUCell2d], ids=["cell", "sep"])
def test_autocast_no_grad_casts_not_reused_with_grad(device, cls):
    """A no_grad call and then a training call in one autocast region: the
    training call does not reuse the casts made without autograd history (the
    weights would get no gradient), so every parameter gets the reference's."""
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3} if cls is cg.ConvGRUCell2d else {}
    ours = cls(3, 4, backend="triton", device=device, **kwargs)
    ref = cls(3, 4, backend="torch", device=device, **kwargs)
    ref.load_state_dict(ours.state_dict())
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    for module in (ours, ref):
        with torch.autocast(device.type, dtype=torch.float16):
            with torch.no_grad():
                module(x, h)
            module(x, h).float().sum().backward()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-2)


def test_data_swap_seen_and_old_storage_released(device):
    """A new storage under the same Parameter (``.data =``) inside one autocast
    region is seen at the next call, and nothing the module keeps (plans,
    kept casts, the hidden weight's row views) holds the old storage after it."""
    torch.manual_seed(0)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    for autocast in (False, True):
        cell = cg.ConvGRUCell2d(3, 4, 3, backend="triton", device=device)
        ref = cg.ConvGRUCell2d(3, 4, 3, backend="torch", device=device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            cell(x, h).float().sum().backward()
            old = cell.weight_hh.untyped_storage().data_ptr()
            cell.weight_hh.data = cell.weight_hh.data * 0.5
            ref.load_state_dict(cell.state_dict())
            torch.testing.assert_close(cell(x, h).float(), ref(x, h).float(), rtol=1e-2, atol=1e-2)
        held = [*(v for casts in cell._weight_casts.values() for v in (casts.kept or ()) + casts.split),
                *(v for plan in cell._cell_plans.values() for v in vars(plan).values())]
        tensors = [t for v in held for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
        assert tensors and all(t.untyped_storage().data_ptr() != old for t in tensors)


# --- what a plan must notice (each found by review) ----------------------------


def test_a_trainable_bias_alone_gets_its_gradient(device):
    cell, ref = _pair(cg.ConvGRUCell2d, device, torch.float32, False, kernel_size=3)
    for module in (cell, ref):
        module.requires_grad_(False)
        module.bias_hh.requires_grad_(True)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    cell(x, h).sum().backward()
    ref(x.double(), h.double()).sum().backward()
    assert cell.bias_hh.grad is not None
    torch.testing.assert_close(cell.bias_hh.grad.double(), ref.bias_hh.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [cg.ConvGRUCell2d, cg.SepConvGRUCell2d], ids=["cell", "sep"])
def test_autocast_sees_unfrozen_weights_and_data_updates(device, cls):
    """Unfreezing the weights and an update through ``.data`` (which moves
    neither version nor storage) between two autocast regions are seen at the
    next call."""
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3} if cls is cg.ConvGRUCell2d else {}
    module = cls(3, 4, backend="triton", device=device, **kwargs)
    ref = cls(3, 4, backend="torch", device=device, **kwargs)
    x = torch.randn(1, 3, 4, 6, device=device, requires_grad=True)
    h = torch.randn(1, 4, 4, 6, device=device)
    module.requires_grad_(False)
    with torch.autocast(device.type, dtype=torch.float16):
        module(x, h).float().sum().backward()
    module.requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.float16):
        module(x, h).float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())
    for param in module.parameters():
        param.data -= 0.1 * param.grad  # the tutorial's update: no version bump
    ref.load_state_dict(module.state_dict())
    with torch.autocast(device.type, dtype=torch.float16):
        torch.testing.assert_close(module(x, h), ref(x, h), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bias", ["sliced", "expanded"])
def test_strided_biases(device, bias):
    """Biases that are views (docs/errors.md: valid) give the reference's
    results, also after a plan was made for dense ones."""
    torch.manual_seed(0)
    cell, ref = _pair(cg.ConvGRUCell2d, device, torch.float32, False, kernel_size=3)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    with torch.no_grad():
        cell(x, h)
        if bias == "sliced":
            b = torch.randn(24, device=device)[::2]
        else:
            b = torch.randn(1, device=device).expand(12)
        cell.bias_ih = torch.nn.Parameter(b)
        ref.bias_ih = torch.nn.Parameter(b.double())
        torch.testing.assert_close(cell(x, h).double(), ref(x.double(), h.double()), rtol=1e-4, atol=1e-4)


def test_checkpointing_a_separable_cell_from_its_first_call(device):
    """torch.utils.checkpoint recomputes the forward: the first call of a
    signature must save what the recomputation saves."""
    torch.manual_seed(0)
    sep, ref = _pair(cg.SepConvGRUCell2d, device, torch.float32, False)
    x = torch.randn(1, 3, 4, 6, device=device, requires_grad=True)
    h = torch.randn(1, 4, 4, 6, device=device, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(sep, x, h, use_reentrant=False)
    out.sum().backward()
    xr, hr = x.detach().double().requires_grad_(), h.detach().double().requires_grad_()
    ref(xr, hr).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-4)


def test_separable_cell_follows_changed_module_arguments(device):
    torch.manual_seed(0)
    sep = cg.SepConvGRUCell2d(3, 4, backend="triton", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    with torch.no_grad():
        sep(x, h)
        for half in (sep.horizontal, sep.vertical):
            half.reset_after = True
        ref = cg.SepConvGRUCell2d(3, 4, reset_after=True, backend="torch", device=device)
        ref.load_state_dict(sep.state_dict())
        torch.testing.assert_close(sep(x, h), ref(x, h), rtol=1e-5, atol=1e-5)


def test_separable_cell_refuses_mixed_dtypes(device):
    sep = cg.SepConvGRUCell2d(3, 4, backend="triton", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    with pytest.raises(ValueError, match="hx must have the same dtype as input"):
        sep(x, h.half())


def test_saved_tensors_in_another_layout(device):
    """Saved-tensor hooks may give the saved tensors back in another layout
    (``save_on_cpu`` unpacks contiguous copies): the backward conforms them."""
    torch.manual_seed(0)
    cell, ref = _pair(cg.ConvGRUCell2d, device, torch.float32, False, kernel_size=3)
    cl = torch.channels_last
    x = torch.randn(1, 3, 4, 6, device=device).contiguous(memory_format=cl)
    h = torch.randn(1, 4, 4, 6, device=device).contiguous(memory_format=cl).requires_grad_()
    with torch.no_grad():
        cell(x, h)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
        out = cell(x, h)
    out.sum().backward()
    hr = h.detach().double().requires_grad_()
    ref(x.double(), hr).sum().backward()
    torch.testing.assert_close(h.grad.double(), hr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cell.weight_hh.grad.double(), ref.weight_hh.grad, rtol=1e-4, atol=1e-4)


def test_bias_removed_after_a_plan(device):
    cell = cg.ConvGRUCell2d(3, 4, 3, backend="triton", device=device)
    ref = cg.ConvGRUCell2d(3, 4, 3, bias=False, backend="torch", device=device)
    x, h = torch.randn(1, 3, 4, 6, device=device), torch.randn(1, 4, 4, 6, device=device)
    with torch.no_grad():
        cell(x, h)
        cell.bias_ih = cell.bias_hh = None
        ref.load_state_dict(cell.state_dict())
        torch.testing.assert_close(cell(x, h), ref(x, h))
