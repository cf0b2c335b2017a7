"""The decision layer of an eager cell step: one frozen plan per call signature.

A cell stepped in a Python loop (RAFT's update: 12-32 steps per frame pair)
pays its host time on every step, and at RAFT's sizes that host time is longer
than the GPU time of the step. So everything that can be decided once is
decided once, when a call signature is first seen, and kept in a
:class:`CellPlan`:

* the mode (plain eager; torch.compile, jit.trace, functorch transforms,
  meta/fake tensors and the eager backend keep the general path of
  :func:`convgru_triton.functional.conv_gru_cell`),
* the compute dtype after autocast, and the casts autocast implies,
* the memory format (the layout policy, :mod:`._layout`),
* the step path per direction (cuDNN + the gate kernels, or the fused step,
  from the settings and the tuning registry),
* every buffer's shape and strides, and every Triton launch: the first step
  of a plan runs through the general launchers and records what they launched
  (compiled kernel, grid, arguments); every later step calls the compiled
  kernels with those pre-packed arguments, passing only the tensors.

The call signature (the key :func:`cell_forward` and :func:`sep_forward`
build, with :func:`_weights_key`) holds every fact the plan depends on:
shapes, strides, dtypes and device of input, state and weights, the weights'
addresses, the low address bits of input and state (Triton specializes on
16-byte alignment), grad mode and which tensors require grad, the autocast
dtype, the module's arguments and the settings' and tuning registry's
generations (:data:`convgru_triton._settings.generation`). A different fact
is a different plan; nothing below the plan asks again.

Plans live on the module (``module._cell_plans``), so a plan never outlives
the parameters it was made for. Under autocast the weights' casts are kept
for the autocast region, as autocast keeps its own (:class:`_WeightCasts`);
outside it they are made at every call.

Training runs one autograd node per step (:class:`_CellStep`, and
:class:`_SepStep` for both halves of a separable step), whose backward
(:func:`_step_backward`) calls ``aten.convolution_backward`` once per
convolution, the bias gradients included; on the fused path it calls none:
every data and weight gradient is a Triton launch, bound after the first step
(a trainable bias of a frozen weight is an aten sum; ``create_graph=True``
runs the registered operator).
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Callable, Optional, Tuple

import torch

from . import _backend, _settings, _tuning
from ._backend import select_backend
from ._conv import ConvSpec, same_conv
from ._layout import empty_in_layout, is_channels_last

Tensor = torch.Tensor

#: How plans allocate their buffers (uninitialised). The tests replace it to
#: poison every buffer with NaN before the kernels write it.
_allocate = torch.empty

_MAX_PLANS = 64  # per module: distinct call signatures (a sweep over sizes): cleared when full

# Launch options that Triton takes as keywords but does not pass to the kernel.
_OPTIONS = frozenset(("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "debug",
                      "launch_cooperative_grid", "launch_pdl"))

_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)
_tracing_state = torch._C._get_tracing_state
_functorch_level = torch._C._functorch.maybe_current_level
_dispatch_mode = torch._C._get_dispatch_mode
_FAKE = torch._C._TorchDispatchModeKey.FAKE
# Dynamo folds it to True while tracing (torch.compile, strict export); non-strict
# export runs the module under a fake-tensor mode, which the same test catches.
# One frame, where torch.compiler.is_compiling makes two.
_is_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_autocast_enabled = torch.is_autocast_enabled
_get_autocast_dtype = torch.get_autocast_dtype


# ----------------------------------------------------------------------------
# Bound launches
# ----------------------------------------------------------------------------


class Launch:
    """One kernel launch of a plan, bound to its compiled kernel: the grid and
    every argument after the tensors are fixed by the plan's signature, so a
    step passes only the stream and the tensors. ``None`` entries are launches
    that could not be bound (the Triton interpreter, which compiles nothing;
    a launch whose tensors the launcher had to copy): those go through the
    general launcher at every step."""

    __slots__ = ("run", "go", "grid", "function", "metadata", "launch_metadata", "tail")

    def __init__(self, run, function, metadata, launch_metadata, grid: tuple, tail: tuple):
        self.run = run
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        # The launch without hooks as a partial of the compiled kernel's own
        # launcher: a step calls it without a Python frame of ours
        # (``go(stream, function, metadata, None, None, None, *tensors, *tail)``).
        self.go = functools.partial(run, *self.grid)
        self.function, self.metadata, self.launch_metadata = function, metadata, launch_metadata
        self.tail = tail

    def __call__(self, stream, *tensors) -> None:
        """The launch with a launch hook registered (a step that is not
        "quiet", see ``_runtime``; else a step calls :attr:`go`): a
        profiler's hooks see what Triton's own launch gives them."""
        args = tensors + self.tail
        meta = self.launch_metadata(self.grid, stream, *args)
        self.run(*self.grid, stream, self.function, self.metadata, meta, _runtime.launch_enter_hook,
                 _runtime.launch_exit_hook, *args)


_runtime = None  # triton.knobs.runtime, set by _triton()
_HookChain = None  # triton.knobs.HookChain where this Triton has it


# "quiet": no launch hook is registered (a profiler's), so launches need neither
# launch metadata nor hooks; Triton >= 3.5 keeps an empty chain for none. Tested
# inline where a step launches (no frame):
#     enter, leave = _runtime.launch_enter_hook, _runtime.launch_exit_hook
#     quiet = (enter is None or enter.__class__ is _HookChain and not enter.calls) and (
#         leave is None or leave.__class__ is _HookChain and not leave.calls)


def _triton():
    global _runtime, _HookChain
    import triton

    _runtime = triton.knobs.runtime
    _HookChain = getattr(triton.knobs, "HookChain", None)
    return triton


def _bind_record(record, tensors: tuple) -> Optional[Launch]:
    """A :class:`Launch` from a fused launcher's record ``(kernel, grid,
    positional, keywords, compiled)``, whose tensor arguments must be exactly
    ``tensors`` (the same objects, in order), else ``None``."""
    kernel, grid, positional, keywords, compiled = record
    if compiled is None or not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata",
                                                                  "launch_metadata")):
        return None
    n = len(tensors)
    if len(positional) < n or any(a is not b for a, b in zip(positional, tensors)):
        return None
    fn = getattr(kernel, "fn", None)
    if fn is None:
        return None
    call = {k: v for k, v in keywords.items() if k not in _OPTIONS}
    bound = inspect.signature(fn).bind(*positional, **call)
    bound.apply_defaults()
    return Launch(compiled.run, compiled.function, compiled.packed_metadata, compiled.launch_metadata, grid,
                  tuple(bound.arguments.values())[n:])


def _bind_gate(entry, tensors: tuple) -> Optional[Launch]:
    """A :class:`Launch` from a gate launch's replay entry (see
    ``gates.kernels._launch``): the compiled kernel's handles, the arguments
    after the pointers and the grid."""
    if entry is None:
        return None
    run, function, packed, launch_metadata, tail, _, grid = entry
    return Launch(run, function, packed, launch_metadata, grid, tuple(tail))


# ----------------------------------------------------------------------------
# Weight casts kept per plan
# ----------------------------------------------------------------------------


class _WeightCasts:
    """A cell's four parameters in the plan's dtype and memory format. The
    cast is differentiable: each parameter's ``.grad`` comes back in its own
    dtype and layout.

    Under autocast the casts are reused within one autocast region, as
    autocast reuses its own casts of leaf tensors that require grad (its
    weight cache), and made again in another region, when a weight is
    replaced or gets a new storage (``.data =``), when its ``_version`` moves
    (an in-place update; a fused optimizer's step does not move it), and for
    a call with grad mode on where the kept casts were made without. An
    in-place update through ``.data`` inside one region is not seen, as
    autocast's cache does not see it. Outside autocast PyTorch gives no
    signal that a cast went stale, so the weights are cast at every call. The
    region is read from autocast's cache itself (:meth:`region`). The last
    casts stay referenced until a call sees another region. Measured on the
    CI machine (CPU, torch 2.13): a weight's cast ~3 us, the region ~2.4 us,
    so RAFT's separable step saves ~20 us a step from its eight casts."""

    __slots__ = ("dtype", "fmt", "sentinels", "kept", "split")

    def __init__(self, dtype: Optional[torch.dtype], fmt: Optional[torch.memory_format], device: torch.device):
        self.dtype, self.fmt = dtype, fmt
        self.sentinels = None  # two empty float32 leaves that require grad on device (see region)
        if dtype is not None:
            with torch.inference_mode(False):
                self.sentinels = (torch.zeros((0, 1), device=device, requires_grad=True),
                                  torch.zeros((1, 0), device=device, requires_grad=True))
        self.kept = None  # (region, the parameters' ids, addresses and versions, casts, grad mode, parameters)
        self.split = (None, None, None, None)  # see _split

    def region(self):
        """A token of the autocast region now open, the same object for every
        call within it: the autograd node of autocast's cached cast of an empty
        leaf (``torch.mm`` of two empty tensors, which launches nothing).
        Autocast keeps that cast until its outermost region exits
        (``torch.autocast.__exit__`` clears its cache), so a new region gives a
        new node. With autocast's cache disabled every call gives a new node
        (nothing is reused); in inference mode there is no node: ``None``."""
        if _grad_enabled():
            node = _mm(*self.sentinels).grad_fn
        else:
            _set_grad_enabled(True)
            try:
                node = _mm(*self.sentinels).grad_fn
            finally:
                _set_grad_enabled(False)
        return None if node is None else node.next_functions[0][0]

    def _one(self, w: Tensor) -> Tensor:
        if w.dim() == 1:  # a bias: a dense vector, as the kernels index it (a view may be strided)
            if self.dtype is not None and w.dtype != self.dtype and w.dtype is not torch.float64:
                w = w.to(self.dtype)
            return w.contiguous()
        fmt = self.fmt if self.fmt is not None and w.dim() in (4, 5) else None
        if self.dtype is not None and w.dtype != self.dtype and w.dtype is not torch.float64:
            return w.to(dtype=self.dtype, memory_format=fmt or torch.preserve_format)
        if fmt is not None:
            return w.contiguous(memory_format=fmt)
        return w

    def _all(self, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh) -> tuple:
        one = self._one
        if b_ih is None:
            return one(w_ih), one(w_hh), None, None
        return one(w_ih), one(w_hh), one(b_ih), one(b_hh)

    def __call__(self, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh, region=None, grad: bool = False) -> tuple:
        """The four casts; ``region``: the autocast region's token where the
        weights require grad (else ``None``: cast now); ``grad``: grad mode
        is on. Casts made without grad mode carry no autograd history, so
        they are not reused by a call with grad mode on (that would drop the
        weights' gradients, which autocast's own cache does in that case)."""
        if region is None:
            return self._all(w_ih, w_hh, b_ih, b_hh)
        params = (w_ih, w_hh) if b_ih is None else (w_ih, w_hh, b_ih, b_hh)
        # The parameters' ids, their addresses (a storage swapped by ``.data =``) and versions.
        ids = (tuple(map(id, params)), tuple(map(_DATA_PTR, params)), tuple(map(_VERSION, params)))
        kept = self.kept
        if kept is not None and kept[0] is region and kept[1] == ids and (kept[3] or not grad):
            return kept[2]
        casts = self._all(w_ih, w_hh, b_ih, b_hh)
        if all(map(_IS_LEAF, params)):  # autocast keeps casts of leaves only
            # Holding the parameters keeps their ids from being reused while kept.
            self.kept = (region, ids, casts, grad, params)
        return casts


def _weight_casts(module, dtype: Optional[torch.dtype], fmt, device: torch.device) -> _WeightCasts:
    """The module's :class:`_WeightCasts` for a dtype, format and device,
    shared by its plans (the first step of RAFT's loop, whose state is still
    float32, has a plan of its own), kept on the module as its plans are."""
    store = module._weight_casts  # a class attribute, None, until the first plan
    if store is None:
        store = module.__dict__["_weight_casts"] = {}
    key = (dtype, fmt, device)
    casts = store.get(key)
    if casts is None:
        casts = store[key] = _WeightCasts(dtype, fmt, device)
    return casts


_VERSION = operator.attrgetter("_version")
_IS_LEAF = operator.attrgetter("is_leaf")
_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled
_mm = torch.mm
_split_with_sizes = torch.split_with_sizes  # one dispatch for two views: ~1.6 us against ~3 for two slices


# ----------------------------------------------------------------------------
# The plan of one cell step
# ----------------------------------------------------------------------------

_GATES, _FUSED, _GENERAL = "gates", "fused", "general"


class CellPlan:
    """Everything one call signature of a cell step needs beyond its tensors.

    ``path``: ``"gates"`` (cuDNN convolutions + the Triton gate kernels),
    ``"fused"`` (the fused convolution-and-gate kernels, the input convolution
    inside them) or ``"general"`` (:func:`convgru_triton.functional.conv_gru_cell`:
    the eager backend, unbatched input, padding modes other than zeros, and
    whatever the bound paths do not cover)."""

    #: Triton forced on CPU tensors: valid only while the interpreter is on (see cell_forward)
    recheck = False
    #: the fused backward's gradient buffers, made at its first step (_wgrad_buffers)
    empty_x = None

    def __init__(self, path: str, **facts):
        self.path = path
        self.__dict__.update(facts)


def _general(module, x, hx):
    from .functional import conv_gru_cell

    return conv_gru_cell(x, hx, module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh,
                         reset_after=module.reset_after, padding_mode=module.padding_mode,
                         dilation=module.dilation, backend=module.backend)


def _build(module, x, hx, grad: bool, cast: Optional[torch.dtype]) -> CellPlan:
    """Check the call (the checks of the general path, raising on bad input)
    and decide everything a step of this signature needs."""
    from .functional import _cached_cell_plan

    params = module._parameters
    w_ih, w_hh, b_ih, b_hh = params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
    # The general path's checks and plan, kept where the general path finds
    # them (a call that this plan hands to it is not checked twice).
    general = _cached_cell_plan(x, hx, w_ih, w_hh, b_ih, b_hh, module.reset_after, module.padding_mode,
                                module.dilation, module.backend)
    spec = general.spec
    if (not general.use_triton or not general.batched or general.step is None or spec.padding_mode != "zeros"
            or x.device.type == "meta" or (hx is not None and hx.dtype != x.dtype and cast is None)):
        return CellPlan(_GENERAL)
    compute = cast if (cast is not None and x.dtype is not torch.float64) else x.dtype
    for t in (w_ih, w_hh, b_ih, b_hh, hx):
        if t is not None and t.dtype is torch.float64 and compute is not torch.float64:
            return CellPlan(_GENERAL)  # float64 under autocast stays float64: the general path's rule
    fmt = general.memory_format
    triton = _triton()
    from .ops.gates import kernels as gate_kernels

    # Replay where the gate launchers replay (the direct_launch setting, Triton >= 3.4, not the interpreter).
    bindable = bool(gate_kernels._DIRECT_LAUNCH)
    active = None
    if bindable:
        try:
            active = triton.runtime.driver.active
        except RuntimeError:  # no GPU driver (CPU tensors, interpreter pretended): nothing to bind
            bindable = False
    if active is not None:
        device_index, get_stream = active.get_current_device(), active.get_current_stream
    else:  # the interpreter: no driver, nothing compiled, every launch through the general launchers
        device_index, get_stream = None, _no_stream
    hidden = general.hidden
    conv_backward, conv_args = _conv_backward_function(spec, 3 * hidden)
    n = x.shape[0]
    spatial = tuple(x.shape[2:])
    facts = dict(
        spec=spec, reset_after=general.reset_after, hidden=hidden, grad=grad, compute=compute, fmt=fmt,
        conv=_conv_function(spec), conv_backward=conv_backward, conv_args=conv_args,
        step=general.step,
        stream=get_stream, device_index=device_index,
        has_bias=b_ih is not None,
        # casts of x / hx at every call (autocast, the layout policy); the weights' see _WeightCasts
        cast_x=(x.dtype != compute) or (fmt is not None and not _in_format(x, fmt)),
        cast_h=hx is not None and ((hx.dtype != compute) or (fmt is not None and not _in_format(hx, fmt))),
        weight_cast=_weight_casts(module, compute if cast is not None else None, fmt, x.device),
        # autocast keeps its casts of weights that require grad for the region: so do the plan's
        keep_casts=cast is not None and all(t.requires_grad for t in (w_ih, w_hh, b_ih, b_hh) if t is not None),
        caller_channels_last=is_channels_last(x if hx is None else hx),
        state_shape=(n, hidden) + spatial, gates_shape=(n, 3 * hidden) + spatial,
        state_channels_last=None,  # the state's layout: known at the first step (_layout_of_state)
        launches={},
        recheck=general.recheck_backend,
        bindable=bindable,
        cast_w=cast is not None or fmt is not None or _strided_biases(b_ih, b_hh),
        l_ra_fwd=None, l_rz_fwd=None, l_up_fwd=None, l_ra_bwd=None, l_up_bwd=None, l_rg_bwd=None,
        l_fra=None, l_frz=None, l_fn=None, l_fdg=None, l_fdrg=None, l_fwh=None, l_fwi=None, l_fdx=None, l_fdxa=None,
        fused_bwd=False,
        rz_n=[2 * hidden, hidden],  # the reset/update and candidate channels of a gates tensor
    )
    fused = (general.fused_cell and len(spatial) == 2 and x.device.type != "meta")
    if fused:
        from .ops.fused_step import kernels as fused_step

        probe = torch.empty(facts["state_shape"], dtype=compute, device=x.device)
        fused = fused_step.use_fused("fwd", general.reset_after, spec, probe)
        facts["fused_bwd"] = fused and fused_step.use_fused("bwd", general.reset_after, spec, probe)
    return CellPlan(_FUSED if fused else _GATES, **facts)


_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def _conv_function(spec: ConvSpec) -> Callable:
    """``(x, weight) -> weight * x``, 'same' padded: ``torch.conv{1,2,3}d`` with
    the spec's arguments bound (a partial: no Python frame per call) where the
    padding is symmetric, else :func:`~convgru_triton._conv.same_conv`'s."""
    padding = spec.conv_padding
    if padding is None or spec.padding_mode != "zeros":
        return same_conv(spec)[0]
    return functools.partial(_CONV[spec.dims], bias=None, stride=1, padding=padding, dilation=spec.dilation)


def _conv_backward_function(spec: ConvSpec, bias_channels: int) -> Tuple[Callable, tuple]:
    """``(backward, args)``: ``backward(grad_output, x, weight, *args,
    output_mask) -> (d_x, d_weight, d_bias)`` of :func:`_conv_function`,
    ``output_mask`` a value of :data:`_MASKS` (which of the three to compute;
    the others are ``None``). ``d_bias`` is the gradient of a bias of
    ``bias_channels`` added to the convolution's output (its sum over batch
    and space), computed by the same ``aten.convolution_backward`` call as the
    other two: one dispatch fewer than a separate ``sum``. Where the padding
    is symmetric ``backward`` is the op's C entry point and ``args`` its
    arguments between the tensors and the mask, so a call makes no Python
    frame (positional: keywords cost ~2 us a call more on the CI machine,
    torch 2.13); else a function of the same signature that pads first."""
    padding = spec.conv_padding
    bias_sizes = [bias_channels]
    if padding is None or spec.padding_mode != "zeros":
        general = same_conv(spec)[1]
        dims = (0,) + tuple(range(2, spec.dims + 2))

        def backward_padded(grad_output, x, weight, bias_sizes, output_mask):
            d_x, d_w = general(grad_output, x, weight, output_mask[0], output_mask[1])
            return d_x, d_w, grad_output.sum(dims) if output_mask[2] else None

        return backward_padded, (bias_sizes,)
    overload = torch.ops.aten.convolution_backward.default
    dims = spec.dims
    return getattr(overload, "_op", overload), (bias_sizes, [1] * dims, list(padding), list(spec.dilation), False,
                                                [0] * dims, 1)


#: ``(need d_x, need d_weight, need d_bias)`` -> aten.convolution_backward's output_mask
_MASKS = {(i, w, b): [i, w, b] for i in (False, True) for w in (False, True) for b in (False, True)}


def _strided_biases(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> bool:
    """Biases that are not dense vectors (a sliced or expanded Parameter): the
    kernels index them densely, so a plan makes them dense at every call."""
    return b_ih is not None and not (b_ih.is_contiguous() and b_hh.is_contiguous())


def _no_stream(device):
    return None


def _in_format(t: Tensor, fmt) -> bool:
    return t.is_contiguous(memory_format=fmt)


def _gate_slow(p: CellPlan, site: str, L, stream, tensors: tuple, general: Callable) -> None:
    """A gate launch off the fast path: bound with a launch hook registered (a
    profiler's), else ``general(launches)`` with ``gates.kernels``' general
    ``GateLaunches`` (the first step of a plan), which binds the site to the
    compiled kernel it returns (or marks it unbindable). ``tensors`` are the
    launch's pointers in the kernel's order, as the bound launch passes them."""
    if L:
        L(stream, *tensors)
        return
    from .ops.gates import kernels as gate_kernels

    entry = general(gate_kernels._GENERAL)
    if site not in p.launches:
        bound = _bind_gate(entry, tensors) if p.bindable else None
        p.launches[site] = bound
        setattr(p, "l_" + site, bound or False)


def _fused_general(p: CellPlan, sites: Tuple[str, ...], tensors: Tuple[tuple, ...], call: Callable) -> bool:
    """Fused launches through the general launcher (``call()``, which returns
    what ``fused_step.forward_step`` returns); the first time, records them and
    binds each site to its compiled kernel."""
    from .ops.fused_step import kernels as fused_step

    first = sites[0] not in p.launches
    records = [] if first else None
    previous = fused_step._RECORD
    fused_step._RECORD = records
    try:
        ran = call()
    finally:
        fused_step._RECORD = previous
    if first:
        ok = ran and p.bindable and len(records) == len(sites)
        for i, site in enumerate(sites):
            bound = _bind_record(records[i], tensors[i]) if ok else None
            p.launches[site] = bound
            setattr(p, "l_" + site, bound or False)
    return bool(ran)


def _first_step(p: CellPlan, x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor) -> None:
    """What the first step of a plan learns from its tensors: the state's
    layout, hence every buffer's (the general path's rule: the state's own,
    else the input convolution's, which is channels_last where its input or
    weight is)."""
    if h is not None:
        cl = is_channels_last(h)
    else:
        cl = is_channels_last(x) or is_channels_last(w_ih)
    if len(p.state_shape) not in (4, 5):
        cl = False
    p.state_channels_last = cl
    fmt = torch.contiguous_format
    if cl:
        fmt = torch.channels_last if len(p.state_shape) == 4 else torch.channels_last_3d
    dtype, device = p.compute, x.device

    # partial objects: called without a Python frame of their own.
    p.empty1 = functools.partial(_allocate, p.state_shape, dtype=dtype, device=device, memory_format=fmt)
    p.empty3 = functools.partial(_allocate, p.gates_shape, dtype=dtype, device=device, memory_format=fmt)
    p.state_strides = p.empty1().stride()
    p.gates_strides = p.empty3().stride()
    p.backward_strides = (p.state_strides, p.state_strides, p.gates_strides, p.state_strides)
    # The layouts of the input and weights as the forward saw them, which the
    # fused backward's gradients take (saved-tensor hooks may hand them back in another).
    p.x_format, p.w_formats = _format_of(x), (_format_of(w_ih), _format_of(w_hh))


def _split(p: CellPlan, w_hh: Tensor) -> tuple:
    """``(w_hh, its address, w_hh[:2H], w_hh[2H:])``: the hidden weight's
    reset/update rows and candidate rows, kept with the module's weight casts (one pair per module,
    dtype and layout, so an old storage is not held by an unused plan) while
    ``w_hh`` is the same tensor at the same address: two slicing dispatches a
    step fewer (~1.3 us each on the CI machine). The views share ``w_hh``'s
    storage, so an in-place update shows through; a new storage under the same
    Parameter (``.data =``) moves the address and makes them again (the check
    is inline where they are used: no frame a step)."""
    hidden = p.hidden
    split = p.weight_cast.split = (w_hh, w_hh.data_ptr(), w_hh[: 2 * hidden], w_hh[2 * hidden:])
    return split


def _gates_forward(p: CellPlan, gx: Tensor, h: Tensor, w_hh: Tensor, b_ih, b_hh, save: bool):
    """One step of cuDNN hidden convolution(s) + the gate kernels; returns
    ``(h', gates, aux)`` (gates and aux ``None`` without ``save`` and reset_after).
    Each launch's pointers are in its kernel's order; without biases the
    launch's output stands in for their pointers (never read), as
    ``GateLaunches`` passes it."""
    stream = p.stream(p.device_index)
    enter, leave = _runtime.launch_enter_hook, _runtime.launch_exit_hook  # quiet: see _runtime
    quiet = (enter is None or enter.__class__ is _HookChain and not enter.calls) and (
        leave is None or leave.__class__ is _HookChain and not leave.calls)
    has_bias = p.has_bias
    conv = p.conv
    if p.reset_after:
        gh = conv(h, w_hh)
        h_new = p.empty1()
        if save:
            gates, aux = p.empty3(), p.empty1()
        else:
            gates = aux = None
        t = ((gx, gh, h, h_new, gates, aux) if save else (gx, gh, h, h_new, h_new, h_new)) + (
            (b_ih, b_hh) if has_bias else (h_new, h_new))
        L = p.l_ra_fwd
        if L and quiet:
            L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
        else:
            _gate_slow(p, "ra_fwd", L, stream, t, lambda g: g.reset_after_fwd(
                gx, gh, h, b_ih, b_hh, h_new=h_new, gates=gates, aux=aux))
        return h_new, gates, aux
    split = p.weight_cast.split
    if split[0] is not w_hh or split[1] != w_hh.data_ptr():
        split = _split(p, w_hh)
    w_rz, w_n = split[2], split[3]
    gh = conv(h, w_rz)
    gates, rh = p.empty3(), p.empty1()
    t = (gx, gh, h, gates, rh) + ((b_ih, b_hh) if has_bias else (rh, rh))
    L = p.l_rz_fwd
    if L and quiet:
        L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
    else:
        _gate_slow(p, "rz_fwd", L, stream, t, lambda g: g.reset_gate_fwd(
            gx, gh, h, b_ih, b_hh, gates=gates, rh=rh))
    gh_n = conv(rh, w_n)
    h_new = p.empty1()
    t = (gx, gh_n, h, gates, h_new) + ((b_ih, b_hh) if has_bias else (h_new, h_new))
    L = p.l_up_fwd
    if L and quiet:
        L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
    else:
        _gate_slow(p, "up_fwd", L, stream, t, lambda g: g.update_fwd(
            gx, gh_n, gates, h, b_ih, b_hh, save, h_new=h_new))
    return h_new, gates, rh


def _conforming(p: CellPlan, grad: Tensor, h: Tensor, gates: Tensor, aux: Tensor):
    """The backward's inputs dense and aligned in the plan's layouts, as the
    bound launches were compiled for: ``out.sum().backward()`` hands over a
    stride-0 gradient, and saved-tensor hooks (``save_on_cpu``) may give the
    saved tensors back in another layout. Called where the backward's one
    pass over the four found one that does not conform (see _step_backward)."""
    if grad.stride() != p.state_strides or grad.data_ptr() & 15:
        grad = p.empty1().copy_(grad)
    if h.stride() != p.state_strides or h.data_ptr() & 15:
        h = p.empty1().copy_(h)
    if gates.stride() != p.gates_strides or gates.data_ptr() & 15:
        gates = p.empty3().copy_(gates)
    if aux.stride() != p.state_strides or aux.data_ptr() & 15:
        aux = p.empty1().copy_(aux)
    return grad, h, gates, aux


def _step_backward(p: CellPlan, fused: bool, grad: Tensor, x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                   gates: Tensor, aux: Tensor, need: tuple, d_x_into: Optional[Tensor] = None):
    """The backward of :func:`_half_forward` (with grad mode off; else
    :func:`_graph_backward`):
    ``(d_x, d_h, d_weight_ih, d_weight_hh, d_bias_ih, d_bias_hh)``, ``None`` where
    ``need`` (``needs_input_grad`` over the same six) is false. The gate
    kernels' backward, then the convolutions' gradients: with ``fused`` (the
    fused kernels ran forward and the plan's backward is fused) all of them
    as Triton kernels (the hidden convolutions' dgrad with the gate backward
    in their epilogue, the input's dgrad, every weight and bias gradient: no
    cuDNN call, each launch bound; a trainable bias of a frozen weight is an
    aten sum); else cuDNN's convolution backward, one
    call per convolution, the bias gradients out of the same calls.
    ``d_x_into``: with ``fused``, a tensor the input's gradient is added to
    (the other half's of a separable step), returned as ``d_x``."""
    has_bias, reset_after = p.has_bias, p.reset_after
    need_b_ih, need_b_hh = has_bias and need[4], has_bias and need[5]
    # Without reset_after both biases' gradient is the input convolution's.
    input_bias, hidden_bias = need_b_ih or (need_b_hh and not reset_after), need_b_hh and reset_after
    stream = p.stream(p.device_index)
    enter, leave = _runtime.launch_enter_hook, _runtime.launch_exit_hook  # quiet: see _runtime
    quiet = (enter is None or enter.__class__ is _HookChain and not enter.calls) and (
        leave is None or leave.__class__ is _HookChain and not leave.calls)
    four = (grad, h, gates, aux)
    if tuple(map(_STRIDE, four)) != p.backward_strides or bytes(map(_LOW_BITS, map(_DATA_PTR, four))) != _ALIGNED4:
        grad, h, gates, aux = _conforming(p, grad, h, gates, aux)
    d_gx, d_h = p.empty3(), p.empty1()
    conv_backward, args = p.conv_backward, p.conv_args
    hidden = p.hidden
    need_weight = need[3]
    if fused:
        # The bound launches were compiled for the strides and alignment of the
        # first fused backward's input and weights (_wgrad_buffers); saved-tensor
        # hooks may hand them back otherwise. Weights are copied back to those;
        # an input the wgrad launch was not compiled for (it may be anything, an
        # expanded one included) goes through the general launcher. The offsets
        # fit 32 bits: the fused forward checked x, h, gates and aux, and the
        # gradients share their strides. (map: no Python call per tensor.)
        if p.empty_x is None:
            _wgrad_buffers(p, x, w_ih, w_hh)
        three = (x, w_ih, w_hh)
        strides, low = tuple(map(_STRIDE, three)), bytes(map(_LOW_BITS, map(_DATA_PTR, three)))
        if strides[1:] != p.bound_strides[1:] or low[1] or low[2]:
            w_ih, w_hh = map(_strided_copy, (w_ih, w_hh), p.bound_strides[1:])
        x_bound = strides[0] == p.bound_strides[0] and not (p.x_aligned and low[0])
    d_w = d_b = None
    if reset_after:
        d_gh = p.empty3()
        t = (grad, grad, gates, aux, h, d_gx, d_gh, d_h)
        L = p.l_ra_bwd
        if L and quiet:
            L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
        else:
            _gate_slow(p, "ra_bwd", L, stream, t, lambda g: g.reset_after_bwd(
                grad, None, gates, aux, h, d_gx=d_gx, d_gh=d_gh, d_h=d_h))
        if not fused:
            d_h_conv, d_w, d_b = conv_backward(d_gh, h, w_hh, *args, _MASKS[True, need_weight, hidden_bias])
            d_h.add_(d_h_conv)
        else:
            t = (d_gh, w_hh, d_h)
            L = p.l_fdg
            if L and quiet:
                L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
            else:
                _dgrad_slow(p, "fdg", L, stream, "_conv_dgrad_bwd_kernel", 3 * hidden, d_h, t)
            if need_weight:
                d_w, d_b = p.empty_whh(), p.empty_bias() if hidden_bias else None
                t = (d_gh, h, h, d_w, d_w if d_b is None else d_b)
                L = p.l_fwh
                if L and quiet:
                    L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
                else:
                    _wgrad_slow(p, "fwh", L, stream, t, None)
            elif hidden_bias:  # a frozen weight's trainable bias
                d_b = d_gh.sum(_BIAS_DIMS)
    else:
        t = (grad, grad, gates, h, d_gx, d_h)
        L = p.l_up_bwd
        if L and quiet:
            L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
        else:
            _gate_slow(p, "up_bwd", L, stream, t, lambda g: g.update_bwd(
                grad, None, gates, h, d_gx, d_h=d_h))
        d_rz, d_n = _split_with_sizes(d_gx, p.rz_n, 1)
        split = p.weight_cast.split
        if split[0] is not w_hh or split[1] != w_hh.data_ptr():
            split = _split(p, w_hh)
        w_rz, w_n = split[2], split[3]
        if fused:
            t = (d_n, w_n, gates, h, d_gx, d_h)
            L = p.l_fdrg
            if L and quiet:
                L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
            else:
                _dgrad_slow(p, "fdrg", L, stream, "_conv_dgrad_reset_gate_bwd_kernel", hidden, d_h, t)
            # After the first: it reads d_ar, which the first wrote, at neighbouring pixels.
            t = (d_rz, w_rz, d_h)
            L = p.l_fdg
            if L and quiet:
                L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
            else:
                _dgrad_slow(p, "fdg", L, stream, "_conv_dgrad_bwd_kernel", 2 * hidden, d_h, t)
            if need_weight:  # W_hrz from h and W_hn from r * h (aux), in one launch
                d_w = p.empty_whh()
                t = (d_gx, h, aux, d_w, d_w)
                L = p.l_fwh
                if L and quiet:
                    L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
                else:
                    _wgrad_slow(p, "fwh", L, stream, t, 2 * hidden)
        else:
            d_rh, d_w_n, _ = conv_backward(d_n, aux, w_n, *args, _MASKS[True, need_weight, False])
            t = (d_rh, gates, h, d_gx, d_h)
            L = p.l_rg_bwd
            if L and quiet:
                L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
            else:
                _gate_slow(p, "rg_bwd", L, stream, t, lambda g: g.reset_gate_bwd(
                    d_rh, gates, h, d_gx, d_h))
            d_h_conv, d_w_rz, _ = conv_backward(d_rz, h, w_rz, *args, _MASKS[True, need_weight, False])
            d_h.add_(d_h_conv)
            if need_weight:
                d_w = torch.cat((d_w_rz, d_w_n))
    # The input convolution.
    d_x = d_w_ih = d_b_ih = None
    if not fused:
        if need[0] or need[2] or input_bias:
            d_x, d_w_ih, d_b_ih = conv_backward(d_gx, x, w_ih, *args, _MASKS[need[0], need[2], input_bias])
    else:  # the wgrad kernel (the bias with it) and the dgrad kernel, which writes d_x or adds to d_x_into
        if need[2]:
            d_w_ih, d_b_ih = p.empty_wih(), p.empty_bias() if input_bias else None
            t = (d_gx, x, x, d_w_ih, d_w_ih if d_b_ih is None else d_b_ih)
            L = p.l_fwi
            if L and quiet and x_bound:
                L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
            else:
                _wgrad_slow(p, "fwi", L if x_bound else None, stream, t, None)
        elif input_bias:  # a frozen weight's trainable bias
            d_b_ih = d_gx.sum(_BIAS_DIMS)
        if need[0]:
            add = d_x_into is not None
            d_x = d_x_into if add else p.empty_x()
            t = (d_gx, w_ih, d_x)
            L = p.l_fdxa if add else p.l_fdx
            if L and quiet:
                L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
            else:
                _dgrad_slow(p, "fdxa" if add else "fdx", L, stream, "_conv_dgrad_bwd_kernel", 3 * hidden, d_x, t,
                            ACCUMULATE=add)
    # One tensor for both bias gradients without reset_after: autograd's
    # accumulation copies it where it cannot take it, so the two .grad never share storage.
    return (d_x, d_h if need[1] else None, d_w_ih, d_w if need[3] else None, d_b_ih if need_b_ih else None,
            (d_b if reset_after else d_b_ih) if need_b_hh else None)


_BIAS_DIMS = (0, 2, 3)  # batch and space of the fused path's (N, C, Y, X) tensors


def _strided_copy(t: Tensor, strides: tuple) -> Tensor:
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def _format_of(t: Tensor):
    return torch.channels_last if t.dim() == 4 and is_channels_last(t) else torch.contiguous_format


def _wgrad_buffers(p: CellPlan, x: Tensor, w_ih: Tensor, w_hh: Tensor) -> None:
    """At the first fused backward of a plan: its gradients' allocators (a
    buffer per step, dense in the layout of the tensor as the forward saw it:
    the bound launches were compiled for their strides), and the strides and
    alignment of the input and weights it got, which the launches it binds
    were compiled for (:func:`_step_backward`)."""
    dtype, device = p.compute, x.device

    def empty(shape, fmt):
        return functools.partial(_allocate, tuple(shape), dtype=dtype, device=device, memory_format=fmt)

    p.empty_wih, p.empty_whh = empty(w_ih.shape, p.w_formats[0]), empty(w_hh.shape, p.w_formats[1])
    p.empty_bias = empty((3 * p.hidden,), torch.contiguous_format)
    p.empty_x = empty(x.shape, p.x_format)
    p.bound_strides, p.x_aligned = tuple(map(_STRIDE, (x, w_ih, w_hh))), not x.data_ptr() & 15


def _fused_forward(p: CellPlan, x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh) -> Optional[Tensor]:
    """One step without gradient as the fused kernels, the input convolution
    inside them; ``None`` (nothing written) where they decline."""
    state = p.empty1()
    if p.reset_after:
        return state if _fused_launches(p, x, h, w_ih, w_hh, b_ih, b_hh, state, state, state, False) else None
    gates, aux = p.empty3(), p.empty1()
    return state if _fused_launches(p, x, h, w_ih, w_hh, b_ih, b_hh, state, gates, aux, False) else None


def _fused_launches(p: CellPlan, x, h, w_ih, w_hh, b_ih, b_hh, state, gates, aux, save: bool) -> bool:
    """The fused forward kernels of one step into ``state``, ``gates`` and
    ``aux`` (with reset_after and not ``save``, ``state`` stands in for the
    two: nothing is stored there). ``False`` where they declined (the first
    step only: then nothing was written)."""
    stream = p.stream(p.device_index)
    enter, leave = _runtime.launch_enter_hook, _runtime.launch_exit_hook  # quiet: see _runtime
    quiet = (enter is None or enter.__class__ is _HookChain and not enter.calls) and (
        leave is None or leave.__class__ is _HookChain and not leave.calls)
    bias = (b_ih, b_hh) if p.has_bias else (h, h)
    if p.reset_after:
        t = (h, w_hh, None, state, gates, aux) + bias + (x, w_ih)
        L = p.l_fra
        if L and quiet:
            L.go(stream, L.function, L.metadata, None, None, None, *t, *L.tail)
        elif L:
            L(stream, *t)
        else:
            from .ops.fused_step import kernels as fused_step

            saved = (gates, aux) if save else (None, None)
            return _fused_general(p, ("fra",), (t,), lambda: fused_step.forward_step(
                True, p.spec, None, h, (w_hh,), b_ih, b_hh, state, *saved, save, x=x, weight_ih=w_ih))
        return True
    hidden = p.hidden
    split = p.weight_cast.split
    if split[0] is not w_hh or split[1] != w_hh.data_ptr():
        split = _split(p, w_hh)
    w_rz, w_n = split[2], split[3]
    t1 = (h, w_rz, None, h, gates, aux) + bias + (x, w_ih)
    t2 = (aux, w_n, None, h, gates, state) + bias + (x, w_ih)
    L, L2 = p.l_frz, p.l_fn
    if L and L2 and quiet:
        L.go(stream, L.function, L.metadata, None, None, None, *t1, *L.tail)
        L2.go(stream, L2.function, L2.metadata, None, None, None, *t2, *L2.tail)
    elif L and L2:
        L(stream, *t1)
        L2(stream, *t2)
    else:
        from .ops.fused_step import kernels as fused_step

        return _fused_general(p, ("frz", "fn"), (t1, t2), lambda: fused_step.forward_step(
            False, p.spec, None, h, (w_rz, w_n), b_ih, b_hh, state, gates, aux, save, x=x, weight_ih=w_ih))
    return True


def _dgrad_slow(p: CellPlan, site: str, L, stream, kernel_name: str, channels: int, d_h: Tensor,
                tensors: tuple, **extra) -> None:
    """A fused data-gradient launch off the fast path: bound with a launch
    hook registered, else through ``fused_step._launch_dgrad`` (the first
    step), which binds the site; ``extra``: the kernel's other constexprs."""
    if L:
        L(stream, *tensors)
        return
    from .ops.fused_step import kernels as fused_step

    strides = tuple(s for t in tensors for s in fused_step._strides(t))
    _fused_general(p, (site,), (tensors,), lambda: fused_step._launch_dgrad(
        getattr(fused_step, kernel_name), p.spec, d_h, channels, tensors, strides, **extra) or True)


def _wgrad_slow(p: CellPlan, site: str, L, stream, tensors: tuple, split: Optional[int]) -> None:
    """A fused weight-gradient launch off the fast path (as :func:`_dgrad_slow`):
    ``tensors`` = (dy, src, src2, d_w, d_b) as the kernel takes them, ``src2``
    read for rows ``split:`` where ``split`` is given, ``d_b`` the bias
    gradient unless it is ``d_w`` (no bias)."""
    if L:
        L(stream, *tensors)
        return
    from .ops.fused_step import kernels as fused_step

    dy, src, src2, d_w, d_b = tensors
    _fused_general(p, (site,), (tensors,), lambda: fused_step._launch_wgrad(
        p.spec, dy, src, d_w, None if d_b is d_w else d_b, src2 if split is not None else None, split) or True)


class _CellStep(torch.autograd.Function):
    """A cell step with its gradient, one autograd node: forward the fused
    kernels (the input convolution inside them) or the input convolution,
    the hidden convolution(s) and the gate kernels; backward
    :func:`_step_backward`. Where the fused kernels decline at the first step
    the forward runs the gates path and the plan keeps it.
    (forward takes ctx itself: a separate setup_context makes Function.apply
    bind its arguments with inspect.signature at every call.)"""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, p):
        h_new, gates, aux, fused = _half_forward(p, x, h, w_ih, w_hh, b_ih, b_hh)
        ctx.to_save = (x, h, w_ih, w_hh, h_new, gates, aux)  # save_for_backward's body: no frame
        ctx.p, ctx.fused = p, fused and p.fused_bwd
        return h_new

    @staticmethod
    def backward(ctx, grad):
        x, h, w_ih, w_hh, h_new, gates, aux = ctx.saved_tensors
        if _grad_enabled():
            return _graph_backward(ctx.p, grad, x, h, w_ih, w_hh, h_new, gates, aux, ctx.needs_input_grad) + (None,)
        return _step_backward(ctx.p, ctx.fused, grad, x, h, w_ih, w_hh, gates, aux, ctx.needs_input_grad) + (None,)


# Function.apply without its Python wrapper (which only unwraps tensors that
# outlived a torch.func transform): plans run with no transform active.
_apply_cell_step = torch._C._FunctionBase.__dict__["apply"].__get__(None, _CellStep)


def _direct_backward(function: type) -> None:
    """The autograd engine runs a custom Function's node by calling its
    ``apply`` (``BackwardCFunction.apply``: Python frames that pick between
    ``backward`` and ``vjp`` at every call); the plans' Functions define
    ``backward`` only, so their nodes call it directly."""
    function._backward_cls.apply = function.backward


_direct_backward(_CellStep)


def run(p: CellPlan, x: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih, b_hh, region) -> Tensor:
    """Carry out plan ``p`` (not ``"general"``) on one step's tensors;
    ``region``: the autocast region where the weight casts may be kept
    (:class:`_WeightCasts`), else ``None``."""
    fmt = p.fmt
    if p.cast_x:
        x = x.to(dtype=p.compute, memory_format=fmt or torch.preserve_format)
    if p.cast_h:
        hx = hx.to(dtype=p.compute, memory_format=fmt or torch.preserve_format)
    if p.cast_w:
        w_ih, w_hh, b_ih, b_hh = p.weight_cast(w_ih, w_hh, b_ih, b_hh, region, p.grad)
    if p.state_channels_last is None:
        _first_step(p, x, hx, w_ih, w_hh)
    h = p.empty1().zero_() if hx is None else hx
    if p.grad:
        h_new = _apply_cell_step(x, h, w_ih, w_hh, b_ih, b_hh, p)
    else:
        h_new = None
        if p.path == _FUSED:
            h_new = _fused_forward(p, x, h, w_ih, w_hh, b_ih, b_hh)
            if h_new is None:  # declined: the gates path from now on
                p.path = _GATES
        if h_new is None:
            h_new = _gates_forward(p, p.conv(x, w_ih), h, w_hh, b_ih, b_hh, False)[0]
    if fmt is not None and not p.caller_channels_last:
        h_new = h_new.contiguous()  # h' in the caller's layout
    return h_new


_CPU_CUDA = frozenset(("cpu", "cuda"))


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype on ``device_type``, or ``None`` (autocast off)."""
    if device_type in _CPU_CUDA:  # two C calls, no Python frame of the general rule's
        return _get_autocast_dtype(device_type) if _autocast_enabled(device_type) else None
    from .ops.sequence.op import autocast_dtype

    return autocast_dtype(device_type)


_STRIDE = torch.Tensor.stride
_DATA_PTR = torch.Tensor.data_ptr
_FACTS = operator.attrgetter("shape", "dtype", "device")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


_LOW_BITS = (15).__and__
_ALIGNED4 = bytes(4)  # four addresses' low bits, all 16-byte aligned


def _weights_key(params, xs: tuple = ()) -> tuple:
    """``(parameters, facts)``: a cell's four parameters, and the facts about
    them and about the call's input and state ``xs`` that a plan depends on,
    gathered with C-level iteration (``map``: no Python call per tensor):
    which biases are None; shapes, dtypes, devices and strides of all; the
    parameters' addresses (a storage swapped under the same Parameter by
    ``.data =`` or ``module.to(memory_format=...)``); the low four bits of
    the input's and state's (Triton specializes pointers on 16-byte
    alignment); which parameters require grad (last). The parameters
    themselves are read at every call, so a replaced Parameter with the same
    facts runs with its own values."""
    w_ih, w_hh, b_ih, b_hh = params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
    weights = (w_ih, w_hh) if b_ih is None or b_hh is None else (w_ih, w_hh, b_ih, b_hh)
    tensors = weights + xs
    return (w_ih, w_hh, b_ih, b_hh), (b_ih is None, b_hh is None, tuple(map(_FACTS, tensors)),
                                       tuple(map(_STRIDE, tensors)), tuple(map(_DATA_PTR, weights)),
                                       bytes(map(_LOW_BITS, map(_DATA_PTR, xs))),
                                       tuple(map(_REQUIRES_GRAD, weights)))


def cell_forward(module, x, hx):
    """``module(x, hx)`` for a ``ConvGRUCell{1,2,3}d``: the plan of this call's
    signature, made at its first call, carried out."""
    if (_is_compiling() or _tracing_state() is not None or _functorch_level() is not None
            or _dispatch_mode(_FAKE) is not None):
        # Not plain eager: torch.compile, jit.trace, a functorch transform or a fake-tensor
        # mode (meta tensors have their own device in the key). The test inline: no frame.
        return _general(module, x, hx)
    params = module._parameters
    try:
        weights, facts = _weights_key(params, (x,) if hx is None else (x, hx))
        cast = None
        if _any_autocast():  # _autocast_dtype inline for CPU and CUDA: no frame
            dt = x.device.type
            cast = ((_get_autocast_dtype(dt) if _autocast_enabled(dt) else None) if dt in _CPU_CUDA
                    else _autocast_dtype(dt))
        grad = torch.is_grad_enabled() and (
            x.requires_grad or (hx is not None and hx.requires_grad) or True in facts[-1])
        key = (grad, cast, _settings.generation, _tuning.generation,
               module.reset_after, module.backend, module.padding_mode, module.dilation, facts)
    except (AttributeError, TypeError, KeyError):  # not tensors: the general path's checks say what is wrong
        return _general(module, x, hx)
    plans = module._cell_plans  # a class attribute, None, until the first call
    if plans is None:
        plans = module.__dict__["_cell_plans"] = {}
    p = plans.get(key)
    if p is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        p = plans[key] = _build(module, x, hx, grad, cast)
    if p.path == _GENERAL:
        return _general(module, x, hx)
    if p.recheck and not _backend._interpreter_enabled():
        select_backend(x.device, module.backend)  # the interpreter was switched off since: raises
    return run(p, x, hx, *weights, p.weight_cast.region() if p.keep_casts else None)


def _half_forward(p: CellPlan, x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih, b_hh):
    """One step (or one half of a separable step) with what its backward
    needs: ``(h', gates, aux, fused)``; ``fused``: the fused kernels ran (else
    the gates path)."""
    if p.state_channels_last is None:
        _first_step(p, x, h, w_ih, w_hh)
    if p.path == _FUSED:
        state, gates, aux = p.empty1(), p.empty3(), p.empty1()
        if _fused_launches(p, x, h, w_ih, w_hh, b_ih, b_hh, state, gates, aux, True):
            return state, gates, aux, True
        p.path = _GATES  # declined (the first step only: nothing was written)
    return _gates_forward(p, p.conv(x, w_ih), h, w_hh, b_ih, b_hh, True) + (False,)


def _graph_backward(p: CellPlan, grad: Tensor, x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, h_new: Tensor,
                    gates: Tensor, aux: Tensor, need: tuple):
    """:func:`_step_backward` with grad mode on (``create_graph=True``):
    through the registered operator, whose own backward raises, so that a
    second derivative fails loudly."""
    from .ops.sequence.op import conv_gru_bwd

    has_bias = p.has_bias
    need_b_ih, need_b_hh = has_bias and need[4], has_bias and need[5]
    d_gx, d_h, d_w, d_b_ih, d_b_hh = conv_gru_bwd(
        grad.unsqueeze(0), h, w_hh, h_new.unsqueeze(0), gates.unsqueeze(0), aux.unsqueeze(0),
        *p.step.op_args, has_bias)
    d_gx = d_gx.squeeze(0)
    d_x = d_w_ih = None
    if need[0] or need[2]:
        d_x, d_w_ih, _ = p.conv_backward(d_gx, x, w_ih, *p.conv_args, _MASKS[need[0], need[2], False])
    return (d_x, d_h if need[1] else None, d_w_ih, d_w if need[3] else None,
            d_b_ih if need_b_ih else None, d_b_hh if need_b_hh else None)


class _SepStep(torch.autograd.Function):
    """A whole separable step with its gradient, one autograd node: both
    halves forward (each on its plan's path), both backward in reverse, the
    input's gradient summed over the halves."""

    @staticmethod
    def forward(ctx, x, h, w_ih1, w_hh1, b_ih1, b_hh1, w_ih2, w_hh2, b_ih2, b_hh2, sp):
        p1 = sp.first
        h_mid, gates1, aux1, fused1 = _half_forward(p1, x, h, w_ih1, w_hh1, b_ih1, b_hh1)
        p2 = sp.second
        if p2 is None:  # the first step of the signature: the second half's plan, from its state
            p2 = sp.second = _build(sp.vertical, x, h_mid, True, sp.cast)
            if p2.path == _GENERAL:
                raise RuntimeError("the separable cell's second half has no plan where its first has one: "
                                   "report this with the output of python -m convgru_triton")
        h_out, gates2, aux2, fused2 = _half_forward(p2, x, h_mid, w_ih2, w_hh2, b_ih2, b_hh2)
        ctx.to_save = (x, h, h_mid, h_out, w_ih1, w_hh1, gates1, aux1, w_ih2, w_hh2, gates2, aux2)
        ctx.sp, ctx.fused = sp, (fused1 and p1.fused_bwd, fused2 and p2.fused_bwd)
        return h_out

    @staticmethod
    def backward(ctx, grad):
        x, h, h_mid, h_out, w_ih1, w_hh1, gates1, aux1, w_ih2, w_hh2, gates2, aux2 = ctx.saved_tensors
        sp = ctx.sp
        need = ctx.needs_input_grad
        fused1, fused2 = ctx.fused
        need2 = (need[0], True) + need[6:10]
        into = None
        if _grad_enabled():  # create_graph=True
            d_x2, d_mid, d_w_ih2, d_w_hh2, d_b_ih2, d_b_hh2 = _graph_backward(
                sp.second, grad, x, h_mid, w_ih2, w_hh2, h_out, gates2, aux2, need2)
            d_x1, d_h, d_w_ih1, d_w_hh1, d_b_ih1, d_b_hh1 = _graph_backward(
                sp.first, d_mid, x, h, w_ih1, w_hh1, h_mid, gates1, aux1, need[:6])
        else:
            d_x2, d_mid, d_w_ih2, d_w_hh2, d_b_ih2, d_b_hh2 = _step_backward(
                sp.second, fused2, grad, x, h_mid, w_ih2, w_hh2, gates2, aux2, need2)
            # Both halves fused: the first half's dgrad kernel adds its d_x to the second's (no add).
            into = d_x2 if fused1 and fused2 and need[0] else None
            d_x1, d_h, d_w_ih1, d_w_hh1, d_b_ih1, d_b_hh1 = _step_backward(
                sp.first, fused1, d_mid, x, h, w_ih1, w_hh1, gates1, aux1, need[:6], into)
        if into is None and need[0]:
            d_x1 = d_x1 + d_x2
        return (d_x1, d_h, d_w_ih1, d_w_hh1, d_b_ih1, d_b_hh1, d_w_ih2, d_w_hh2, d_b_ih2, d_b_hh2, None)


_apply_sep_step = torch._C._FunctionBase.__dict__["apply"].__get__(None, _SepStep)
_direct_backward(_SepStep)


def _sep_general(module, x, hx):
    """The separable cell through its halves' general paths, x and hx
    converted once for both (the layout policy, autocast's cast)."""
    from .functional import _internal_format, _to_internal

    horizontal, vertical = module._modules["horizontal"], module._modules["vertical"]
    fmt = None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() and (
        hx is None or isinstance(hx, torch.Tensor)
    ):  # anything else: the cells' checks say what is wrong
        cast = _autocast_dtype(x.device.type)
        fmt = _internal_format(x.device, x.dtype, 2, cast)
    if fmt is None:
        return _general(vertical, x, _general(horizontal, x, hx))
    caller_channels_last = is_channels_last(x if hx is None else hx)
    x, hx = _to_internal(x, fmt, cast), _to_internal(hx, fmt, cast)
    h = _general(vertical, x, _general(horizontal, x, hx))
    return h if caller_channels_last else h.contiguous()


class SepPlan:
    """A separable cell's plan: x and hx cast once for both halves, then one
    :class:`CellPlan` per half (the second made at the first step, from the
    first half's output)."""

    def __init__(self, general: bool, **facts):
        self.general = general
        self.__dict__.update(facts)


def _build_sep(module, x, hx, grad: bool, cast) -> SepPlan:
    from .functional import _cached_cell_plan, _internal_format

    horizontal = module._modules["horizontal"]
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point()):
        return SepPlan(True)
    # The checks of the call as given (before any cast), as the general path runs them.
    params = horizontal._parameters
    _cached_cell_plan(x, hx, params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"],
                      horizontal.reset_after, horizontal.padding_mode, horizontal.dilation, horizontal.backend)
    fmt = _internal_format(x.device, x.dtype, 2, cast)
    compute = cast if (cast is not None and x.dtype is not torch.float64) else x.dtype
    if hx is not None and hx.dtype is torch.float64 and compute is not torch.float64:
        return SepPlan(True)
    options = dict(dtype=compute, memory_format=fmt or torch.preserve_format)
    x2 = x.to(**options)
    hx2 = None if hx is None else hx.to(**options)
    first = _build(horizontal, x2, hx2, grad, cast)
    if first.path == _GENERAL:
        return SepPlan(True)
    vp = module._modules["vertical"]._parameters
    return SepPlan(False, first=first, second=None, options=options, fmt=fmt, grad=grad, cast=cast,
                   cast_w2=cast is not None or fmt is not None or _strided_biases(vp["bias_ih"], vp["bias_hh"]),
                   keep_casts=first.keep_casts and all(t.requires_grad for t in vp.values() if t is not None),
                   weight_cast2=_weight_casts(module._modules["vertical"], first.weight_cast.dtype, fmt, x.device),
                   cast_x=x2 is not x, cast_h=hx2 is not hx and hx is not None,
                   caller_channels_last=is_channels_last(x if hx is None else hx),
                   vertical=module._modules["vertical"])


