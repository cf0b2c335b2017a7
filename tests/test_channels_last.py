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
  launch uses the channels_last element order. Launches are seen where kernels
  are launched: through Triton's binder (``kernel[grid](...)``) and as replays of
  a kept compiled kernel (``_replay``, which compiled kernels on a GPU take from
  the second launch of a specialization on, also through the operator's bound
  launches, which bypass the launcher functions).

Both backends run on the ``device`` fixture's device.
"""

import contextlib
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convgru_triton import ConvGRU2d, ConvGRUCell2d, SepConvGRUCell2d
from convgru_triton.ops.gates import kernels as op

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
    """Stands in for a Triton kernel: launches it with the recorder paused, and
    records the element order of the launch."""

    def __init__(self, kernel, probe):
        self._kernel, self._probe = kernel, probe
        self.fn = getattr(kernel, "fn", None)  # its parameters (the launchers read them to replay it)

    def __getitem__(self, grid):
        launch = self._kernel[grid]
        recorder = self._probe.recorder

        def run(*args, **kwargs):
            self._probe.launch_orders.append(bool(kwargs["CHANNELS_LAST"]))
            paused, recorder.paused = recorder.paused, True
            try:
                return launch(*args, **kwargs)
            finally:
                recorder.paused = paused

        return run


class LayoutProbe:
    """Records copies outside kernels and what the Triton kernels receive."""

    def __init__(self, monkeypatch):
        self.recorder = _CopyRecorder()
        self.launch_tensors = []  # (shape, strides, was a view)
        self.launch_orders = []  # CHANNELS_LAST of every launch

        def recording_launch(kernel, name, out, tensors, *args, **kwargs):
            self.launch_tensors.extend((tuple(t.shape), t.stride(), True) for t in tensors)
            return launch(kernel, name, out, tensors, *args, **kwargs)

        def recording_conforming(geo, tensors, *args):
            ready, copy_back = conforming(geo, tensors, *args)
            self.launch_tensors.extend((tuple(t.shape), t.stride(), False) for t, r in zip(tensors, ready) if r is not t)
            return ready, copy_back

        def recording_replay(entry, grid, stream, pointers):
            # A replay passes every kernel parameter in order (pointers, then the
            # integer and constexpr arguments kept in the entry), so the
            # kernel's signature names them. Replays never copy: all views.
            kernel, tail = entry[5], entry[4]
            arguments = dict(zip(inspect.signature(kernel.fn).parameters, pointers + tail))
            self.launch_orders.append(bool(arguments["CHANNELS_LAST"]))
            self.launch_tensors.extend((tuple(t.shape), t.stride(), True) for t in pointers
                                       if isinstance(t, torch.Tensor))
            return replay(entry, grid, stream, pointers)

        launch, conforming, replay = op._launch, op._conforming, op._replay
        monkeypatch.setattr(op, "_launch", recording_launch)
        monkeypatch.setattr(op, "_conforming", recording_conforming)
        monkeypatch.setattr(op, "_replay", recording_replay)
        for name in dir(op):
            if name.endswith("_kernel") and hasattr(getattr(op, name), "__getitem__"):
                monkeypatch.setattr(op, name, _PausingKernel(getattr(op, name), self))

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


def _cl_sequence(t, n, c, h, w, device, storage="TN"):
    """(T, N, C, H, W) with channels_last frames, stored T-major ("TN") or N-major ("NT")."""
    if storage == "TN":
        return torch.randn(t, n, h, w, c, device=device).permute(0, 1, 4, 2, 3)
    return torch.randn(n, t, h, w, c, device=device).permute(1, 0, 4, 2, 3)


@pytest.mark.parametrize("reset_after", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_keeps_channels_last(backend, reset_after, device, monkeypatch):
    torch.manual_seed(0)
    cell = ConvGRUCell2d(3, 4, 3, reset_after=reset_after, backend=backend, device=device)
    x = torch.randn(2, 3, 5, 6, device=device).to(memory_format=CL).requires_grad_()
    h = torch.randn(2, 4, 5, 6, device=device).to(memory_format=CL).requires_grad_()
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
    cell = SepConvGRUCell2d(3, 4, 5, backend=backend, device=device)
    x = torch.randn(2, 3, 6, 7, device=device).to(memory_format=CL)
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
    torch.manual_seed(1)
    gru = ConvGRU2d(3, 4, 3, num_layers=num_layers, reset_after=reset_after, backend=backend, device=device)
    x = _cl_sequence(3, 2, 3, 5, 6, device).requires_grad_()
    hx = torch.randn(num_layers, 2, 5, 6, 4, device=device).permute(0, 1, 4, 2, 3)
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
    gru = ConvGRU2d(3, 4, 3, num_layers=2, bidirectional=True, backend=backend, device=device)
    x = _cl_sequence(3, 2, 3, 5, 6, device)
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        output, h_n = gru(x)
    probe.check_no_copies()
    assert _all_frames_cl(output), f"output strides {output.stride()}"
    assert _all_frames_cl(h_n), f"h_n strides {h_n.stride()}"
    probe.check_launches(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_first_keeps_channels_last(backend, device, monkeypatch):
    gru = ConvGRU2d(3, 4, 3, batch_first=True, backend=backend, device=device)
    x = _cl_sequence(3, 2, 3, 5, 6, device, storage="NT").transpose(0, 1)  # (N, T, C, H, W), N-major storage
    probe = LayoutProbe(monkeypatch)
    with probe.forward():
        output, h_n = gru(x)
    assert _all_frames_cl(output.transpose(0, 1)), f"output strides {output.stride()}"
    assert _all_frames_cl(h_n), f"h_n strides {h_n.stride()}"
    probe.check_no_copies()
    probe.check_launches(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_state_follows_the_input_not_the_convolution(backend, device, monkeypatch):
    """cuDNN returns a contiguous convolution of a channels_last input where it
    has no channels_last kernel (float64; seen on an H200). With the
    state omitted, the zero state, and with it h' and every output frame, must
    still follow the channels_last input. Convolutions that return contiguous
    outputs stand in for cuDNN here, so that this runs the same on any device."""
    from convgru_triton import _conv, functional
    from convgru_triton.ops.sequence import op as conv_gru

    for dims, conv in list(_conv._CONV_FUNCTIONS.items()):
        monkeypatch.setitem(_conv._CONV_FUNCTIONS, dims,
                            lambda *args, _conv=conv, **kwargs: _conv(*args, **kwargs).contiguous())
    # The closures and plans made before hold the real convolutions: start afresh.
    monkeypatch.setattr(_conv, "_SAME_CONV", {})
    monkeypatch.setattr(conv_gru, "_PLANS", {})
    monkeypatch.setattr(functional, "_CELL_PLANS", {})
    dt = torch.float64
    torch.manual_seed(2)
    cell = ConvGRUCell2d(3, 4, 3, backend=backend, device=device, dtype=dt)
    x = torch.randn(2, 3, 5, 6, device=device, dtype=dt)
    x_cl = x.to(memory_format=CL)
    # The stand-in does return a contiguous convolution of the channels_last input.
    assert not _is_cl(_conv.conv_same(x_cl, cell.weight_ih, _conv.ConvSpec.create(2, 3)))
    h_cl = cell(x_cl)
    assert _is_cl(h_cl) and not h_cl.is_contiguous(), h_cl.stride()
    torch.testing.assert_close(h_cl, cell(x))

    gru = ConvGRU2d(3, 4, 3, num_layers=2, backend=backend, device=device, dtype=dt)
    seq = _cl_sequence(3, 2, 3, 5, 6, device).to(dt)
    output, h_n = gru(seq)
    assert _all_frames_cl(output), f"output strides {output.stride()}"
    assert _all_frames_cl(h_n), f"h_n strides {h_n.stride()}"
    output_ref, h_n_ref = gru(seq.contiguous())
    torch.testing.assert_close(output, output_ref)
    torch.testing.assert_close(h_n, h_n_ref)


def test_probe_sees_layout_copies(device, monkeypatch):
    """The probe itself: a layout-changing copy in the forward pass is caught, a
    copy within one layout is not."""
    probe = LayoutProbe(monkeypatch)
    x = torch.randn(2, 3, 4, 4, device=device).to(memory_format=CL)
    with probe.forward():
        torch.empty_like(x).copy_(x)
    probe.check_no_copies()
    with probe.forward():
        x.contiguous()
    with pytest.raises(AssertionError, match="layout-changing copies.*clone"):
        probe.check_no_copies()


@pytest.mark.parametrize("channels_last", [True, False])
def test_probe_sees_replayed_launches(device, monkeypatch, channels_last):
    """The probe itself: a replay of a kept compiled kernel (how compiled kernels
    launch from the second time on, bound launches included) is recorded with
    its element order, read from the arguments the replay passes, and still
    launched. Replayed here with a stand-in for the compiled kernel."""
    probe = LayoutProbe(monkeypatch)
    kernel = op._gru_update_fwd_kernel  # the probe's stand-in, with the kernel's parameters
    names = list(inspect.signature(kernel.fn).parameters)
    pointers = tuple(torch.empty(2, 4, 3, 5, device=device).to(memory_format=CL) for _ in range(5))
    pointers += (torch.empty(12, device=device),) * 2  # the biases
    assert names[len(pointers) - 1] == "bias_hh_ptr"
    tail = tuple(channels_last if name == "CHANNELS_LAST" else 1 for name in names[len(pointers):])
    launched = []
    entry = (lambda *args: launched.append(args), "function", "metadata", lambda grid, stream, *args: None,
             tail, kernel, (1,))
    op._replay(entry, (1,), None, pointers)
    assert len(launched) == 1
    passed = launched[0][-len(names):]
    assert len(passed) == len(pointers + tail) and all(a is b for a, b in zip(passed, pointers + tail))
    assert probe.launch_orders == [channels_last]
    if channels_last:
        probe.check_launches("triton")
    else:
        with pytest.raises(AssertionError, match="contiguous element order"):
            probe.check_launches("triton")
