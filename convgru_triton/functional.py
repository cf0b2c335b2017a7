"""Functional forms of the ConvGRU: :func:`conv_gru_cell` (one step) and
:func:`conv_gru` (a sequence through stacked, optionally bidirectional layers).

Per step, with ``*`` a 'same'-padded convolution and gate order (r, z, n)::

    r  = sigmoid(W_ir * x + b_ir + W_hr * h + b_hr)
    z  = sigmoid(W_iz * x + b_iz + W_hz * h + b_hz)
    n  = tanh(W_in * x + b_in + W_hn * (r * h) + b_hn)     reset_after=False
    n  = tanh(W_in * x + b_in + r * (W_hn * h + b_hn))     reset_after=True
    h' = (1 - z) * h + z * n

The update gate weights the new candidate (as in RAFT); torch.nn.GRU's update
gate is ``1 - z``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _backend, _settings, _tuning
from ._backend import select_backend
from ._conv import ConvSpec, conv_same, same_conv
from ._layout import (
    cat_channels, check_kernel_sample_size, empty_in_layout, frames_channels_last, frames_in_format,
    internal_memory_format, is_channels_last, layout_setting, stack_frames,
)
from .ops.sequence.op import (
    Plan, autocast_dtype, autocast_result_dtype, conv_gru_sequence, conv_gru_step, conv_gru_step_compiled,
    fused_cell_step, fused_step_setting, plan,
)
from .ops.sequence import vmap  # noqa: F401  (registers the operators' torch.vmap rules)

Params = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def _fmt(shape) -> str:
    return str(tuple(shape))


def _kernel_size(weight: torch.Tensor) -> Tuple[int, ...]:
    """The kernel size of a (C_out, C_in, *k) weight as Python ints (under
    torch.jit.trace, sizes read from a tensor are 0-dim tensors)."""
    return tuple(int(k) for k in weight.shape[2:])


def _quiet_under_trace(fn):
    """Under torch.jit.trace, silence the TracerWarnings of the argument checks
    (Python comparisons of sizes, which record nothing in the graph). The time
    loop's length is the one size the trace fixes; docs/deploying.md says so."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.jit.is_tracing():
            return fn(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return fn(*args, **kwargs)

    return wrapper


def _check_floating(name: str, t: Optional[torch.Tensor]) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_params(params: Params, dims: int, where: str, cast: Optional[torch.dtype]) -> Tuple[int, int]:
    """Validate one cell's weights; returns (input_channels, hidden_channels).
    ``cast``: the autocast dtype, or ``None`` (see :func:`_check_same_kind`)."""
    weight_ih, weight_hh, bias_ih, bias_hh = params
    for name, t in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh"), params):
        _check_floating(f"{where}{name}", t)
    if weight_ih.dim() != dims + 2 or weight_hh.dim() != dims + 2:
        raise ValueError(
            f"{where}weight_ih and weight_hh must have {dims + 2} dims (3*hidden, channels, *kernel), "
            f"got shapes {_fmt(weight_ih.shape)} and {_fmt(weight_hh.shape)}"
        )
    gates, hidden = weight_hh.shape[0], weight_hh.shape[1]
    if gates != 3 * hidden or weight_ih.shape[0] != gates:
        raise ValueError(
            f"{where}weight_hh must have shape (3*hidden, hidden, *kernel) and weight_ih (3*hidden, "
            f"input_channels, *kernel), got {_fmt(weight_hh.shape)} and {_fmt(weight_ih.shape)}"
        )
    if hidden < 1 or weight_ih.shape[1] < 1:
        raise ValueError(
            f"{where}weight_ih and weight_hh must have at least one input and one hidden channel, "
            f"got shapes {_fmt(weight_ih.shape)} and {_fmt(weight_hh.shape)}"
        )
    if weight_ih.shape[2:] != weight_hh.shape[2:]:
        raise ValueError(
            f"{where}weight_ih and weight_hh must share the kernel size, got "
            f"{tuple(weight_ih.shape[2:])} and {tuple(weight_hh.shape[2:])}"
        )
    if (bias_ih is None) != (bias_hh is None):
        raise ValueError(f"{where}bias_ih and bias_hh must both be given or both be None")
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None and tuple(b.shape) != (gates,):
            raise ValueError(f"{where}{name} must have shape ({gates},), got {_fmt(b.shape)}")
    for name, t in zip(("weight_hh", "bias_ih", "bias_hh"), params[1:]):
        if t is not None:
            _check_same_kind(f"{where}{name}", t, "weight_ih", weight_ih, cast)
    return weight_ih.shape[1], hidden


def _check_same_kind(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor,
                     cast: Optional[torch.dtype]) -> None:
    """``t`` and ``ref`` on one device and of one dtype, as the convolutions and
    the operator will see them: under autocast (``cast``, the autocast dtype)
    after autocast's cast, which takes float32, float16 and bfloat16 tensors
    to ``cast`` and leaves float64 as it is; else as given."""
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
    if cast is None:
        if t.dtype != ref.dtype:
            hint = ""
            if name == "input" and ref_name == "weight_ih":
                hint = f": convert the input (input.to({ref.dtype})) or the parameters (module.to({t.dtype}))"
            raise ValueError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}{hint}")
    elif autocast_result_dtype(t.dtype, cast) != autocast_result_dtype(ref.dtype, cast):
        raise ValueError(
            f"{name} must have the same dtype as {ref_name} after autocast's cast to {cast} (which leaves "
            f"float64 as it is), got {name} {t.dtype} and {ref_name} {ref.dtype}"
        )


