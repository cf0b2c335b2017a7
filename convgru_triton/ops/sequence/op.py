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

The gate math runs as the Triton kernels of :mod:`..gates.kernels` (``use_triton``)
or as their references in :mod:`..gates.naive`; both write into the same buffers.
Where ``fused_step.use_fused`` says so (``CONVGRU_TRITON_FUSED_STEP``, the
tuning registry; docs/what-runs-where.md), a step's hidden convolution and gate
math run instead as the implicit-GEMM kernels of :mod:`..fused_step.kernels`, and in the
backward the hidden convolutions' data gradient with the gate backward; they
write the same buffers, so the two paths can be mixed step by step. For the
one-step cell in eager mode, :func:`fused_cell_step` runs the input
convolution inside those kernels too (gates_x is never made); its backward is
this module's step backward followed by the input convolution's.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ... import _settings
from ..._conv import ConvSpec, same_conv
from ..._layout import empty_in_layout, is_channels_last
from ..gates import naive as gate_naive
from . import naive

Tensor = torch.Tensor


# ----------------------------------------------------------------------------
# Gate math: the Triton launches, or the references writing into the same buffers
# ----------------------------------------------------------------------------


class _TorchGateMath:
    """The gate launches of ``gates.kernels.GateLaunches`` (the same methods),
    implemented with the ``*_ref`` functions, which write their results
    straight into the operator's buffers (``out=``): no result is computed into
    a temporary and then copied (the copies took 17% of a CPU training step)."""

    @classmethod
    def bind(cls, out, bias_ih, bias_hh, others):
        return cls

    @staticmethod
    def reset_after_fwd(gx, gh, h, bias_ih, bias_hh, *, h_new, gates, aux):
        if gates is None:
            gate_naive.gru_reset_after_fwd_ref(gx, gh, h, bias_ih, bias_hh, out=(h_new, None, None, None))
            return
        H = h.shape[1]
        gate_naive.gru_reset_after_fwd_ref(gx, gh, h, bias_ih, bias_hh, out=(h_new, gates[:, : 2 * H], gates[:, 2 * H :], aux))

    @staticmethod
    def reset_after_bwd(grad, grad2, gates, aux, h, *, d_gx, d_gh, d_h):
        H = h.shape[1]
        g = grad if grad2 is None else grad + grad2
        r, z, n = gates.split(H, dim=1)
        gate_naive.gru_reset_after_bwd_ref(g, r, z, n, aux, h, out=(d_gx, d_gh, d_h))

    @staticmethod
    def reset_gate_fwd(gx, gh_rz, h, bias_ih, bias_hh, *, gates, rh):
        gate_naive.gru_reset_gate_fwd_ref(gx, gh_rz, h, bias_ih, bias_hh, out=(gates[:, : 2 * h.shape[1]], rh))

    @staticmethod
    def update_fwd(gx, gh_n, gates, h, bias_ih, bias_hh, save, *, h_new):
        H = h.shape[1]
        n = gates[:, 2 * H :] if save else None
        gate_naive.gru_update_fwd_ref(gx, gh_n, gates[:, H : 2 * H], h, bias_ih, bias_hh, out=(h_new, n))

    @staticmethod
    def update_bwd(grad, grad2, gates, h, d_gates, *, d_h):
        H = h.shape[1]
        g = grad if grad2 is None else grad + grad2
        _, z, n = gates.split(H, dim=1)
        _, d_az, d_an = d_gates.split(H, dim=1)
        gate_naive.gru_update_bwd_ref(g, z, n, h, out=(d_az, d_an, d_h))

    @staticmethod
    def reset_gate_bwd(d_rh, gates, h, d_gates, d_h):
        H = h.shape[1]
        _, d_h_add = gate_naive.gru_reset_gate_bwd_ref(d_rh, gates[:, :H], h, out=d_gates[:, :H])
        d_h.add_(d_h_add)


def _gate_math(use_triton: bool):
    """The gate math of a plan: the general ``GateLaunches`` of
    :mod:`..gates.kernels` (imported by the first plan that uses them: the
    package works without Triton), or the references. Either runs a launch
    as it is, and its ``bind`` gives the gate math of one call."""
    if not use_triton:
        return _TorchGateMath
    from ..gates import kernels

    return kernels._GENERAL


# ----------------------------------------------------------------------------
# The plan: what a run needs that depends only on its static arguments
# ----------------------------------------------------------------------------


class Plan(NamedTuple):
    """What a run of the operator needs that depends only on its static
    arguments, worked out once by :func:`plan` and replayed by :func:`_forward`
    and :func:`_backward` at every call and step: the gate math, the hidden
    convolution and its backward with their arguments bound, and the
    operator's static arguments as the registered op takes them."""

    spec: ConvSpec
    reset_after: bool
    reverse: bool
    use_triton: bool
    math: object  # _gate_math's: gates.kernels.GateLaunches or _TorchGateMath; math.bind(...) gives one call's
    conv: Callable  # (x, weight) -> weight * x, 'same' padded
    conv_backward: Callable  # (grad, x, weight, need_input, need_weight) -> (d_x, d_weight)
    op_args: tuple  # (kernel_size, dilation, padding_mode, reset_after, reverse, use_triton)
    fused_step: bool = False  # this plan may use the fused step: see _fused_step_wanted


_PLANS: dict = {}


def plan(spec: ConvSpec, reset_after: bool, reverse: bool, use_triton: bool) -> Plan:
    """The :class:`Plan` for these static arguments (made once, then cached)."""
    if torch.compiler.is_compiling():
        # No cache while torch.compile traces (a cache read guards the graph,
        # a write then recompiles it; see _conv.same_conv).
        return _make_plan(spec, reset_after, reverse, use_triton)
    # The settings' generation is in the key: override_settings(fused_step=...)
    # between calls (a benchmark's providers, the tests) takes effect at the next call.
    key = (spec, reset_after, reverse, use_triton, _settings.generation)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _make_plan(spec, reset_after, reverse, use_triton)
    return p


