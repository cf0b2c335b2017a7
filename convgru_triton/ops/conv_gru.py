"""The ConvGRU sequence operator: one layer and direction over T steps as one op.

Registered with :mod:`torch.library` so that ``torch.compile`` sees one opaque
node per layer and direction (the time loop is inside; compile time does not
grow with T), with fake implementations for shape propagation and an autograd
formula that is itself an operator:

``convgru_triton::conv_gru_fwd(gates_x, h0, weight_hh, bias_ih, bias_hh, kernel_size,
dilation, padding_mode, reset_after, reverse, use_triton, save) -> (states, gates, aux)``
    ``gates_x`` (T, N, 3H, *S): the input convolution ``W_i * x_t`` of every
    step, computed beforehand as one batched convolution. Per step only the
    hidden convolution(s) and the fused gate math run. ``states`` (T, N, H, *S)
    is h_t for every t (in time order also when ``reverse``). With ``save``,
    ``gates`` (T, N, 3H, *S) = (r, z, n) and ``aux`` (T, N, H, *S) =
    ``W_hn*h + b_hn`` (``reset_after``) or ``r * h`` (not) are kept for the
    backward; else both are empty.

``convgru_triton::conv_gru_bwd(...) -> (d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh)``
    Per step, only the data gradients of the hidden convolutions and the fused
    backward gate math; the gradient arriving from the output at step t and the
    one carried from step t+1 are added inside the backward kernel. The hidden
    weight gradient is one batched convolution-backward over all T steps.

Saved for backward: h0, weight_hh, the states, gates and aux: 5H values per
element of the state and step, plus h0.

The gate math runs as the Triton kernels of :mod:`.conv_gru_cell` (``use_triton``)
or as their references in :mod:`.naive`; both write into the same buffers.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._conv import ConvSpec, conv_same, conv_same_backward
from .._layout import empty_in_layout, is_channels_last
from . import naive

Tensor = torch.Tensor


# ----------------------------------------------------------------------------
# Gate math: the Triton launchers, or the references writing into the same buffers
# ----------------------------------------------------------------------------


class _TorchGateMath:
    """The launchers' interface, implemented with the ``*_ref`` functions."""

    @staticmethod
    def reset_after_fwd(gx, gh, h, bias_ih, bias_hh, *, h_new, gates, aux):
        out, r, z, n, hn = naive.gru_reset_after_fwd_ref(gx, gh, h, bias_ih, bias_hh)
        h_new.copy_(out)
        if gates is not None:
            H = h.shape[1]
            gates[:, :H].copy_(r)
            gates[:, H : 2 * H].copy_(z)
            gates[:, 2 * H :].copy_(n)
            aux.copy_(hn)

    @staticmethod
    def reset_after_bwd(grad, grad2, gates, aux, h, *, d_gx, d_gh, d_h):
        H = h.shape[1]
        g = grad if grad2 is None else grad + grad2
        r, z, n = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H :]
        dx, dh_, direct = naive.gru_reset_after_bwd_ref(g, r, z, n, aux, h)
        d_gx.copy_(dx)
        d_gh.copy_(dh_)
        d_h.copy_(direct)

    @staticmethod
    def reset_gate_fwd(gx, gh_rz, h, bias_ih, bias_hh, *, gates, rh):
        H = h.shape[1]
        r, z, rh_ = naive.gru_reset_gate_fwd_ref(gx, gh_rz, h, bias_ih, bias_hh)
        gates[:, :H].copy_(r)
        gates[:, H : 2 * H].copy_(z)
        rh.copy_(rh_)

    @staticmethod
    def update_fwd(gx, gh_n, gates, h, bias_ih, bias_hh, save, *, h_new):
        H = h.shape[1]
        out, n = naive.gru_update_fwd_ref(gx, gh_n, gates[:, H : 2 * H], h, bias_ih, bias_hh)
        h_new.copy_(out)
        if save:
            gates[:, 2 * H :].copy_(n)

    @staticmethod
    def update_bwd(grad, grad2, gates, h, d_gates, *, d_h):
        H = h.shape[1]
        g = grad if grad2 is None else grad + grad2
        d_az, d_an, direct = naive.gru_update_bwd_ref(g, gates[:, H : 2 * H], gates[:, 2 * H :], h)
        d_gates[:, H : 2 * H].copy_(d_az)
        d_gates[:, 2 * H :].copy_(d_an)
        d_h.copy_(direct)

    @staticmethod
    def reset_gate_bwd(d_rh, gates, h, d_gates, d_h):
        d_ar, d_h_add = naive.gru_reset_gate_bwd_ref(d_rh, gates[:, : h.shape[1]], h)
        d_gates[:, : h.shape[1]].copy_(d_ar)
        d_h.add_(d_h_add)