def _zeros_state(gates_x: torch.Tensor, hidden: int, input_frame: torch.Tensor) -> torch.Tensor:
    """A zero state (N, H, *S) of the gate pre-activations' dtype, channels_last
    when the caller's input is (``input_frame`` (N, C_in, *S), one frame of it)
    or the pre-activations are. The input decides first: cuDNN returns a
    contiguous convolution of a channels_last input where it has no
    channels_last kernel (float64, some small channel counts), and the state,
    which the operator's outputs follow, must not turn contiguous with it. The
    pre-activations count too, as they do in the convolution's own rule
    (channels_last weights make a channels_last output)."""
    if torch.jit.is_tracing():
        # Sized from the input's shape, so that torch.onnx.export (TorchScript)
        # keeps batch and spatial sizes dynamic: zeros sized from intermediate
        # results are folded into constants of the traced shape.
        return input_frame.new_zeros((input_frame.shape[0], hidden) + tuple(input_frame.shape[2:]))
    shape = (gates_x.shape[0], hidden) + tuple(gates_x.shape[2:])
    channels_last = is_channels_last(input_frame) or is_channels_last(gates_x)
    return empty_in_layout(shape, gates_x.dtype, gates_x.device, channels_last).zero_()


def _in_functorch_transform() -> bool:
    """Inside torch.vmap, torch.func.grad or another functorch transform:
    there ``contiguous(memory_format=torch.channels_last)`` raises ("NYI:
    querying is_contiguous inside of vmap", torch 2.13), so the layout policy
    is not applied (0.13 us per call to ask)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _internal_format(device: torch.device, dtype: torch.dtype, dims: int,
                     cast: Optional[torch.dtype], planning: bool = False) -> Optional[torch.memory_format]:
    """The layout policy (:func:`~convgru_triton._layout.internal_memory_format`)
    for tensors of ``dtype`` computed in after autocast's cast (``cast``). Not
    applied while torch.compile traces: Inductor chooses the layouts of the
    graph it compiles (explicit conversions would only pin them and add copies),
    and reading the setting there would guard the graph on it; nor under
    jit.trace, nor inside a functorch transform (unless ``planning``: a cell
    plan, cached across calls, leaves that to each call)."""
    if torch.compiler.is_compiling():
        return None
    if torch.jit.is_tracing() or (not planning and _in_functorch_transform()):
        layout_setting()  # not applied here, but a bad value raises as in eager mode
        return None
    return internal_memory_format(device, autocast_result_dtype(dtype, cast), dims)


def _to_internal(t: Optional[torch.Tensor], fmt: Optional[torch.memory_format],
                 cast: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``t`` in ``fmt`` with one copy at most: under autocast, the layout change
    and autocast's cast in one ``to`` (autocast then finds the dtype it wants
    and copies nothing); ``t`` itself when it is already in ``fmt`` and dtype.
    Differentiable; the gradient flows back in ``fmt`` and autograd's
    accumulation gives a parameter's ``.grad`` the parameter's own layout."""
    if t is None or fmt is None:
        return t
    if cast is not None and autocast_result_dtype(t.dtype, cast) != t.dtype:
        return t.to(dtype=cast, memory_format=fmt)
    return t.contiguous(memory_format=fmt)