def _make_plan(spec: ConvSpec, reset_after: bool, reverse: bool, use_triton: bool) -> Plan:
    conv, conv_backward = same_conv(spec)
    flags = (bool(reset_after), bool(reverse), bool(use_triton))
    return Plan(
        spec, *flags, _gate_math(use_triton), conv, conv_backward,
        (list(spec.kernel_size), list(spec.dilation), spec.padding_mode) + flags,
        _fused_step_wanted(spec, use_triton),
    )


# --- Fused step: the fused_step setting and the hooks' switch -------------
_fused = None  # convgru_triton.ops.fused_step, imported by the first plan that may use it
FUSED_STEP_MODES = ("1", "0", "auto")  # the values it takes (fused_step_setting)


def fused_step_setting(raw: Optional[str] = None) -> str:
    """``"1"``, ``"0"`` or ``"auto"``: the ``fused_step`` setting
    (``CONVGRU_TRITON_FUSED_STEP`` as read at import, or
    ``override_settings(fused_step=...)``), or ``raw`` checked the same way
    when given (empty is ``"auto"``). Here rather than in :mod:`..fused_step.kernels`
    so that it is checked without importing Triton where Triton is absent.

    Raises:
        ValueError: a bad value, naming the variable, the values it takes
            and the value given.
    """
    if raw is None:
        return _settings.get_settings().fused_step
    return _settings.parse("fused_step", raw)


def _fused_step_wanted(spec: ConvSpec, use_triton: bool) -> bool:
    """Whether a plan may run steps as :mod:`..fused_step.kernels`
    (convolution and gate math in one pass), per the ``fused_step`` setting
    (``CONVGRU_TRITON_FUSED_STEP``) when the plan is made: ``1`` or ``auto`` (also unset or empty) with the
    Triton gate math and a spec those kernels take; ``0`` never. Whether a
    step then does is decided per call by ``fused_step.use_fused`` (under
    ``auto`` the tuning registry, whose default is cuDNN + the gate kernels:
    no GPU figure of the fused step exists yet). Raises ValueError for a bad
    value of the variable (:func:`fused_step_setting`)."""
    global _fused
    text = fused_step_setting()
    if not use_triton or text == "0" or spec.dims != 2 or spec.padding_mode != "zeros":
        return False
    if _fused is None:
        from ..fused_step import kernels as fused_step

        _fused = fused_step
    return True
# --- end of the fused step's switch (the hooks: _step_forward, _step_backward) -----


def _plan_of(kernel_size, dilation, padding_mode, reset_after, reverse, use_triton) -> Plan:
    return plan(ConvSpec(tuple(kernel_size), tuple(dilation), padding_mode), reset_after, reverse, use_triton)


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


def _empty_frame(frame_like: Tensor, channels: int, channels_last: bool) -> Tensor:
    """Uninitialised (N, C, *S) buffer: one frame, for a single step (the
    cell) and for scratch. The tests replace this to poison outputs with NaN."""
    size = frame_like.shape
    shape = (size[0], channels, *size[2:])
    if channels_last and len(shape) in (4, 5):
        return empty_in_layout(shape, frame_like.dtype, frame_like.device, True)
    # (new_empty: ~1.5 us less than torch.empty with keywords, CPU.)
    return frame_like.new_empty(shape)


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


# ----------------------------------------------------------------------------
# The replay: the time loops of the forward and backward passes
# ----------------------------------------------------------------------------


def _hidden_weights(p: Plan, weight_hh: Tensor) -> Tuple[Tensor, ...]:
    """The hidden convolution weights a step uses: ``(W_h,)`` with reset_after,
    else ``(W_hrz, W_hn)`` (the second convolution reads r * h)."""
    if p.reset_after:
        return (weight_hh,)
    hidden = weight_hh.shape[1]
    return weight_hh.split_with_sizes((2 * hidden, hidden))


def _step_forward(p: Plan, math, gx: Tensor, h: Tensor, weights, bias_ih, bias_hh, state: Tensor, gates, aux,
                  save: bool) -> None:
    """One step: ``state`` <- h' from the (N, 3H, *S) frame ``gx`` and the state
    ``h`` (``weights`` from :func:`_hidden_weights`). ``gates`` and ``aux`` are
    the frames that keep what the backward pass needs when ``save``; without,
    they are ``None`` with reset_after, else scratch (r, z and r * h are needed
    within the step; n is then not stored). ``math``: ``p.math`` bound to the call."""
    if p.fused_step and _fused.forward_step(p.reset_after, p.spec, gx, h, weights, bias_ih, bias_hh, state,
                                            gates, aux, save):
        return  # fused step (use_fused chose it): wrote what the lines below write
    conv = p.conv
    if p.reset_after:
        math.reset_after_fwd(gx, conv(h, weights[0]), h, bias_ih, bias_hh, h_new=state, gates=gates, aux=aux)
    else:
        math.reset_gate_fwd(gx, conv(h, weights[0]), h, bias_ih, bias_hh, gates=gates, rh=aux)
        math.update_fwd(gx, conv(aux, weights[1]), gates, h, bias_ih, bias_hh, save, h_new=state)


def _forward(p: Plan, gx, h0: Tensor, weight_hh: Tensor, bias_ih, bias_hh, states, gates, aux) -> None:
    """The forward time loop. ``gx`` and ``states`` are the per-step frames
    ((N, 3H, *S) input pre-activations, (N, H, *S) states to write) in time
    order; ``gates`` and ``aux`` the frames that keep (r, z, n) and aux for the
    backward pass, or ``None`` (then one scratch frame of each serves every
    step). Frames are made once per call (``unbind``), not per step."""
    if not len(gx):
        return
    weights = _hidden_weights(p, weight_hh)
    math = p.math.bind(states[0], bias_ih, bias_hh, (gx[0], h0))
    h = h0
    if gates is not None:
        for t in naive.step_order(len(gx), p.reverse):
            _step_forward(p, math, gx[t], h, weights, bias_ih, bias_hh, states[t], gates[t], aux[t], True)
            h = states[t]
        return
    scratch_gates = scratch_aux = None
    if not p.reset_after:
        # r, z and r * h are still needed within each step: one scratch for all.
        channels_last, hidden = is_channels_last(h0), h0.shape[1]
        scratch_gates, scratch_aux = _empty_frame(h0, 3 * hidden, channels_last), _empty_frame(h0, hidden, channels_last)
    for t in naive.step_order(len(gx), p.reverse):
        _step_forward(p, math, gx[t], h, weights, bias_ih, bias_hh, states[t], scratch_gates, scratch_aux, False)
        h = states[t]