def sep_forward(module, x, hx):
    """``module(x, hx)`` for a :class:`~convgru_triton.SepConvGRUCell2d`: one
    plan for both halves per call signature."""
    if (_is_compiling() or _tracing_state() is not None or _functorch_level() is not None
            or _dispatch_mode(_FAKE) is not None):
        # Not plain eager: torch.compile, jit.trace, a functorch transform or a fake-tensor
        # mode (meta tensors have their own device in the key). The test inline: no frame.
        return _sep_general(module, x, hx)
    modules = module._modules
    try:
        horizontal, vertical = modules["horizontal"], modules["vertical"]
        (w1, facts1) = _weights_key(horizontal._parameters, (x,) if hx is None else (x, hx))
        (w2, facts2) = _weights_key(vertical._parameters)
        cast = None
        if _any_autocast():  # _autocast_dtype inline for CPU and CUDA: no frame
            dt = x.device.type
            cast = ((_get_autocast_dtype(dt) if _autocast_enabled(dt) else None) if dt in _CPU_CUDA
                    else _autocast_dtype(dt))
        grad = torch.is_grad_enabled() and (
            x.requires_grad or (hx is not None and hx.requires_grad) or True in facts1[-1] or True in facts2[-1])
        key = (grad, cast, _settings.generation, _tuning.generation,
               horizontal.reset_after, horizontal.backend, horizontal.padding_mode, horizontal.dilation,
               vertical.reset_after, vertical.backend, vertical.padding_mode, vertical.dilation, facts1, facts2)
    except (AttributeError, TypeError, KeyError):
        return _sep_general(module, x, hx)
    plans = module._cell_plans  # a class attribute, None, until the first call
    if plans is None:
        plans = module.__dict__["_cell_plans"] = {}
    sp = plans.get(key)
    if sp is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        sp = plans[key] = _build_sep(module, x, hx, grad, cast)
    if sp.general:
        return _sep_general(module, x, hx)
    p1 = sp.first
    if p1.recheck and not _backend._interpreter_enabled():
        select_backend(x.device, horizontal.backend)  # the interpreter was switched off since: raises
    if sp.cast_x:
        x = x.to(**sp.options)
    if sp.cast_h:
        hx = hx.to(**sp.options)
    region = p1.weight_cast.region() if sp.keep_casts else None
    if sp.grad:
        # Training: one autograd node per step for both halves.
        if p1.cast_w:
            w1 = p1.weight_cast(*w1, region, True)
        if sp.cast_w2:
            w2 = sp.weight_cast2(*w2, region, True)
        if hx is None:
            if p1.state_channels_last is None:
                _first_step(p1, x, None, w1[0], w1[1])
            hx = p1.empty1().zero_()
        h = _apply_sep_step(x, hx, *w1, *w2, sp)
    else:
        h = run(p1, x, hx, *w1, region)
        second = sp.second
        if second is None:
            second = sp.second = _build(vertical, x, h, False, sp.cast)
        h = _general(vertical, x, h) if second.path == _GENERAL else run(second, x, h, *w2, region)
    if sp.fmt is not None and not sp.caller_channels_last:
        h = h.contiguous()
    return h