class _TritonGateMath:
    """The launchers of :mod:`.conv_gru_cell`, looked up at call time (so tests
    can wrap them) and imported only when used (the package works without Triton)."""

    @staticmethod
    def _kernels():
        from . import conv_gru_cell

        return conv_gru_cell

    @classmethod
    def reset_after_fwd(cls, gx, gh, h, bias_ih, bias_hh, *, h_new, gates, aux):
        cls._kernels()._reset_after_fwd(
            gx, gh, h, bias_ih, bias_hh, gates is not None, h_new=h_new, gates=gates, aux=aux
        )

    @classmethod
    def reset_after_bwd(cls, grad, grad2, gates, aux, h, *, d_gx, d_gh, d_h):
        cls._kernels()._reset_after_bwd(grad, grad2, (gates, aux), h, False, d_gx=d_gx, d_gh=d_gh, d_h=d_h)

    @classmethod
    def reset_gate_fwd(cls, gx, gh_rz, h, bias_ih, bias_hh, *, gates, rh):
        cls._kernels()._reset_gate_fwd(gx, gh_rz, h, bias_ih, bias_hh, gates=gates, rh=rh)

    @classmethod
    def update_fwd(cls, gx, gh_n, gates, h, bias_ih, bias_hh, save, *, h_new):
        cls._kernels()._update_fwd(gx, gh_n, gates, h, bias_ih, bias_hh, save, h_new=h_new)

    @classmethod
    def update_bwd(cls, grad, grad2, gates, h, d_gates, *, d_h):
        cls._kernels()._update_bwd(grad, grad2, gates, h, d_gates, d_h=d_h)

    @classmethod
    def reset_gate_bwd(cls, d_rh, gates, h, d_gates, d_h):
        cls._kernels()._reset_gate_bwd(d_rh, gates, h, d_gates, d_h)


def _gate_math(use_triton: bool):
    return _TritonGateMath if use_triton else _TorchGateMath


# ----------------------------------------------------------------------------
# Buffers
# ----------------------------------------------------------------------------


def _empty_frames(steps: int, frame_like: Tensor, channels: int, channels_last: bool) -> Tensor:
    """Uninitialised (T, N, C, *S) buffer whose every frame [t] is laid out
    contiguous or channels_last. The tests replace this to poison outputs with NaN."""
    batch, spatial = frame_like.shape[0], tuple(frame_like.shape[2:])
    shape = (steps, batch, channels) + spatial
    if not channels_last or len(spatial) not in (2, 3):
        return torch.empty(shape, dtype=frame_like.dtype, device=frame_like.device)
    # Allocated with its final shape and strides, not as a view of a flat
    # buffer: the operator's outputs must be ordinary tensors (in-place ops on
    # a view created inside an autograd.Function are refused).
    frame_stride = channels * batch
    for size in spatial:
        frame_stride *= size
    plane = channels
    inner = []
    for size in reversed(spatial):
        inner.insert(0, plane)
        plane *= size
    strides = (frame_stride, plane, 1) + tuple(inner)
    return torch.empty_strided(shape, strides, dtype=frame_like.dtype, device=frame_like.device)


