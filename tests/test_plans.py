"""The cell's checks run once per (shapes, dtypes, devices, arguments) and a
cached plan is replayed; anything the checks look at that changes must bring
the checks back."""

import pytest
import torch

import convgru_triton
import convgru_triton._backend as backend_module
import convgru_triton.functional as functional
from convgru_triton import ConvGRUCell2d, conv_gru_cell


@pytest.fixture
def counted_plans(monkeypatch):
    calls = []
    plan_cell = functional._plan_cell

    def counting(*args, **kwargs):
        calls.append(1)
        return plan_cell(*args, **kwargs)

    monkeypatch.setattr(functional, "_plan_cell", counting)
    monkeypatch.setattr(functional, "_CELL_PLANS", {})
    return calls


def test_checks_run_once_per_shape(counted_plans, device):
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    x, h = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 4, 5, 5, device=device)
    for _ in range(3):
        cell(x, h)
    assert len(counted_plans) == 1
    cell(torch.randn(1, 3, 5, 5, device=device), torch.randn(1, 4, 5, 5, device=device))  # another batch: checked again
    cell(x)  # no state: another key
    assert len(counted_plans) == 3


def test_changed_parameters_are_checked_again(counted_plans, device):
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    x, h = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 4, 5, 5, device=device)
    cell(x, h)
    with torch.no_grad():
        cell.weight_hh.data = torch.randn(12, 4, 3, 5, device=device)  # same object, other kernel size
    with pytest.raises(ValueError, match="must share the kernel size"):
        cell(x, h)
    with torch.no_grad():
        cell.weight_hh.data = torch.randn(12, 4, 3, 3, device=device)
    cell(x, h)
    cell.double()  # parameters change dtype in place: the float32 plan must not be replayed
    with pytest.raises(ValueError, match="input must have the same dtype as weight_ih"):
        cell(x, h)


def test_bad_state_after_a_good_call_still_raises(counted_plans, device):
    cell = ConvGRUCell2d(3, 4, 3, device=device)
    x = torch.randn(2, 3, 5, 5, device=device)
    cell(x, torch.randn(2, 4, 5, 5, device=device))
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 4, 5, 5\), got \(2, 4, 5, 6\)"):
        cell(x, torch.randn(2, 4, 5, 6, device=device))
    with pytest.raises(TypeError, match="hx must be a torch.Tensor"):
        cell(x, [1.0])


def test_unhashable_arguments_take_the_checked_path(counted_plans, device):
    w_ih, w_hh = torch.randn(12, 3, 3, 3, device=device), torch.randn(12, 4, 3, 3, device=device)
    x, h = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 4, 5, 5, device=device)
    a = conv_gru_cell(x, h, w_ih, w_hh, dilation=[1, 2])  # a list: no cache key, checked every call
    b = conv_gru_cell(x, h, w_ih, w_hh, dilation=[1, 2])
    assert torch.equal(a, b)
    assert len(counted_plans) == 2
    assert torch.equal(conv_gru_cell(x, h, w_ih, w_hh, dilation=(1, 2)), a)


@pytest.mark.parametrize("form", ["functional", "module"])
def test_forced_triton_rechecks_the_interpreter(monkeypatch, counted_plans, form):
    """A cached plan for Triton on CPU tensors (the interpreter) is refused once
    the interpreter is off, as the first call would have been: the functional
    form's plan and a module's cell plan alike.

    About CPU tensors by definition, so on the CPU on every machine. The
    interpreter is only pretended on: the step itself (the replay of the plan,
    the kernels) is replaced, as what is tested is the checks around it, and
    compiled kernels cannot run on CPU tensors."""
    from convgru_triton import _plan

    cpu = torch.device("cpu")
    replayed = []
    monkeypatch.setattr(functional, "_replay_cell", lambda cell_plan, *args: replayed.append(cell_plan))
    monkeypatch.setattr(_plan, "run", lambda p, *args: replayed.append(p))
    cell = ConvGRUCell2d(3, 4, 3, backend="triton", device=cpu)
    x, h = torch.randn(1, 3, 4, 4, device=cpu), torch.randn(1, 4, 4, 4, device=cpu)
    if form == "functional":
        def step(x, h):
            return conv_gru_cell(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, backend="triton")
    else:
        step = cell
    monkeypatch.setattr(backend_module, "_interpreter_enabled", lambda: True)
    step(x, h)
    step(x, h)  # the cached plan, replayed
    assert len(counted_plans) == 1 and len(replayed) == 2
    assert replayed[0].recheck if form == "module" else replayed[0].use_triton and replayed[0].recheck_backend
    monkeypatch.setattr(backend_module, "_interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        step(x, h)
    assert len(replayed) == 2


def test_settings_are_part_of_the_key(counted_plans, environment_at_import, device):
    """A change of the settings brings the checks back; going back to settings
    planned for before finds their plan again (an override around every call
    plans once per settings)."""
    w_ih, w_hh = torch.randn(12, 3, 3, 3, device=device), torch.randn(12, 4, 3, 3, device=device)
    x, h = torch.randn(1, 3, 4, 4, device=device), torch.randn(1, 4, 4, 4, device=device)

    def cell(x, h):
        return conv_gru_cell(x, h, w_ih, w_hh)

    with convgru_triton.override_settings(backend="torch"):
        cell(x, h)
        cell(x, h)
    assert len(counted_plans) == 1
    cell(x, h)
    assert len(counted_plans) == 2
    for _ in range(3):
        with convgru_triton.override_settings(backend="torch"):
            cell(x, h)
        cell(x, h)
    assert len(counted_plans) == 2
    environment_at_import(CONVGRU_TRITON_BACKEND="nonsense")
    with pytest.raises(ValueError, match="CONVGRU_TRITON_BACKEND"):
        cell(x, h)


def test_autocast_check_sees_every_device_type():
    """The plain-eager check asks one C call whether any autocast is on, for CPU
    and CUDA tensors; that call does not cover every device type (not "mps"
    in torch 2.13), so for others autocast is asked about the device itself."""
    from convgru_triton.ops.sequence import op as conv_gru

    assert conv_gru.autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv_gru.autocast_dtype("cpu") == torch.bfloat16
    assert conv_gru.autocast_dtype("meta") is None  # no autocast there: asking must not raise
    if torch.amp.is_autocast_available("mps"):
        torch.set_autocast_enabled("mps", True)
        try:
            assert conv_gru.autocast_dtype("mps") is not None
        finally:
            torch.set_autocast_enabled("mps", False)