def _frames_to_internal(t: Optional[torch.Tensor], fmt: Optional[torch.memory_format],
                        cast: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """:func:`_to_internal` for a (T, N, C, *S) stack of frames (a sequence, or
    hx's (L * D, N, H, *S)): every frame in ``fmt``, one copy at most."""
    if t is None or fmt is None:
        return t
    if cast is not None and autocast_result_dtype(t.dtype, cast) != t.dtype:
        return frames_in_format(t, fmt, cast)
    return frames_in_format(t, fmt)


def _conv_frames(sequence: torch.Tensor, weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    """The convolution of every frame of a (T, N, C, *S) sequence as one batched
    call, returned as (T, N, C_out, *S). The frames are merged in the order they
    are stored (time-major, or batch-major for a transposed batch_first input),
    so that merging is a view and the layout (e.g. channels_last) is kept."""
    steps, batch = sequence.shape[:2]
    if steps > 1 and batch > 1 and sequence.stride(1) == steps * sequence.stride(0):
        # Batch-major storage, e.g. a batch_first input seen as (T, N, ...).
        by_batch = sequence.transpose(0, 1).flatten(0, 1)
        return conv_same(by_batch, weight, spec).unflatten(0, (batch, steps)).transpose(0, 1)
    return conv_same(sequence.flatten(0, 1), weight, spec).unflatten(0, (steps, batch))


@_quiet_under_trace
def conv_gru_cell(
    input: torch.Tensor,
    hx: Optional[torch.Tensor],
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor] = None,
    bias_hh: Optional[torch.Tensor] = None,
    *,
    reset_after: bool = False,
    padding_mode: str = "zeros",
    dilation=1,
    backend: str = "auto",
) -> torch.Tensor:
    """One ConvGRU step. Functional form of :class:`~convgru_triton.ConvGRUCell2d`
    (and its 1-D and 3-D siblings; the number of spatial dims comes from the weights).

    Args:
        input: (N, C_in, *S) or unbatched (C_in, *S).
        hx: (N, H, *S) or unbatched (H, *S); ``None`` means zeros.
        weight_ih: (3H, C_in, *k), gate order (r, z, n).
        weight_hh: (3H, H, *k).
        bias_ih, bias_hh: (3H,), or both ``None``.
        reset_after: where the reset gate applies, see the module docstring.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        dilation: int or one int per spatial dim.
        backend: ``'auto'``, ``'torch'`` or ``'triton'``.

    Returns:
        h': the new state, shaped like ``hx``, in hx's memory layout (the
        input's when ``hx`` is ``None``).

    Memory layout: where ``CONVGRU_TRITON_LAYOUT`` (default ``auto``: CUDA
    float16/bfloat16) says so, input, hx, weight_ih and weight_hh are
    converted to channels_last once per call (together with autocast's cast)
    and every convolution runs channels_last; not under torch.compile. See
    docs/what-runs-where.md.

    Raises:
        TypeError, ValueError: an argument of the wrong type, dtype, device or
            shape (the message names it), or an unknown ``CONVGRU_TRITON_LAYOUT``.
    """
    if torch.compiler.is_compiling():
        # Checked and planned at trace time only, without the plan cache (a
        # cache read guards the graph, a write then recompiles it).
        cell_plan = _plan_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, padding_mode,
                               dilation, backend)
        return _replay_cell(cell_plan, input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    cell_plan = _cached_cell_plan(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, padding_mode,
                                  dilation, backend)
    return _replay_cell(cell_plan, input, hx, weight_ih, weight_hh, bias_ih, bias_hh)


def _cached_cell_plan(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, padding_mode, dilation,
                      backend) -> "_CellPlan":
    """The :class:`_CellPlan` of a call: the one of an earlier call with the
    same facts (the checks are skipped), else checked and planned now."""
    # Everything the checks look at is in the key (RAFT steps a cell 12-32
    # times per frame pair with the same shapes).
    try:
        key = (
            input.shape, input.dtype, input.device,
            None if hx is None else (hx.shape, hx.dtype, hx.device),
            weight_ih.shape, weight_ih.dtype, weight_ih.device,
            weight_hh.shape, weight_hh.dtype, weight_hh.device,
            None if bias_ih is None else (bias_ih.shape, bias_ih.dtype, bias_ih.device),
            None if bias_hh is None else (bias_hh.shape, bias_hh.dtype, bias_hh.device),
            reset_after, padding_mode, dilation, backend,
            # Moves at every change of the settings (backend, fused step, layout)
            # and of the tuning registry (files re-read, a path forced).
            _settings.generation,
            autocast_dtype(input.device.type),  # the checks compare dtypes after autocast's cast
        )
        cell_plan = _CELL_PLANS.get(key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable argument: the checks say what is wrong
        key, cell_plan = None, None
    if cell_plan is None:
        cell_plan = _plan_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, padding_mode,
                               dilation, backend)
        if key is not None:
            if len(_CELL_PLANS) >= _MAX_CELL_PLANS:
                _CELL_PLANS.clear()
            _CELL_PLANS[key] = cell_plan
    elif cell_plan.recheck_backend and not _backend._interpreter_enabled():
        select_backend(input.device, backend)  # the interpreter was switched off since: raises
    return cell_plan


class _CellPlan(NamedTuple):
    """What a :func:`conv_gru_cell` call needs beyond its tensors, from the checks."""

    batched: bool
    hidden: int
    conv_ih: Callable  # (input, weight_ih) -> gates_x
    spec: ConvSpec
    reset_after: bool
    use_triton: bool
    step: Optional[Plan]  # None while torch.compile traces: the operator runs, no eager replay to plan
    recheck_backend: bool  # Triton forced on non-CUDA tensors: only valid while the interpreter is on
    memory_format: Optional[torch.memory_format]  # the internal layout (_layout.internal_memory_format), or None
    cast: Optional[torch.dtype]  # the autocast dtype at planning (it is in the plan key)
    # May the input convolution run inside the fused step (ops.sequence.op.fused_cell_step)? Only where
    # CONVGRU_TRITON_FUSED_STEP=1, or auto with a tuning file naming the fused path for this device;
    # elsewhere (the default) the cell skips the attempt: 3-10 us per call on the CPU, stubbed launches.
    fused_cell: bool


_CELL_PLANS: dict = {}
_MAX_CELL_PLANS = 256  # distinct shapes/dtypes/devices; cleared when full


def _plan_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, reset_after, padding_mode, dilation,
               backend) -> _CellPlan:
    """Every check of :func:`conv_gru_cell` (raising on bad arguments) and the plan of its replay."""
    _check_floating("input", input)
    _check_floating("hx", hx)
    dims = weight_ih.dim() - 2 if isinstance(weight_ih, torch.Tensor) else 0
    if dims not in (1, 2, 3):
        raise ValueError(f"weight_ih must have 3, 4 or 5 dims (1-D, 2-D or 3-D ConvGRU), got {weight_ih.dim()}")
    cast = autocast_dtype(input.device.type) if isinstance(input, torch.Tensor) else None
    in_channels, hidden = _check_params((weight_ih, weight_hh, bias_ih, bias_hh), dims, "", cast)
    spec = ConvSpec.create(dims, _kernel_size(weight_ih), dilation, padding_mode)
    if input.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"input must have {dims + 2} dims (N, C_in, *spatial) or {dims + 1} dims unbatched for a "
            f"{dims}-D ConvGRU cell, got shape {_fmt(input.shape)}"
        )
    batched = input.dim() == dims + 2
    if not batched:
        input = input.unsqueeze(0)
        if hx is not None:
            if hx.dim() != dims + 1:
                raise ValueError(f"hx must have {dims + 1} dims for unbatched input, got shape {_fmt(hx.shape)}")
            hx = hx.unsqueeze(0)
    if input.shape[1] != in_channels:
        raise ValueError(f"input must have {in_channels} channels (dim {1 if batched else 0}), got shape "
                         f"{_fmt(input.shape if batched else input.shape[1:])}")
    _check_same_kind("input", input, "weight_ih", weight_ih, cast)
    expected_h = (input.shape[0], hidden) + tuple(input.shape[2:])
    if hx is not None:
        _check_same_kind("hx", hx, "input", input, cast)
        if tuple(hx.shape) != expected_h:
            raise ValueError(f"hx must have shape {_fmt(expected_h)}, got {_fmt(hx.shape)}")
    spec.check_spatial_size(input.shape[2:], "input")
    use_triton = select_backend(input.device, backend).name == "triton"
    if use_triton:
        check_kernel_sample_size(hidden, input.shape[2:])
    reset_after = bool(reset_after)
    step = None if torch.compiler.is_compiling() else plan(spec, reset_after, False, use_triton)
    fused_cell = step is not None and step.fused_step and (
        fused_step_setting() == "1" or _tuning.fused_path_possible(input.device))
    return _CellPlan(
        batched, hidden, same_conv(spec)[0], spec, reset_after, use_triton, step,
        use_triton and input.device.type != "cuda",
        _internal_format(input.device, input.dtype, dims, cast, planning=True),
        cast, fused_cell,
    )