def _no_tensor(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _fwd_outputs(gates_x: Tensor, h0: Tensor, save: bool) -> Tuple[Tensor, Tensor, Tensor]:
    steps, hidden = gates_x.shape[0], h0.shape[1]
    # States take the layout of the initial state (the caller makes a missing
    # one in the layout of the convolution output).
    channels_last = is_channels_last(h0)
    states = _empty_frames(steps, h0, hidden, channels_last)
    if not save:
        return states, _no_tensor(h0), _no_tensor(h0)
    return states, _empty_frames(steps, h0, 3 * hidden, channels_last), _empty_frames(steps, h0, hidden, channels_last)


def _step_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


# ----------------------------------------------------------------------------
# The operators
# ----------------------------------------------------------------------------


def _conv_gru_fwd(
    gates_x: Tensor,
    h0: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    kernel_size: List[int],
    dilation: List[int],
    padding_mode: str,
    reset_after: bool,
    reverse: bool,
    use_triton: bool,
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    spec = ConvSpec(tuple(kernel_size), tuple(dilation), padding_mode)
    math = _gate_math(use_triton)
    hidden = h0.shape[1]
    states, gates, aux = _fwd_outputs(gates_x, h0, save)
    if not save and not reset_after:
        # r, z and r * h are still needed within each step: one scratch for all.
        channels_last = is_channels_last(h0)
        scratch_gates = _empty_frames(1, h0, 3 * hidden, channels_last)[0]
        scratch_rh = _empty_frames(1, h0, hidden, channels_last)[0]
    h = h0
    for t in _step_order(gates_x.shape[0], reverse):
        if reset_after:
            gh = conv_same(h, weight_hh, spec)
            math.reset_after_fwd(
                gates_x[t], gh, h, bias_ih, bias_hh,
                h_new=states[t], gates=gates[t] if save else None, aux=aux[t] if save else None,
            )
        else:
            gates_t = gates[t] if save else scratch_gates
            rh = aux[t] if save else scratch_rh
            gh_rz = conv_same(h, weight_hh[: 2 * hidden], spec)
            math.reset_gate_fwd(gates_x[t], gh_rz, h, bias_ih, bias_hh, gates=gates_t, rh=rh)
            gh_n = conv_same(rh, weight_hh[2 * hidden :], spec)
            math.update_fwd(gates_x[t], gh_n, gates_t, h, bias_ih, bias_hh, save, h_new=states[t])
        h = states[t]
    return states, gates, aux


conv_gru_fwd = torch.library.custom_op("convgru_triton::conv_gru_fwd", _conv_gru_fwd, mutates_args=())


@conv_gru_fwd.register_fake
def _(gates_x, h0, weight_hh, bias_ih, bias_hh, kernel_size, dilation, padding_mode, reset_after, reverse, use_triton, save):
    return _fwd_outputs(gates_x, h0, save)


def _previous_states(h0: Tensor, states: Tensor, reverse: bool) -> Tensor:
    """(T, N, H, *S): the state each step started from, in time order."""
    if reverse:
        return torch.cat([states[1:], h0.unsqueeze(0)])
    return torch.cat([h0.unsqueeze(0), states[:-1]])


def _sum_but_channels(t: Tensor) -> Tensor:
    """(T, N, C, *S) -> (C,)"""
    return t.sum(dim=[0, 1] + list(range(3, t.dim())))


def _bwd_outputs(states: Tensor, h0: Tensor, weight_hh: Tensor, has_bias: bool):
    steps, hidden = states.shape[0], h0.shape[1]
    d_gates_x = _empty_frames(steps, h0, 3 * hidden, is_channels_last(states[0]))
    d_bias = (3 * hidden,) if has_bias else (0,)
    return (
        d_gates_x,
        empty_in_layout(h0.shape, h0.dtype, h0.device, is_channels_last(h0)),
        torch.empty_like(weight_hh, memory_format=torch.contiguous_format),
        h0.new_empty(d_bias),
        h0.new_empty(d_bias),
    )


def _conv_gru_bwd(
    grad_states: Tensor,
    h0: Tensor,
    weight_hh: Tensor,
    states: Tensor,
    gates: Tensor,
    aux: Tensor,
    kernel_size: List[int],
    dilation: List[int],
    padding_mode: str,
    reset_after: bool,
    reverse: bool,
    use_triton: bool,
    has_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = ConvSpec(tuple(kernel_size), tuple(dilation), padding_mode)
    math = _gate_math(use_triton)
    steps, hidden = states.shape[0], h0.shape[1]
    d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh = _bwd_outputs(states, h0, weight_hh, has_bias)
    d_gates_h = _empty_frames(steps, h0, 3 * hidden, is_channels_last(states[0])) if reset_after else None
    # Two state-gradient buffers, alternating: the carried dL/dh_t and the one
    # being computed for h_{t-1}.
    carry: Optional[Tensor] = None
    spare = [torch.empty_like(d_h0), torch.empty_like(d_h0)]
    order = list(_step_order(steps, reverse))
    for i in range(steps - 1, -1, -1):
        t = order[i]
        h_prev = h0 if i == 0 else states[order[i - 1]]
        d_h = spare[i % 2]
        # dL/dh_t = (from the output at t) + (carried from step t+1), added in the kernel.
        grad, grad2 = (grad_states[t], None) if carry is None else (carry, grad_states[t])
        if reset_after:
            math.reset_after_bwd(grad, grad2, gates[t], aux[t], h_prev, d_gx=d_gates_x[t], d_gh=d_gates_h[t], d_h=d_h)
            d_h_conv, _ = conv_same_backward(d_gates_h[t], h_prev, weight_hh, spec, True, False)
        else:
            math.update_bwd(grad, grad2, gates[t], h_prev, d_gates_x[t], d_h=d_h)
            d_rh, _ = conv_same_backward(d_gates_x[t][:, 2 * hidden :], aux[t], weight_hh[2 * hidden :], spec, True, False)
            math.reset_gate_bwd(d_rh, gates[t], h_prev, d_gates_x[t], d_h)
            d_h_conv, _ = conv_same_backward(d_gates_x[t][:, : 2 * hidden], h_prev, weight_hh[: 2 * hidden], spec, True, False)
        d_h.add_(d_h_conv)
        carry = d_h
    d_h0.copy_(carry)

    # Hidden weight gradients: one batched call over all T * N frames.
    frames = _previous_states(h0, states, reverse).flatten(0, 1)
    if reset_after:
        _, d_w = conv_same_backward(d_gates_h.flatten(0, 1), frames, weight_hh, spec, False, True)
        d_weight_hh.copy_(d_w)
    else:
        _, d_w_rz = conv_same_backward(d_gates_x[:, :, : 2 * hidden].flatten(0, 1), frames, weight_hh[: 2 * hidden], spec, False, True)
        _, d_w_n = conv_same_backward(d_gates_x[:, :, 2 * hidden :].flatten(0, 1), aux.flatten(0, 1), weight_hh[2 * hidden :], spec, False, True)
        d_weight_hh[: 2 * hidden].copy_(d_w_rz)
        d_weight_hh[2 * hidden :].copy_(d_w_n)
    if has_bias:
        d_bias_ih.copy_(_sum_but_channels(d_gates_x))
        # Both biases add to the same pre-activations, except b_hn with reset_after.
        d_bias_hh.copy_(_sum_but_channels(d_gates_h) if reset_after else d_bias_ih)
    return d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh


conv_gru_bwd = torch.library.custom_op("convgru_triton::conv_gru_bwd", _conv_gru_bwd, mutates_args=())


@conv_gru_bwd.register_fake
def _(grad_states, h0, weight_hh, states, gates, aux, kernel_size, dilation, padding_mode, reset_after, reverse, use_triton, has_bias):
    return _bwd_outputs(states, h0, weight_hh, has_bias)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward (a gradient of a gradient) through the ConvGRU operator "
        "convgru_triton::conv_gru_fwd is not supported"
    )


conv_gru_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    (gates_x, h0, weight_hh, bias_ih, bias_hh, kernel_size, dilation, padding_mode,
     reset_after, reverse, use_triton, save) = inputs
    states, gates, aux = output
    ctx.mark_non_differentiable(gates, aux)
    ctx.save_for_backward(h0, weight_hh, states, gates, aux)
    ctx.config = (list(kernel_size), list(dilation), padding_mode, reset_after, reverse, use_triton)
    ctx.has_bias = bias_ih is not None
    ctx.saved_gates = save


def _make_backward(backward_op):
    """The autograd formula of ``conv_gru_fwd``, running ``backward_op``."""

    def backward(ctx, grad_states, grad_gates, grad_aux):
        if not ctx.saved_gates:
            raise RuntimeError(
                "conv_gru_fwd was called with save=False, so it kept nothing for the backward pass; "
                "call it with save=True when gradients are needed"
            )
        h0, weight_hh, states, gates, aux = ctx.saved_tensors
        if grad_states is None:
            grad_states = torch.zeros_like(states)
        d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh = backward_op(
            grad_states, h0, weight_hh, states, gates, aux, *ctx.config, ctx.has_bias
        )
        need = ctx.needs_input_grad
        return (
            d_gates_x if need[0] else None,
            d_h0 if need[1] else None,
            d_weight_hh if need[2] else None,
            d_bias_ih if ctx.has_bias and need[3] else None,
            d_bias_hh if ctx.has_bias and need[4] else None,
            None, None, None, None, None, None, None,
        )

    return backward


conv_gru_fwd.register_autograd(_make_backward(conv_gru_bwd), setup_context=_setup_context)


class _ConvGRUFunction(torch.autograd.Function):
    """The same forward, setup and backward as the registered operator, for
    eager mode: calling the implementations directly skips the operator
    dispatch, which costs tens of microseconds per call and matters for a cell
    stepped in a Python loop (RAFT). torch.compile sees the operator instead.
    (forward takes ctx itself: a separate setup_context makes Function.apply
    bind arguments with inspect.signature on every call, ~70 us measured.)"""

    @staticmethod
    def forward(ctx, *inputs):
        output = _conv_gru_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    _backward_eager = staticmethod(_make_backward(_conv_gru_bwd))
    _backward_op = staticmethod(_make_backward(conv_gru_bwd))

    @staticmethod
    def backward(ctx, *grads):
        # With create_graph=True (grad mode on in the backward) go through the
        # operator, whose own backward raises: a second derivative must fail
        # loudly, not come back silently without this layer's contribution.
        if torch.is_grad_enabled():
            return _ConvGRUFunction._backward_op(ctx, *grads)
        return _ConvGRUFunction._backward_eager(ctx, *grads)


class _ConvGRUBwdFunctorch(torch.autograd.Function):
    """``conv_gru_bwd`` for torch.func transforms; its own backward raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return conv_gru_bwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(_no_double_backward)


class _ConvGRUFunctorch(torch.autograd.Function):
    """The operator for torch.func transforms (vmap, grad, vjp, ...), which
    need a separate ``setup_context`` (the operator's registered autograd has
    none). ``generate_vmap_rule``: under vmap, forward and backward run the
    operators, whose vmap rules are in :mod:`.vmap_rules`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return conv_gru_fwd(*inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_make_backward(_ConvGRUBwdFunctorch.apply))

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "forward-mode AD (torch.func.jvp, jacfwd) through the ConvGRU operator "
            "convgru_triton::conv_gru_fwd is not supported; use reverse mode (torch.func.grad, vjp, jacrev)"
        )


@torch.compiler.assume_constant_result
def _exporting_to_onnx() -> bool:
    """``torch.onnx.is_in_onnx_export()``, evaluated for real also while dynamo
    traces (strict torch.export, which the ONNX exporter falls back to), where
    dynamo would otherwise take it for a constant False."""
    return torch.onnx.is_in_onnx_export()


def _runner(gates_x: Tensor):
    """What runs the operator for this call. torch.compile sees the operator;
    torch.func transforms (vmap, grad, ...) a Function with setup_context around
    it; meta and fake tensors the operator's fake implementation (shapes without
    stepping through time, no kernel launches for fake CUDA tensors); plain
    eager calls :class:`_ConvGRUFunction`, which skips the dispatch."""
    if torch.compiler.is_compiling():
        return conv_gru_fwd
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return _ConvGRUFunctorch.apply
    if gates_x.is_meta or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return conv_gru_fwd
    return _ConvGRUFunction.apply


def conv_gru_sequence(
    gates_x: Tensor,
    h0: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    spec: ConvSpec,
    reset_after: bool,
    reverse: bool,
    use_triton: bool,
) -> Tensor:
    """Run one layer and direction over a sequence; returns the states (T, N, H, *S).

    ``gates_x`` (T, N, 3H, *S) are the input pre-activations ``W_i * x_t`` (no
    bias), ``h0`` (N, H, *S) the initial state, ``weight_hh`` (3H, H, *k) and the
    biases (3H,) as in :func:`convgru_triton.ops.naive.conv_gru_cell_ref`, which
    this equals step by step. Under autocast the floating inputs are cast to the
    autocast dtype (as cuDNN's RNNs do) and the operator runs with autocast off.
    Under torch.jit.trace and ONNX export it runs
    :func:`~convgru_triton.ops.naive.conv_gru_sequence_ref` instead (standard
    operators only; docs/deploying.md).
    """
    if torch.jit.is_tracing() or (torch.compiler.is_compiling() and _exporting_to_onnx()):
        # torch.jit.trace and both ONNX exporters record the reference math:
        # standard operators only, no custom operator to translate.
        return naive.conv_gru_sequence_ref(gates_x, h0, weight_hh, bias_ih, bias_hh, spec, reset_after, reverse)
    device_type = gates_x.device.type
    # (meta has no autocast: asking it about autocast raises.)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        gates_x, h0, weight_hh = gates_x.to(dtype), h0.to(dtype), weight_hh.to(dtype)
        bias_ih = bias_ih.to(dtype) if bias_ih is not None else None
        bias_hh = bias_hh.to(dtype) if bias_hh is not None else None
        with torch.autocast(device_type, enabled=False):
            return conv_gru_sequence(gates_x, h0, weight_hh, bias_ih, bias_hh, spec, reset_after, reverse, use_triton)
    tensors: Sequence[Optional[Tensor]] = (gates_x, h0, weight_hh, bias_ih, bias_hh)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    run = _runner(gates_x)
    states, _, _ = run(
        gates_x, h0, weight_hh, bias_ih, bias_hh,
        list(spec.kernel_size), list(spec.dilation), spec.padding_mode,
        reset_after, reverse, use_triton, save,
    )
    return states
