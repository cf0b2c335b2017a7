"""What CUDA-graph capture needs of a step, checked on any machine.

A step captured into a CUDA graph (``torch.cuda.CUDAGraph``, or
``torch.compile(mode="reduce-overhead")``) must not synchronise with the host
nor branch in Python on tensor values: those calls fail during capture (or,
worse, are frozen into the graph). Here every cell and sequence path, both
backends, forward and backward, runs under a ``TorchFunctionMode`` that raises
on each call that reads a tensor's values on the host. On a GPU the same test
runs the compiled Triton path (launch binding included); on CPU the Triton
interpreter, which itself reads kernel arguments on the host, runs unchecked
(the package's code around it is checked).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from convgru_triton import ConvGRU2d, ConvGRUCell2d, SepConvGRUCell2d, conv_gru_cell

BACKENDS = ["torch", "triton"]

# Calls that copy tensor values to the host (a synchronisation on CUDA) or
# whose output size depends on the values (also a synchronisation).
HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique, torch.unique,
    torch.Tensor.masked_select, torch.masked_select, torch.Tensor.any, torch.any, torch.Tensor.all, torch.all,
    torch.Tensor.equal, torch.equal, torch.allclose, torch.Tensor.allclose,
}


class NoHostReads(TorchFunctionMode):
    """Raise on every call in :data:`HOST_READS`, and on moving a tensor to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            self.calls += 1
            if func in HOST_READS:
                raise AssertionError(f"host read on the step path: {getattr(func, '__name__', func)}")
            if func in (torch.Tensor.to, torch.Tensor.copy_) and any(
                isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                for a in list(args[1:]) + list(kwargs.values())
            ):
                raise AssertionError("a tensor moved to the CPU on the step path")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads():
    mode = NoHostReads()
    patched = None
    try:  # the Triton interpreter (CPU) reads its arguments on the host: not ours to check
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def unchecked_run(self, *args, **kwargs):
            mode.paused = True
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.paused = False

        InterpretedFunction.run, patched = unchecked_run, run
    except ImportError:
        pass
    try:
        with mode:
            yield mode
    finally:
        if patched is not None:
            from triton.runtime.interpreter import InterpretedFunction

            InterpretedFunction.run = patched


def test_the_mode_catches_host_reads():
    """The guard itself: each kind of host read fails under it."""
    x = torch.randn(3)
    for read in (lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: x.tolist(), lambda: x.cpu(),
                 lambda: x.nonzero(), lambda: float(x[0]), lambda: x.to("cpu")):
        with pytest.raises(AssertionError, match="host read|moved to the CPU"):
            with no_host_reads():
                read()


def _models(backend, device):
    torch.manual_seed(0)
    return {
        "cell": ConvGRUCell2d(3, 4, 3, backend=backend, device=device),
        "cell reset_after": ConvGRUCell2d(3, 4, 3, reset_after=True, backend=backend, device=device),
        "sep cell": SepConvGRUCell2d(3, 4, 5, backend=backend, device=device),
        "sequence reflect bidirectional": ConvGRU2d(3, 4, 3, num_layers=2, bidirectional=True,
                                                    padding_mode="reflect", backend=backend, device=device),
        "sequence reset_after": ConvGRU2d(3, 4, (1, 3), reset_after=True, backend=backend, device=device),
    }


@pytest.mark.parametrize("backward", [False, True], ids=["no-grad", "fwd+bwd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_reads_nothing_on_the_host(backend, backward, device):
    for name, model in _models(backend, device).items():
        sequence = isinstance(model, ConvGRU2d)
        x = torch.randn((3, 2, 3, 6, 5) if sequence else (2, 3, 6, 5), device=device, requires_grad=backward)
        states = model.num_layers * (2 if model.bidirectional else 1) if sequence else None
        h = torch.randn((states, 2, 4, 6, 5) if sequence else (2, 4, 6, 5), device=device, requires_grad=backward)
        model(x, h)  # first call: checks and plans, outside the guard (done once, before any capture)
        with no_host_reads() as mode, torch.set_grad_enabled(backward):
            out = model(x, h)
            out = out[0] if sequence else out
            if backward:
                out.backward(torch.ones_like(out))
        assert mode.calls > 0, name  # the mode saw the step's calls
        if backward:
            assert x.grad is not None and h.grad is not None, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_cell_steps_in_a_loop(backend, device):
    """RAFT's loop: the state of one step is the next step's input, 4 steps under the guard."""
    torch.manual_seed(0)
    w_ih, w_hh = torch.randn(12, 3, 3, 3, device=device), torch.randn(12, 4, 3, 3, device=device)
    b_ih, b_hh = torch.randn(12, device=device), torch.randn(12, device=device)
    x, h = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 4, 5, 5, device=device)
    conv_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend=backend)
    with no_host_reads():
        for _ in range(4):
            h = conv_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend=backend)
    assert h.shape == (2, 4, 5, 5)