def _replay_cell(p: _CellPlan, input, hx, weight_ih, weight_hh, bias_ih, bias_hh) -> torch.Tensor:
    if not p.batched:
        input = input.unsqueeze(0)
        hx = None if hx is None else hx.unsqueeze(0)
    fmt = p.memory_format
    if fmt is not None and _in_functorch_transform():
        fmt = None
    if fmt is not None:
        # Once per call, not once per convolution (cuDNN transposes NCHW half
        # tensors around each of its tensor-core convolutions): the state's
        # convolution, the gate math and h' then all run in ``fmt``.
        caller_channels_last = is_channels_last(input if hx is None else hx)
        input, hx = _to_internal(input, fmt, p.cast), _to_internal(hx, fmt, p.cast)
        weight_ih, weight_hh = _to_internal(weight_ih, fmt, p.cast), _to_internal(weight_hh, fmt, p.cast)
    h_new = None
    if p.fused_cell:
        # W_ih * x inside the fused step's kernels (eager only, where
        # fused_step.use_fused says so; None where it does not apply).
        h_new = fused_cell_step(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, p.step)
    if h_new is None:
        gates_x = p.conv_ih(input, weight_ih)
        if hx is None:
            hx = _zeros_state(gates_x, p.hidden, input)
        if p.step is None:  # traced by torch.compile: the step's math, for Inductor to fuse
            h_new = conv_gru_step_compiled(gates_x, hx, weight_hh, bias_ih, bias_hh, p.spec, p.reset_after)
        else:  # one step is the sequence operator's step: the same plan and kernels
            h_new = conv_gru_step(gates_x, hx, weight_hh, bias_ih, bias_hh, p.step)
    if fmt is not None and not caller_channels_last:
        h_new = h_new.contiguous()  # h' in the caller's layout (hx's, else the input's)
    return h_new if p.batched else h_new.squeeze(0)