def _previous_states(h0: Tensor, states: Tensor, reverse: bool) -> Tensor:
    """(T * N, H, *S): the state each step started from, in time order, frames merged."""
    if reverse:
        return torch.cat([states[1:], h0.unsqueeze(0)]).flatten(0, 1)
    return torch.cat([h0.unsqueeze(0), states[:-1]]).flatten(0, 1)


#: (dims, channel dim) -> every other dim: what a bias gradient sums over.
_ALL_BUT = {(n, c): tuple(d for d in range(n) if d != c) for n in range(3, 7) for c in (1, 2)}


def _bwd_outputs(states: Tensor, h0: Tensor, weight_hh: Tensor, has_bias: bool):
    steps, hidden = states.shape[0], h0.shape[1]
    # In the layout of h0, as _backward makes it (the fake must give what the real op gives for any inputs).
    d_gates_x = _empty_frames(steps, h0, 3 * hidden, is_channels_last(h0))
    d_bias = (3 * hidden,) if has_bias else (0,)
    return (
        d_gates_x,
        empty_in_layout(h0.shape, h0.dtype, h0.device, is_channels_last(h0)),
        torch.empty_like(weight_hh, memory_format=torch.contiguous_format),
        h0.new_empty(d_bias),
        h0.new_empty(d_bias),
    )


def _dense_like(p: Plan, grad: Tensor, states: Tensor) -> Tensor:
    """The incoming gradient, dense in the states' layout for the Triton gate
    math: an expanded or strided one (``out.sum().backward()`` hands over a
    stride-0 one) is made so once per call here, where the launchers would
    otherwise copy it frame by frame, one extra launch per step."""
    if p.use_triton and grad.stride() != states.stride():
        return torch.empty_like(states).copy_(grad)
    return grad


def _step_backward(p: Plan, math, grad: Tensor, grad2: Optional[Tensor], h: Tensor, weights, gates: Tensor,
                   aux: Tensor, d_gx: Tensor, d_gh, d_rz, d_n, d_h: Tensor, with_weights: bool) -> tuple:
    """One step of the backward time loop, from dL/dh' = ``grad`` + ``grad2``
    (``grad2`` may be ``None``; the kernels add them): writes the step's
    pre-activation gradients ``d_gx`` (and ``d_gh`` with reset_after; ``d_rz``
    and ``d_n`` are the channel slices of ``d_gx`` without) and ``d_h`` =
    dL/dh. With ``with_weights`` returns the hidden weight gradients of this
    step, one per tensor of ``weights`` (:func:`_hidden_weights`), from the
    same convolution backward calls; else ``None`` for each. ``math``:
    ``p.math`` bound to the call."""
    conv_backward = p.conv_backward
    if p.fused_step and _fused.backward_step(p.reset_after, p.spec, math, grad, grad2, h, weights, gates, aux,
                                             d_gx, d_gh, d_h):
        # Fused dgrad + gate backward wrote d_gx, d_gh, d_h; wgrad stays on cuDNN.
        dys, xs = ((d_gh,), (h,)) if p.reset_after else ((d_rz, d_n), (h, aux))
        return tuple(conv_backward(dy, x, w, False, True)[1] if with_weights else None
                     for dy, x, w in zip(dys, xs, weights))
    if p.reset_after:
        math.reset_after_bwd(grad, grad2, gates, aux, h, d_gx=d_gx, d_gh=d_gh, d_h=d_h)
        d_h_conv, d_w = conv_backward(d_gh, h, weights[0], True, with_weights)
        d_h.add_(d_h_conv)
        return (d_w,)
    math.update_bwd(grad, grad2, gates, h, d_gx, d_h=d_h)
    d_rh, d_w_n = conv_backward(d_n, aux, weights[1], True, with_weights)
    math.reset_gate_bwd(d_rh, gates, h, d_gx, d_h)
    d_h_conv, d_w_rz = conv_backward(d_rz, h, weights[0], True, with_weights)
    d_h.add_(d_h_conv)
    return d_w_rz, d_w_n


