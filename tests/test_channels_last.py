"""channels_last input stays channels_last end to end, without hidden copies.

For every layout check:
* outputs: the cell's h', every per-step frame ``output[t]`` (and ``output[:, t]``
  with batch_first) and every ``h_n[i]`` are channels_last; so are the gradients
  of a channels_last input and state;
* no hidden layout conversions in the forward pass: no ``copy_``/``clone``/
  ``_to_copy`` aten op outside the kernels changes the memory layout of what it
  copies (recorded with a TorchDispatchMode, paused while a Triton kernel runs,
  since the interpreter copies tensors on CPU);
* Triton backend: every tensor a launcher hands a kernel is a view of the
  caller's tensor (``_conforming`` made no copy), has channels innermost, and every
  launch uses the channels_last element order.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convgru_triton import ConvGRU2d, ConvGRUCell2d, SepConvGRUCell2d
from convgru_triton.ops import conv_gru_cell as op

CL = torch.channels_last
BACKENDS = ["torch", "triton"]
COPY_OPS = {"aten.copy_.default", "aten.clone.default", "aten._to_copy.default"}


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL)


def _all_frames_cl(t: torch.Tensor) -> bool:
    """Every (B, C, H, W) slice ``t[i]`` of an (A, B, C, H, W) tensor is channels_last."""
    return all(_is_cl(t[i]) for i in range(t.shape[0])) and t.stride(2) == 1


def _stride_order(t: torch.Tensor):
    """Dims from innermost to outermost (dims of size 1 left out): the layout."""
    return tuple(sorted((d for d in range(t.dim()) if t.shape[d] > 1), key=lambda d: (t.stride(d), -d)))


class _CopyRecorder(TorchDispatchMode):
    """Records copies that change the memory layout (e.g. channels_last to
    contiguous). Copies within one layout (a step's state written into its slot
    of the output) move data the computation needs and are not counted."""

    def __init__(self):
        super().__init__()
        self.copies = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if not self.paused and name in COPY_OPS:
            dst, src = (args[0], args[1]) if name == "aten.copy_.default" else (out, args[0])
            if (isinstance(src, torch.Tensor) and src.dim() == dst.dim() and 0 not in src.stride()
                    and _stride_order(src) != _stride_order(dst)):
                self.copies.append(f"{name}: {tuple(src.shape)} strides {src.stride()} -> {dst.stride()}")
        return out


class _PausingKernel:
    """Stands in for a Triton kernel: launches it with the recorder paused."""

    def __init__(self, kernel, recorder):
        self._kernel, self._recorder = kernel, recorder
        self.fn = getattr(kernel, "fn", None)  # its parameters (the launchers read them to replay it)

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            paused, self._recorder.paused = self._recorder.paused, True
            try:
                return launch(*args, **kwargs)
            finally:
                self._recorder.paused = paused

        return run


class LayoutProbe:
    """Records copies outside kernels and what the Triton launchers receive."""

    def __init__(self, monkeypatch):
        self.recorder = _CopyRecorder()
        self.launch_tensors = []  # (shape, strides, was a view)
        self.launch_orders = []  # CHANNELS_LAST of every launch

        def recording_launch(kernel, name, out, tensors, *args, **kwargs):
            self.launch_orders.append(op._geometry(name, out).channels_last)
            self.launch_tensors.extend((tuple(t.shape), t.stride(), True) for t in tensors)
            return launch(kernel, name, out, tensors, *args, **kwargs)

        def recording_conforming(geo, tensors, *args):
            ready, copy_back = conforming(geo, tensors, *args)
            self.launch_tensors.extend((tuple(t.shape), t.stride(), False) for t, r in zip(tensors, ready) if r is not t)
            return ready, copy_back

        launch, conforming = op._launch, op._conforming
        monkeypatch.setattr(op, "_launch", recording_launch)
        monkeypatch.setattr(op, "_conforming", recording_conforming)
        for name in dir(op):
            if name.endswith("_kernel") and hasattr(getattr(op, name), "__getitem__"):
                monkeypatch.setattr(op, name, _PausingKernel(getattr(op, name), self.recorder))

    @contextlib.contextmanager
    def forward(self):
        with self.recorder:
            yield

    def check_launches(self, backend):
        if backend != "triton":
            assert not self.launch_tensors
            return
        assert self.launch_orders and all(self.launch_orders), "a kernel ran in the contiguous element order"
        for shape, strides, was_view in self.launch_tensors:
            assert was_view, f"a launcher copied a tensor of shape {shape}, strides {strides}"
            if len(shape) == 4 and shape[1] > 1:
                assert strides[1] == 1, f"a kernel got channels-outer strides {strides} for shape {shape}"

    def check_no_copies(self):
        assert not self.recorder.copies, f"hidden layout-changing copies in the forward pass: {self.recorder.copies}"


def _dev(backend, device):
    return device if backend == "triton" else torch.device("cpu")


def _cl_sequence(t, n, c, h, w, device, storage="TN"):
    """(T, N, C, H, W) with channels_last frames, stored T-major ("TN") or N-major ("NT")."""
    if storage == "TN":
        return torch.randn(t, n, h, w, c, device=device).permute(0, 1, 4, 2, 3)
    return torch.randn(n, t, h, w, c, device=device).permute(1, 0, 4, 2, 3)


@pytest.mark.parametrize("reset_after", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_keeps_channels_last(backend, reset_after, device, monkeypatch):
    dev = _dev(backend, device)
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, reset_after=reset_after, backend=backend, device=dev)
    x = torch.randn(2, 3, 5, 6, device=dev).to(memory_format=CL).requires_grad_()
    h = torch.randn(2, 4, 5, 6, device=dev).to(memory_format=CL).requires_grad_()
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        h_new = cell(x, h)
        h_zero = cell(x)  # state omitted: the zero state follows the input's layout
    probe.check_no_copies()
    assert _is_cl(h_new) and not h_new.is_contiguous()
    assert _is_cl(h_zero)
    (h_new * h_new.detach()).sum().backward()
    assert _is_cl(x.grad) and _is_cl(h.grad)
    probe.check_launches(backend)
    # Unbatched (C, H, W) with channels innermost.
    out = cell(x[0].detach(), h[0].detach())
    assert out.stride(0) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_separable_cell_keeps_channels_last(backend, device, monkeypatch):
    dev = _dev(backend, device)
    cell = SepConvGRUCell2d(3, 4, 5, backend=backend, device=dev)
    x = torch.randn(2, 3, 6, 7, device=dev).to(memory_format=CL)
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        out = cell(x)
    probe.check_no_copies()
    probe.check_launches(backend)
    assert _is_cl(out)


@pytest.mark.parametrize("reset_after", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_sequence_keeps_channels_last(backend, reset_after, num_layers, device, monkeypatch):
    dev = _dev(backend, device)
    torch.manual_seed(1)
    gru = ConvGRU2d(3, 4, 3, num_layers=num_layers, reset_after=reset_after, backend=backend, device=dev)
    x = _cl_sequence(3, 2, 3, 5, 6, dev).requires_grad_()
    hx = torch.randn(num_layers, 2, 5, 6, 4, device=dev).permute(0, 1, 4, 2, 3)
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        output, h_n = gru(x)
        output2, h_n2 = gru(x, hx)
    probe.check_no_copies()
    for out, hn in ((output, h_n), (output2, h_n2)):
        assert _all_frames_cl(out), f"output strides {out.stride()}"
        assert _all_frames_cl(hn), f"h_n strides {hn.stride()}"
    (output * output.detach()).sum().backward()
    assert _all_frames_cl(x.grad)
    probe.check_launches(backend)
    # Unbatched (T, C, H, W) input.
    out, hn = gru(x[:, 0].detach())
    assert out.stride(1) == 1 and hn.stride(1) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bidirectional_keeps_channels_last(backend, device, monkeypatch):
    dev = _dev(backend, device)
    gru = ConvGRU2d(3, 4, 3, num_layers=2, bidirectional=True, backend=backend, device=dev)
    x = _cl_sequence(3, 2, 3, 5, 6, dev)
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        output, h_n = gru(x)
    probe.check_no_copies()
    assert _all_frames_cl(output), f"output strides {output.stride()}"
    assert _all_frames_cl(h_n), f"h_n strides {h_n.stride()}"
    probe.check_launches(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_first_keeps_channels_last(backend, device, monkeypatch):
    dev = _dev(backend, device)
    gru = ConvGRU2d(3, 4, 3, batch_first=True, backend=backend, device=dev)
    x = _cl_sequence(3, 2, 3, 5, 6, dev, storage="NT").transpose(0, 1)  # (N, T, C, H, W), N-major storage
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        output, h_n = gru(x)
    assert _all_frames_cl(output.transpose(0, 1)), f"output strides {output.stride()}"
    assert _all_frames_cl(h_n), f"h_n strides {h_n.stride()}"
    probe.check_no_copies()
    probe.check_launches(backend)


def test_probe_sees_layout_copies(monkeypatch):
    """The probe itself: a layout-changing copy in the forward pass is caught, a
    copy within one layout is not."""
    probe = LayoutProbe(monkeypatch)
    x = torch.randn(2, 3, 4, 4).to(memory_format=CL)
    with probe.forward():
        torch.empty_like(x).copy_(x)
    probe.check_no_copies()
    with probe.forward():
        x.contiguous()
    with pytest.raises(AssertionError, match="layout-changing copies.*clone"):
        probe.check_no_copies()