@_quiet_under_trace
def conv_gru(
    input: torch.Tensor,
    hx: Optional[torch.Tensor],
    params: Sequence[Params],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    reset_after: bool = False,
    padding_mode: str = "zeros",
    dilation=1,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A sequence through a stacked ConvGRU. Functional form of
    :class:`~convgru_triton.ConvGRU2d` (and its 1-D and 3-D siblings).

    Args:
        input: (T, N, C_in, *S), (N, T, C_in, *S) with ``batch_first``, or
            unbatched (T, C_in, *S).
        hx: (L * D, N, H, *S), unbatched (L * D, H, *S), or ``None`` for zeros;
            L = ``num_layers``, D = 2 if ``bidirectional`` else 1.
        params: L * D tuples ``(weight_ih, weight_hh, bias_ih, bias_hh)``,
            layer-major, forward direction before reverse.
        dropout: probability of zeroing each element of every layer's output
            but the last, when ``training``.
        Others as in :func:`conv_gru_cell`.

    Returns:
        ``(output, h_n)``: output (T, N, D * H, *S) (batch first if
        ``batch_first``), the last layer's state at every step; h_n
        (L * D, N, H, *S), every layer's final state. Where the layout policy
        computes in channels_last (``CONVGRU_TRITON_LAYOUT``, as in
        :func:`conv_gru_cell`: the sequence, hx and the weights converted once
        per call), output's frames come back in the input's layout and h_n in
        hx's (the input's when ``hx`` is ``None``).
    """
    _check_floating("input", input)
    _check_floating("hx", hx)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
    directions = 2 if bidirectional else 1
    params = list(params)
    if len(params) != num_layers * directions:
        raise ValueError(
            f"params must hold num_layers * num_directions = {num_layers * directions} tuples, got {len(params)}"
        )
    first_weight = params[0][0]
    dims = first_weight.dim() - 2 if isinstance(first_weight, torch.Tensor) else 0
    if dims not in (1, 2, 3):
        raise ValueError(f"weight_ih must have 3, 4 or 5 dims (1-D, 2-D or 3-D ConvGRU), got {first_weight.dim()}")
    cast = autocast_dtype(input.device.type)
    shapes = []
    for i, p in enumerate(params):
        layer, direction = divmod(i, directions)
        where = f"params[{i}] (layer {layer}{', reverse' if direction else ''}): "
        shapes.append(_check_params(tuple(p), dims, where, cast))
    hidden = shapes[0][1]
    for i, (c_in, h) in enumerate(shapes):
        expected_in = shapes[0][0] if i < directions else hidden * directions
        if h != hidden or c_in != expected_in:
            raise ValueError(
                f"params[{i}] must map {expected_in} input channels to {hidden} hidden channels, "
                f"got {c_in} -> {h}"
            )
    spec = ConvSpec.create(dims, _kernel_size(first_weight), dilation, padding_mode)

    if input.dim() not in (dims + 2, dims + 3):
        raise ValueError(
            f"input must have {dims + 3} dims ({'N, T' if batch_first else 'T, N'}, C_in, *spatial) or "
            f"{dims + 2} dims unbatched (T, C_in, *spatial) for a {dims}-D ConvGRU, got shape {_fmt(input.shape)}"
        )
    batched = input.dim() == dims + 3
    given_shape = tuple(input.shape)
    if not batched:
        input = input.unsqueeze(1)
        if hx is not None:
            if hx.dim() != dims + 2:
                raise ValueError(f"hx must have {dims + 2} dims for unbatched input, got shape {_fmt(hx.shape)}")
            hx = hx.unsqueeze(1)
    elif batch_first:
        input = input.transpose(0, 1)
    steps, batch = input.shape[0], input.shape[1]
    if steps == 0:
        raise ValueError("input must hold at least one time step, got sequence length 0")
    if input.shape[2] != shapes[0][0]:
        raise ValueError(f"input must have {shapes[0][0]} channels, got {input.shape[2]} (shape {_fmt(given_shape)})")
    _check_same_kind("input", input, "weight_ih", first_weight, cast)
    spatial = tuple(input.shape[3:])
    expected_h = (num_layers * directions, batch, hidden) + spatial
    if hx is not None:
        _check_same_kind("hx", hx, "input", input, cast)
        if tuple(hx.shape) != expected_h:
            shown = expected_h if batched else expected_h[:1] + expected_h[2:]
            got = hx.shape if batched else hx.shape[:1] + hx.shape[2:]
            raise ValueError(f"hx must have shape {_fmt(shown)}, got {_fmt(got)}")
    spec.check_spatial_size(spatial, "input")

    use_triton = select_backend(input.device, backend).name == "triton"
    if use_triton:
        check_kernel_sample_size(hidden, spatial)
    if not torch.compiler.is_compiling():
        fused_step_setting()  # a bad CONVGRU_TRITON_FUSED_STEP raises here, before any convolution
    fmt = _internal_format(input.device, input.dtype, dims, cast)
    if fmt is not None:
        # Converted once per call: the sequence, h0 and the weights; every
        # convolution and step of every layer then runs in ``fmt``.
        caller_frames_channels_last = frames_channels_last(input)
        caller_state_channels_last = caller_frames_channels_last if hx is None else frames_channels_last(hx)
        input, hx = _frames_to_internal(input, fmt, cast), _frames_to_internal(hx, fmt, cast)
        params = [
            (_to_internal(w_ih, fmt, cast), _to_internal(w_hh, fmt, cast), b_ih, b_hh)
            for w_ih, w_hh, b_ih, b_hh in params
        ]
    layer_input = input
    final_states: List[torch.Tensor] = []
    for layer in range(num_layers):
        direction_outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            weight_ih, weight_hh, bias_ih, bias_hh = params[index]
            # The input convolution does not depend on the state: one batched
            # convolution over all T * N frames instead of T small ones.
            gates_x = _conv_frames(layer_input, weight_ih, spec)
            h0 = hx[index] if hx is not None else _zeros_state(gates_x[0], hidden, input[0])
            # The whole time loop is one operator (one autograd node, one
            # opaque node for torch.compile) per layer and direction.
            reverse = direction == 1
            states = conv_gru_sequence(
                gates_x, h0, weight_hh, bias_ih, bias_hh, spec, reset_after, reverse, use_triton
            )
            direction_outputs.append(states)
            final_states.append(states[0] if reverse else states[-1])
        layer_output = direction_outputs[0] if directions == 1 else cat_channels(direction_outputs)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_output = F.dropout(layer_output, p=dropout, training=True)
        layer_input = layer_output

    output = layer_input
    h_n = stack_frames(final_states)
    if fmt is not None:  # (output, h_n) in the caller's layout: the input's, and hx's (else the input's)
        if not caller_frames_channels_last:
            output = frames_in_format(output, torch.contiguous_format)
        if not caller_state_channels_last:
            h_n = h_n.contiguous()
    if not batched:
        return output.squeeze(1), h_n.squeeze(1)
    if batch_first:
        output = output.transpose(0, 1)
    return output, h_n