def _parameter_grads(p: Plan, d_weights, weight_hh: Tensor, d_gates_x: Tensor, d_gates_h, has_bias: bool,
                     channel_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_weight_hh, d_bias_ih, d_bias_hh) from the hidden weight gradients and
    the pre-activation gradients (channels in dim ``channel_dim``)."""
    d_weight_hh = (d_weights[0] if p.reset_after else torch.cat(d_weights)).contiguous()
    if not has_bias:
        return d_weight_hh, d_gates_x.new_empty((0,)), d_gates_x.new_empty((0,))
    dims = _ALL_BUT[d_gates_x.dim(), channel_dim]
    d_bias_ih = d_gates_x.sum(dims)
    # Both biases add to the same pre-activations, except b_hn with reset_after.
    d_bias_hh = d_gates_h.sum(dims) if p.reset_after else d_bias_ih.clone()
    return d_weight_hh, d_bias_ih, d_bias_hh


def _backward(p: Plan, grad_states: Tensor, h0: Tensor, weight_hh: Tensor, states: Tensor, gates: Tensor,
              aux: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward pass over (T, ...) tensors; returns (d_gates_x, d_h0,
    d_weight_hh, d_bias_ih, d_bias_hh), laid out as :func:`_bwd_outputs` says
    (the registered operator's fake). Results are returned where they are
    computed, not copied into buffers of their own."""
    hidden, steps = h0.shape[1], states.shape[0]
    channels_last = is_channels_last(h0)
    d_gates_x = _empty_frames(steps, h0, 3 * hidden, channels_last)
    weights = _hidden_weights(p, weight_hh)
    grad_states = _dense_like(p, grad_states, states)
    # Per-step frames, made once per call.
    grad_t, states_t, gates_t, aux_t, d_gx_t = (t.unbind(0) for t in (grad_states, states, gates, aux, d_gates_x))
    if p.reset_after:
        d_gates_h = _empty_frames(steps, h0, 3 * hidden, channels_last)
        d_gh_t, d_rz_t, d_n_t = d_gates_h.unbind(0), (None,) * steps, (None,) * steps
    else:
        d_gates_h = None
        # The channel slices of d_gates_x the convolution backward reads.
        d_rz, d_n = d_gates_x.split_with_sizes((2 * hidden, hidden), 2)
        d_gh_t, d_rz_t, d_n_t = (None,) * steps, d_rz.unbind(0), d_n.unbind(0)
    # Two state-gradient buffers, alternating: the carried dL/dh_t and the one
    # being computed for h_{t-1}; the last one written is d_h0.
    spare = [empty_in_layout(h0.shape, h0.dtype, h0.device, channels_last)]
    if steps > 1:
        spare.append(torch.empty_like(spare[0]))
    math = p.math.bind(spare[0], None, None, (grad_states, h0, states, gates, aux)) if steps else p.math
    # One step: the weight gradients come from the same convolution backward
    # calls as the data gradients (two calls instead of four).
    one = steps == 1
    carry: Optional[Tensor] = None
    order = list(naive.step_order(steps, p.reverse))
    for i in range(steps - 1, -1, -1):
        t = order[i]
        d_h = spare[i % 2]
        # dL/dh_t = (from the output at t) + (carried from step t+1), added in the kernel.
        grad, grad2 = (grad_t[t], None) if carry is None else (carry, grad_t[t])
        d_weights = _step_backward(p, math, grad, grad2, h0 if i == 0 else states_t[order[i - 1]], weights,
                                   gates_t[t], aux_t[t], d_gx_t[t], d_gh_t[t], d_rz_t[t], d_n_t[t], d_h, one)
        carry = d_h
    d_h0 = carry
    if not one:
        # Hidden weight gradients: one batched call over all T * N frames.
        previous = _previous_states(h0, states, p.reverse)
        if p.reset_after:
            d_weights = (p.conv_backward(d_gates_h.flatten(0, 1), previous, weight_hh, False, True)[1],)
        else:
            d_weights = (p.conv_backward(d_rz.flatten(0, 1), previous, weights[0], False, True)[1],
                         p.conv_backward(d_n.flatten(0, 1), aux.flatten(0, 1), weights[1], False, True)[1])
    return (d_gates_x, d_h0) + _parameter_grads(p, d_weights, weight_hh, d_gates_x, d_gates_h, has_bias, 2)