def explain(device: torch.device, dtype: torch.dtype, kernel_size: Tuple[int, int], hidden: int,
            spatial: Tuple[int, int], reset_after: bool = False, batch: int = 1) -> dict:
    """What a cell step of this kind would run on ``device`` in eager mode,
    each choice with its reason, from the rules the plans use (no tensor is
    allocated on ``device``, nothing is launched): ``{"backend": (name,
    reason), "step path": {"fwd": (path, reason), "bwd": ...}, "memory format":
    (format, reason)}``. ``dtype`` is the compute dtype (the autocast dtype
    under autocast). For ``python -m convgru_triton``."""
    from ._layout import internal_memory_format

    settings = _settings.peek_settings()
    choice = select_backend(device, "auto")
    fmt = internal_memory_format(device, dtype, len(spatial))
    layout = settings.layout
    if fmt is None:
        why = (f"layout={layout!r} keeps the caller's layout" if layout == "keep" else
               f"layout={layout!r}: channels_last only on CUDA in float16/bfloat16")
        memory = ("the caller's", why)
    else:
        memory = (str(fmt).replace("torch.", ""), f"layout={layout!r} on {device.type} in {dtype}".replace("torch.", ""))
    paths = {}
    spec = ConvSpec.create(len(spatial), kernel_size, 1, "zeros")
    for direction in ("fwd", "bwd"):
        if choice.name != "triton":
            paths[direction] = ("eager PyTorch", "the torch backend runs the reference math")
            continue
        from .ops.fused_step import kernels as fused_step

        if not fused_step.supports(spec, dtype, device):
            paths[direction] = ("cuDNN + gate kernels", "the fused step does not take this kernel, dtype or device")
        elif settings.fused_step == "1":
            paths[direction] = ("fused", f"fused_step='1' ({settings.source('fused_step')})")
        elif settings.fused_step == "0":
            paths[direction] = ("cuDNN + gate kernels", f"fused_step='0' ({settings.source('fused_step')})")
        else:
            path = _tuning.step_path(device, dtype, reset_after, direction, tuple(kernel_size),
                                     batch * hidden * spatial[0] * spatial[1])
            paths[direction] = ("fused" if path == "fused" else "cuDNN + gate kernels",
                                "fused_step='auto': the tuning registry's step_paths for this GPU"
                                if path == "fused" else
                                "fused_step='auto': no tuned step path names the fused step here (the default)")
    return {"backend": (choice.name, choice.reason), "step path": paths, "memory format": memory}