def _backward_step(p: Plan, grad: Tensor, h: Tensor, weight_hh: Tensor, weights, state: Tensor, gates: Tensor,
                   aux: Tensor, has_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`_backward` of one step's (N, ...) tensors (the cell): no time dim
    to add and remove; d_gates_x is (N, 3H, *S). ``weights``: those of
    :func:`_hidden_weights`."""
    hidden, channels_last = h.shape[1], is_channels_last(h)
    d_gx = _empty_frame(h, 3 * hidden, channels_last)
    d_h = torch.empty_like(state)  # dense in the state's layout (the operator made it)
    if p.reset_after:
        d_gh, d_rz, d_n = _empty_frame(h, 3 * hidden, channels_last), None, None
    else:
        d_gh, (d_rz, d_n) = None, d_gx.split_with_sizes((2 * hidden, hidden), 1)
    grad = _dense_like(p, grad, state)
    math = p.math.bind(d_h, None, None, (grad, h, gates, aux))
    d_weights = _step_backward(p, math, grad, None, h, weights, gates, aux, d_gx, d_gh, d_rz, d_n, d_h, True)
    return (d_gx, d_h) + _parameter_grads(p, d_weights, weight_hh, d_gx, d_gh, has_bias, 1)


# ----------------------------------------------------------------------------
# The registered operators (torch.compile sees these)
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
    p = _plan_of(kernel_size, dilation, padding_mode, reset_after, reverse, use_triton)
    gates_x = _frames_like_state(p, gates_x, h0)
    states, gates, aux = _fwd_outputs(gates_x, h0, save)
    if save:
        _forward(p, gates_x.unbind(0), h0, weight_hh, bias_ih, bias_hh, states.unbind(0), gates.unbind(0),
                 aux.unbind(0))
    else:
        _forward(p, gates_x.unbind(0), h0, weight_hh, bias_ih, bias_hh, states.unbind(0), None, None)
    return states, gates, aux


conv_gru_fwd = torch.library.custom_op("convgru_triton::conv_gru_fwd", _conv_gru_fwd, mutates_args=())


@conv_gru_fwd.register_fake
def _(gates_x, h0, weight_hh, bias_ih, bias_hh, kernel_size, dilation, padding_mode, reset_after, reverse, use_triton, save):
    return _fwd_outputs(gates_x, h0, save)


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
    p = _plan_of(kernel_size, dilation, padding_mode, reset_after, reverse, use_triton)
    return _backward(p, grad_states, h0, weight_hh, states, gates, aux, has_bias)


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


def _input_grads(ctx, grads, static_args: int) -> tuple:
    """What an autograd backward returns: the gradients of (gates_x, h0,
    weight_hh, bias_ih, bias_hh) where asked for (biases only when there are
    some), then ``None`` for each of the ``static_args`` arguments that follow."""
    need = ctx.needs_input_grad
    d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh = grads
    has_bias = ctx.has_bias
    return (
        d_gates_x if need[0] else None,
        d_h0 if need[1] else None,
        d_weight_hh if need[2] else None,
        d_bias_ih if need[3] and has_bias else None,
        d_bias_hh if need[4] and has_bias else None,
    ) + (None,) * static_args


def _make_backward(backward_op):
    """The autograd formula of ``conv_gru_fwd``, running ``backward_op`` (the
    operator ``conv_gru_bwd``, or its torch.func wrapper)."""

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
        return _input_grads(ctx, (d_gates_x, d_h0, d_weight_hh, d_bias_ih, d_bias_hh), 7)

    return backward


conv_gru_fwd.register_autograd(_make_backward(conv_gru_bwd), setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Eager mode: the same forward and backward without the operator dispatch
# ----------------------------------------------------------------------------


class _ConvGRUFunction(torch.autograd.Function):
    """The registered operator's forward and backward for eager mode, called
    with a :class:`Plan` instead of the operator's seven static arguments: the
    operator dispatch costs tens of microseconds per call, and
    ``Function.apply`` walks every argument, which matters for a cell stepped
    in a Python loop (RAFT). One output, the states; gates and aux are saved
    for the backward pass without being outputs. ``step``: ``gates_x`` is one
    frame (N, 3H, *S) and the output one state (N, H, *S), no time dim.
    (forward takes ctx itself: a separate setup_context makes Function.apply
    bind arguments with inspect.signature on every call, ~70 us measured.)"""

    @staticmethod
    def forward(ctx, gates_x, h0, weight_hh, bias_ih, bias_hh, p, step):
        hidden, channels_last = h0.shape[1], is_channels_last(h0)
        if step:
            states, gates, aux = (_empty_frame(h0, c, channels_last) for c in (hidden, 3 * hidden, hidden))
            math = p.math.bind(states, bias_ih, bias_hh, (gates_x, h0))
            # Kept for the backward pass (views of weight_hh, which is saved:
            # an in-place change of it is still caught there).
            ctx.weights = _hidden_weights(p, weight_hh)
            _step_forward(p, math, gates_x, h0, ctx.weights, bias_ih, bias_hh, states, gates, aux, True)
        else:
            steps = gates_x.shape[0]
            states, gates, aux = (_empty_frames(steps, h0, c, channels_last) for c in (hidden, 3 * hidden, hidden))
            _forward(p, gates_x.unbind(0), h0, weight_hh, bias_ih, bias_hh, states.unbind(0), gates.unbind(0),
                     aux.unbind(0))
        ctx.save_for_backward(h0, weight_hh, states, gates, aux)
        ctx.plan, ctx.step, ctx.has_bias = p, step, bias_ih is not None
        return states

    @staticmethod
    def backward(ctx, grad):
        h0, weight_hh, states, gates, aux = ctx.saved_tensors
        p, step = ctx.plan, ctx.step
        if torch.is_grad_enabled():
            # create_graph=True: through the operator, whose own backward
            # raises: a second derivative must fail loudly, not come back
            # silently without this layer's contribution.
            if step:
                grad, states, gates, aux = grad.unsqueeze(0), states.unsqueeze(0), gates.unsqueeze(0), aux.unsqueeze(0)
            results = conv_gru_bwd(grad, h0, weight_hh, states, gates, aux, *p.op_args, ctx.has_bias)
            if step:
                results = (results[0].squeeze(0),) + tuple(results[1:])
        elif step:
            results = _backward_step(p, grad, h0, weight_hh, ctx.weights, states, gates, aux, ctx.has_bias)
        else:
            results = _backward(p, grad, h0, weight_hh, states, gates, aux, ctx.has_bias)
        return _input_grads(ctx, results, 2)


# ``Function.apply`` without its Python wrapper, which here only unwraps "dead"
# functorch wrappers (tensors that outlived a torch.func transform) with a
# generator over every argument: ~5 us of a ~14 us apply (CPU, Python 3.11).
# ``_run`` is reached with no functorch transform active (``_runner``), where
# unwrapping the five tensors and calling the C entry point is the same thing.
_apply_function = torch._C._FunctionBase.__dict__["apply"].__get__(None, _ConvGRUFunction)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _frames_like_state(p: Plan, gates_x: Tensor, h0: Tensor) -> Tensor:
    """``gates_x`` (T, N, 3H, *S), its frames in the layout of the state (which
    the states and every kernel launch follow), for the Triton gate math: made
    so once per call when they differ (a channels_last input with a contiguous
    ``hx``), where the launchers would otherwise copy every frame at its step."""
    if p.use_triton and gates_x.dim() in (5, 6) and gates_x.shape[0] > 0 and (
        is_channels_last(gates_x[0]) != is_channels_last(h0)
    ):
        return _empty_frames(gates_x.shape[0], h0, gates_x.shape[2], is_channels_last(h0)).copy_(gates_x)
    return gates_x


def _run(p: Plan, gates_x: Tensor, h0: Tensor, weight_hh: Tensor, bias_ih, bias_hh, step: bool) -> Tensor:
    """Eager run of a plan: through the autograd function when a gradient is
    needed, else straight into the time loop (no autograd node to make)."""
    if not step:
        gates_x = _frames_like_state(p, gates_x, h0)
    if torch.is_grad_enabled() and (
        gates_x.requires_grad or h0.requires_grad or weight_hh.requires_grad
        or (bias_ih is not None and (bias_ih.requires_grad or bias_hh.requires_grad))
    ):
        if bias_ih is not None:
            bias_ih, bias_hh = _unwrap_if_dead(bias_ih), _unwrap_if_dead(bias_hh)
        return _apply_function(_unwrap_if_dead(gates_x), _unwrap_if_dead(h0), _unwrap_if_dead(weight_hh), bias_ih,
                               bias_hh, p, step)
    channels_last = is_channels_last(h0)
    if step:
        hidden = h0.shape[1]
        state = _empty_frame(h0, hidden, channels_last)
        math = p.math.bind(state, bias_ih, bias_hh, (gates_x, h0))
        if p.reset_after:
            _step_forward(p, math, gates_x, h0, (weight_hh,), bias_ih, bias_hh, state, None, None, False)
        else:
            _step_forward(p, math, gates_x, h0, _hidden_weights(p, weight_hh), bias_ih, bias_hh, state,
                          _empty_frame(h0, 3 * hidden, channels_last), _empty_frame(h0, hidden, channels_last), False)
        return state
    states = _empty_frames(gates_x.shape[0], h0, h0.shape[1], channels_last)
    _forward(p, gates_x.unbind(0), h0, weight_hh, bias_ih, bias_hh, states.unbind(0), None, None)
    return states


# ----------------------------------------------------------------------------
# The one-step cell with its input convolution inside the fused step
# ----------------------------------------------------------------------------


class _FusedCellFunction(torch.autograd.Function):
    """One cell step whose forward runs the input convolution ``W_ih * x``
    inside :mod:`..fused_step.kernels` (gx = W_ih * x is never made), and
    whose backward is the step backward of the operator (:func:`_backward_step`,
    or ``conv_gru_bwd`` under create_graph, as :class:`_ConvGRUFunction`) for
    d_gx, d_h, d_W_hh and the biases, followed by the input convolution's own
    backward (``p.conv_backward``: ``aten.convolution_backward`` with the
    'same' padding of :func:`~convgru_triton._conv.conv_same`) for d_x and
    d_W_ih. An autograd.Function rather than a registered operator: the path
    is eager only (torch.compile, tracing and functorch transforms keep the
    cell's operator path, which is registered), and ``Function.apply`` costs
    less per call than the operator dispatch (see :class:`_ConvGRUFunction`).
    Saves what the step backward needs (h, W_hh, gates, aux) plus x and W_ih."""

    @staticmethod
    def forward(ctx, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, p):
        hidden, channels_last = h0.shape[1], is_channels_last(h0)
        state, gates, aux = (_empty_frame(h0, c, channels_last) for c in (hidden, 3 * hidden, hidden))
        ctx.weights = _hidden_weights(p, weight_hh)
        if not _fused.forward_step(p.reset_after, p.spec, None, h0, ctx.weights, bias_ih, bias_hh, state, gates,
                                   aux, True, x=x, weight_ih=weight_ih):
            # Declined for what fused_cell_step does not check (a sample past the
            # kernels' 32-bit offsets): the same step with gx made, the same saved tensors.
            math = p.math.bind(state, bias_ih, bias_hh, (x, h0))
            _step_forward(p, math, p.conv(x, weight_ih), h0, ctx.weights, bias_ih, bias_hh, state, gates, aux, True)
        ctx.save_for_backward(x, h0, weight_ih, weight_hh, state, gates, aux)
        ctx.plan, ctx.has_bias = p, bias_ih is not None
        return state

    @staticmethod
    def backward(ctx, grad):
        x, h0, weight_ih, weight_hh, state, gates, aux = ctx.saved_tensors
        p = ctx.plan
        if torch.is_grad_enabled():
            # create_graph=True: through the operator, whose own backward raises
            # (a second derivative must fail loudly), as _ConvGRUFunction does.
            results = conv_gru_bwd(grad.unsqueeze(0), h0, weight_hh, state.unsqueeze(0), gates.unsqueeze(0),
                                   aux.unsqueeze(0), *p.op_args, ctx.has_bias)
            results = (results[0].squeeze(0),) + tuple(results[1:])
        else:
            results = _backward_step(p, grad, h0, weight_hh, ctx.weights, state, gates, aux, ctx.has_bias)
        need = ctx.needs_input_grad
        d_x = d_weight_ih = None
        if need[0] or need[2]:
            d_x, d_weight_ih = p.conv_backward(results[0], x, weight_ih, need[0], need[2])
        _, d_h0, d_weight_hh, d_bias_ih, d_bias_hh = results
        bias = ctx.has_bias
        return (d_x, d_h0 if need[1] else None, d_weight_ih, d_weight_hh if need[3] else None,
                d_bias_ih if need[4] and bias else None, d_bias_hh if need[5] and bias else None, None)


# Function.apply without its Python wrapper, as _apply_function: fused_cell_step
# calls it only with no functorch transform active, where the wrapper's
# unwrapping of dead functorch tensors has nothing to do.
_apply_fused_cell = torch._C._FunctionBase.__dict__["apply"].__get__(None, _FusedCellFunction)


def fused_cell_step(x: Tensor, h: Optional[Tensor], weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                    bias_hh: Optional[Tensor], p: Plan) -> Optional[Tensor]:
    """One cell step with the input convolution inside the fused step's
    kernels (:func:`.fused_step.forward_step` with ``x`` and ``weight_ih``),
    differentiable (:class:`_FusedCellFunction`), or ``None``, having run
    nothing, where that does not apply: the caller then runs the cuDNN + gate-kernel path
    (``W_ih * x`` by cuDNN, then :func:`conv_gru_step`). ``x`` (N, C_in, Y,
    X), ``h`` (N, H, Y, X) or ``None`` (zeros, made here in x's layout, or
    W_ih's when that is channels_last, as the convolution's output would be),
    ``weight_ih`` (3H, C_in, kh, kw), ``weight_hh`` (3H, H, kh, kw), biases
    (3H,) or ``None``; returns h' (N, H, Y, X) in h's layout.

    Applies in eager mode only (not under torch.compile, jit.trace or ONNX
    export, functorch transforms, meta/fake tensors), where the plan may use
    the fused step and :func:`.fused_step.use_fused` says ``"fwd"`` for this
    state, with every tensor of one dtype and device; under autocast only
    when that dtype is already the autocast dtype (the layout policy's copies
    make it so on CUDA in float16/bfloat16; float32 biases are cast here),
    else autocast's casts are the cuDNN + gate-kernel path's."""
    if not p.fused_step or x.dim() != 4:
        return None
    if (torch.compiler.is_compiling() or torch._C._get_tracing_state()
            or torch._C._functorch.maybe_current_level() is not None or _shapes_only(x)):
        return None
    dtype, device = x.dtype, x.device
    zeros = h is None
    if zeros:  # zeroed only once the fused path is chosen (use_fused needs its shape and strides)
        shape = (x.shape[0], weight_hh.shape[1]) + tuple(x.shape[2:])
        h = empty_in_layout(shape, dtype, device, is_channels_last(x) or is_channels_last(weight_ih))
    # use_fused first: a cached decision, and under auto (the default) the usual
    # answer is no; this order took a declining call from 4.8 to 3.0 us (CPU, with hx).
    if h.dim() != 4 or not _fused.use_fused("fwd", p.reset_after, p.spec, h):
        return None
    cast = autocast_dtype(device.type)
    if cast is not None:
        if cast != dtype:
            return None
        if bias_ih is not None and autocast_result_dtype(bias_ih.dtype, cast) == dtype != bias_ih.dtype:
            # The cell's layout policy already cast input, hx and weights to the autocast dtype
            # (CUDA float16/bfloat16); float32 biases get autocast's cast here, as the operator's
            # autocast rule would give them (differentiable: their gradients come back float32).
            bias_ih, bias_hh = bias_ih.to(dtype), bias_hh.to(dtype)
    tensors = (h, weight_ih, weight_hh) + ((bias_ih, bias_hh) if bias_ih is not None else ())
    if any(t.dtype != dtype or t.device != device for t in tensors):
        return None
    if zeros:
        h.zero_()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, h, weight_ih, weight_hh, bias_ih, bias_hh)):
        if bias_ih is not None:
            bias_ih, bias_hh = _unwrap_if_dead(bias_ih), _unwrap_if_dead(bias_hh)
        return _apply_fused_cell(_unwrap_if_dead(x), _unwrap_if_dead(h), _unwrap_if_dead(weight_ih),
                                 _unwrap_if_dead(weight_hh), bias_ih, bias_hh, p)
    # No gradient: no autograd node, nothing saved (as _run's step without one).
    hidden, channels_last = h.shape[1], is_channels_last(h)
    state = _empty_frame(h, hidden, channels_last)
    if p.reset_after:
        gates = aux = None
    else:  # r, z and r * h are needed within the step: scratch
        gates, aux = _empty_frame(h, 3 * hidden, channels_last), _empty_frame(h, hidden, channels_last)
    if not _fused.forward_step(p.reset_after, p.spec, None, h, _hidden_weights(p, weight_hh), bias_ih, bias_hh,
                               state, gates, aux, False, x=x, weight_ih=weight_ih):
        return None  # declined (a shape or size the kernels do not take): nothing was written
    return state


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
    operators, whose vmap rules are in :mod:`.vmap`."""

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


# ----------------------------------------------------------------------------
# Autocast: one rule, registered with the dispatcher
# ----------------------------------------------------------------------------

# Device types with autocast in this build, asked once at import: under
# torch.compile, torch.amp.is_autocast_available is a graph break (torch 2.11),
# and asking a device without autocast (meta) about it raises.
_AUTOCAST_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia") if torch.amp.is_autocast_available(d)
)

# One C call that answers "autocast is off" for CPU and CUDA tensors (the
# common case) before asking the device; torch >= 2.4. It does not cover every
# device type (not "mps" in torch 2.13): others ask the device itself.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` computes in on ``device_type``, or ``None``
    when autocast is off there (or the device type has no autocast). Traceable
    by torch.compile without a graph break (torch 2.11 and later)."""
    if device_type in ("cpu", "cuda") and not torch.compiler.is_compiling() and not _any_autocast():
        return None
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t: Optional[Tensor], device_type: str, dtype: torch.dtype) -> Optional[Tensor]:
    """The operators' autocast rule for one argument, PyTorch's own rule for
    custom operators (:func:`torch.library.register_autocast`): a floating
    tensor on the autocast device, other than float64, is cast to ``dtype``;
    anything else passes unchanged. The cast is differentiable, so each input's
    gradient comes back in that input's own dtype."""
    if t is not None and t.is_floating_point() and t.dtype is not torch.float64 and t.device.type == device_type:
        return t.to(dtype)
    return t


def autocast_result_dtype(dtype: torch.dtype, cast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a tensor of ``dtype`` on the autocast device has after
    :func:`autocast_cast` to ``cast`` (``None``: autocast off), for the
    argument checks, which compare dtypes as the operators will see them."""
    if cast is not None and dtype.is_floating_point and dtype is not torch.float64:
        return cast
    return dtype


# torch.library.register_autocast casts to one dtype fixed at registration;
# the ConvGRU follows the autocast region's own dtype (float16 or bfloat16), so
# its rule is registered at the Autocast dispatch keys directly, as
# register_autocast does. Eager calls, torch.compile (AOTAutograd traces
# through the dispatcher) and torch.export all reach the operators through it.
_autocast_lib = torch.library.Library("convgru_triton", "IMPL")


def _autocast_key(device_type: str) -> str:
    """The name of ``device_type``'s Autocast dispatch key, e.g. ``AutocastCUDA``
    (torch._C._dispatch_key_for_device where this torch has it)."""
    key_for = getattr(torch._C, "_dispatch_key_for_device", None)
    return "Autocast" + (key_for(device_type) if key_for is not None else device_type.upper())


def _register_autocast(name: str, device_type: str, cast: bool) -> None:
    key = _autocast_key(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    overload = getattr(torch.ops.convgru_triton, name).default

    def autocast_kernel(*args):
        if cast:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(autocast_cast(a, device_type, dtype) if isinstance(a, Tensor) else a for a in args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return overload(*args)

    _autocast_lib.impl(name, autocast_kernel, key)


for _device_type in sorted(
    d for d in _AUTOCAST_DEVICE_TYPES
    if hasattr(torch._C.DispatchKey, _autocast_key(d))
):
    # The forward computes in the autocast dtype: its floating inputs (the
    # input pre-activations, the state, the hidden weight, the biases) are cast
    # to it, and it returns the states in it, as torch.nn.GRUCell does under
    # autocast. The backward runs in the forward's dtypes (its inputs are the
    # forward's saved tensors and the gradients of its outputs): autocast off,
    # nothing cast, also when .backward() is called inside an autocast region.
    _register_autocast("conv_gru_fwd", _device_type, cast=True)
    _register_autocast("conv_gru_bwd", _device_type, cast=False)


def _shapes_only(gates_x: Tensor) -> bool:
    """Meta or fake tensors: the operator's fake implementation gives the
    shapes without stepping through time (and launches no kernel)."""
    return gates_x.is_meta or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def _runner(gates_x: Tensor):
    """What runs the operator for this call, or ``None`` for the eager replay of
    the plan. torch.compile sees the operator; torch.func transforms (vmap,
    grad, ...) a Function with setup_context around it; meta and fake tensors
    the operator's fake implementation."""
    if torch.compiler.is_compiling():
        return conv_gru_fwd
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return _ConvGRUFunctorch.apply
    if _shapes_only(gates_x):
        return conv_gru_fwd
    return None


def _plain_eager(gates_x: Tensor) -> bool:
    """True outside torch.compile, autocast, tracing (jit.trace, ONNX),
    functorch transforms (vmap, grad) and meta/fake tensors: where the eager
    replay applies as is."""
    return not (
        torch.compiler.is_compiling()
        or autocast_dtype(gates_x.device.type) is not None
        or torch._C._get_tracing_state()
        or torch._C._functorch.maybe_current_level() is not None
        or _shapes_only(gates_x)
    )


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
    biases (3H,) as in :func:`convgru_triton.ops.sequence.naive.conv_gru_cell_ref`, which
    this equals step by step. Under autocast it runs the operator, whose
    registered autocast rule (:func:`autocast_cast`) casts the floating inputs
    to the autocast dtype and runs with autocast off: the states come back in
    that dtype, as cuDNN's RNNs and torch.nn.GRUCell do.
    Under torch.jit.trace and ONNX export it runs
    :func:`~convgru_triton.ops.sequence.naive.conv_gru_sequence_ref` instead (standard
    operators only; docs/deploying.md).
    """
    if torch.jit.is_tracing() or (torch.compiler.is_compiling() and _exporting_to_onnx()):
        # torch.jit.trace and both ONNX exporters record the reference math:
        # standard operators only, no custom operator to translate.
        return naive.conv_gru_sequence_ref(gates_x, h0, weight_hh, bias_ih, bias_hh, spec, reset_after, reverse)
    run = _runner(gates_x)
    cast = autocast_dtype(gates_x.device.type)
    if run is None:
        if cast is not None:
            # Eager autocast: the operator's autocast rule applied here, then the
            # same replay as plain eager; the dispatcher's custom-op call costs
            # 10-30 us with autograd (it stays for compile, export and fakes).
            device_type = gates_x.device.type
            gates_x, h0, weight_hh, bias_ih, bias_hh = (
                autocast_cast(t, device_type, cast) for t in (gates_x, h0, weight_hh, bias_ih, bias_hh)
            )
        return _run(plan(spec, reset_after, reverse, use_triton), gates_x, h0, weight_hh, bias_ih, bias_hh, False)
    elif cast is not None and run is not conv_gru_fwd:
        # torch.func (_ConvGRUFunctorch.apply): the Function saves its inputs
        # for its backward, which must see them as the operator's forward did:
        # cast by the same rule here, before the Function (the operator inside
        # then casts nothing). (An identity test with conv_gru_fwd, not with the
        # bound method apply: torch.compile cannot compare those, a graph break.)
        device_type = gates_x.device.type
        gates_x, h0, weight_hh, bias_ih, bias_hh = (
            autocast_cast(t, device_type, cast) for t in (gates_x, h0, weight_hh, bias_ih, bias_hh)
        )
    tensors: Sequence[Optional[Tensor]] = (gates_x, h0, weight_hh, bias_ih, bias_hh)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    states, _, _ = run(
        gates_x, h0, weight_hh, bias_ih, bias_hh,
        list(spec.kernel_size), list(spec.dilation), spec.padding_mode,
        reset_after, reverse, use_triton, save,
    )
    return states


def conv_gru_step(gates_x: Tensor, h: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                  bias_hh: Optional[Tensor], p: Plan) -> Tensor:
    """One step of the plan ``p``: (N, 3H, *S) input pre-activations and the
    (N, H, *S) state -> the new state. The cell's path: in plain eager mode the
    plan is replayed on the frames themselves (no time dim to add and remove);
    otherwise (torch.compile, autocast, tracing, functorch, meta/fake tensors)
    it is :func:`conv_gru_sequence` with T = 1, the operator and its routing."""
    if _plain_eager(gates_x):
        return _run(p, gates_x, h, weight_hh, bias_ih, bias_hh, True)
    # squeeze(0), not [0]: its backward keeps the gradient's layout, where
    # select's backward would build a contiguous zero tensor.
    return conv_gru_sequence(
        gates_x.unsqueeze(0), h, weight_hh, bias_ih, bias_hh, p.spec, p.reset_after, False, p.use_triton
    ).squeeze(0)


def conv_gru_step_compiled(gates_x: Tensor, h: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                           bias_hh: Optional[Tensor], spec: ConvSpec, reset_after: bool) -> Tensor:
    """One step as torch.compile traces it: the reference math
    (:func:`~convgru_triton.ops.sequence.naive.conv_gru_cell_ref`: the hidden
    convolutions and pointwise ops), which Inductor fuses into kernels of its
    own, forward and backward, in the layouts it chooses, and launches from
    its generated code. The operator would stay an opaque node with a Python
    dispatch per step: on the host (CPU, GPU work stubbed, bench/host_overhead)
    a compiled 12-step loop of that cost 1.6-2.2x eager, and on an H200
    the compiled cell ran 0.23-0.44x as fast as eager
    (bench/results/gpu_check-nvidia-h200-2026-12-04.md); the traced math
    costs 0.41-0.48x (bench/results/host_overhead-cpu-compiled.md, the loop
    row). Sequences
    keep the operator (compile time would grow with T).

    Under autocast the inputs get the operators' autocast rule
    (:func:`autocast_cast`), so the step computes in and returns the autocast
    dtype, as the operator does.
    """
    cast = autocast_dtype(gates_x.device.type)
    if cast is not None:
        device_type = gates_x.device.type
        gates_x, h, weight_hh, bias_ih, bias_hh = (
            autocast_cast(t, device_type, cast) for t in (gates_x, h, weight_hh, bias_ih, bias_hh)
        )
    return naive.conv_gru_cell_ref(gates_x, h, weight_hh, bias_ih, bias_hh, spec, reset_after)
