"""Benchmark workloads (the shapes users run) and the models each provider runs on them.

A workload is one or more *stages*, each a ConvGRU of given channels, spatial
size, kernel and depth, run either one step at a time (op ``conv_gru_cell``:
RAFT's update block, where the next input depends on the state) or over a whole
input sequence (op ``conv_gru``). Every provider computes the same function
from the same master weights (:func:`make_master`):

* ``seed``, ``raft``: the eager baselines of :mod:`bench.baselines`, stepped
  in a Python loop over layers and time.
* ``compile``: the ``raft`` baseline with each step module wrapped in
  ``torch.compile`` (default mode, static shapes), the loop staying in Python.
* ``ours``: this package, ``ConvGRUCell2d`` for steps (two of them, kernels
  ``(1, k)`` and ``(k, 1)``, for the separable update) and ``ConvGRU2d`` for
  sequences, which runs the input convolution once for all time steps.
* ``ours-compile``: ``torch.compile`` of the ``ours`` modules.
* ``ours-fused``: the ``ours`` modules with the fused step forced
  (``CONVGRU_TRITON_FUSED_STEP=1``: :mod:`convgru_triton.ops.fused_step`'s
  convolution + gate math in one pass) during forward and backward; ``ours``
  and ``ours-compile`` force ``0`` (cuDNN + the gate kernels) so that their
  names keep meaning that path whatever the default is.
  It needs the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``
  without bfloat16): :func:`unavailable` says why not elsewhere.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

import convgru_triton
from convgru_triton import ConvGRU2d, ConvGRUCell2d

from .baselines import TwoPass, raft_from_cells, seed_from_cells

OPS = ("conv_gru_cell", "conv_gru")
PROVIDERS = ("seed", "raft", "compile", "ours", "ours-compile", "ours-fused")
EAGER_BASELINES = ("seed", "raft")
BASELINES = ("seed", "raft", "compile")
OURS = ("ours", "ours-compile", "ours-fused")
FUSED = ("ours-fused",)
#: The fused step's switch: the package's ``fused_step`` setting, whose environment variable
#: (= convgru_triton.ops.fused_step.kernels.ENV_VAR; not imported: it imports Triton) the messages name,
#: and its value per provider of ours: forced, so that each name means one path.
FUSED_ENV_VAR = "CONVGRU_TRITON_FUSED_STEP"
FUSED_SWITCH = {"ours": "0", "ours-compile": "0", "ours-fused": "1"}
COMPILED = ("compile", "ours-compile")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Stage:
    """One ConvGRU (``num_layers`` stacked layers) on ``size`` feature maps."""

    input_channels: int
    hidden_channels: int
    size: Tuple[int, int]
    kernel_size: int
    num_layers: int = 1

    def describe(self) -> str:
        k = self.kernel_size
        layers = f" x{self.num_layers} layers" if self.num_layers > 1 else ""
        return f"{self.input_channels}->{self.hidden_channels} @ {self.size[0]}x{self.size[1]}, {k}x{k}{layers}"


@dataclass(frozen=True)
class Workload:
    """A benchmark workload. ``steps`` is 1 for the one-step op ``conv_gru_cell``."""

    name: str
    op: str
    batch: int
    steps: int
    stages: Tuple[Stage, ...]
    separable: bool = False
    about: str = ""

    def describe(self) -> str:
        stages = "; ".join(s.describe() for s in self.stages)
        if self.separable:
            k = self.stages[0].kernel_size
            stages = stages.replace(f"{k}x{k}", f"1x{k} + {k}x1")
        time = "one step" if self.op == "conv_gru_cell" else f"T={self.steps}"
        return f"N={self.batch}, {time}, {stages}"


def _step(name, stage, about, batch, separable=False):
    return Workload(name, "conv_gru_cell", batch, 1, (stage,), separable, about)


def _seq(name, stages, about, batch, steps):
    return Workload(name, "conv_gru", batch, steps, tuple(stages), False, about)


# The shapes users run (CUDA). RAFT: hidden 128, input 128 + 128 motion/context
# features, at 1/8 of a 368x496 crop. Nowcasting: the three ConvGRU layers of a
# TrajGRU/HKO-7 encoder (480x480 radar maps strided to 96, 32, 16; the strided
# convolutions between them are not part of the benchmark, each stage gets its
# own input). Moving MNIST: 64x64 frames as 4x4 patches (16 channels at 16x16).
# DGMR: the 8x8 ConvGRU of the sampler, input the 768-channel latent stack.
FULL_WORKLOADS: Tuple[Workload, ...] = (
    _step("raft-convgru", Stage(256, 128, (46, 62), 3), "RAFT update step, ConvGRU 3x3", batch=6),
    _step("raft-sepconvgru", Stage(256, 128, (46, 62), 5), "RAFT update step, SepConvGRU 1x5 + 5x1",
          batch=6, separable=True),
    _seq("nowcast", [Stage(8, 64, (96, 96), 3), Stage(192, 192, (32, 32), 3), Stage(192, 192, (16, 16), 3)],
         "TrajGRU/HKO-7 style encoder, 3 ConvGRU stages", batch=4, steps=5),
    _seq("mmnist", [Stage(16, 128, (16, 16), 5, num_layers=2)], "Moving MNIST, 2 layers 5x5", batch=16, steps=10),
    _seq("dgmr", [Stage(768, 384, (8, 8), 3)], "DGMR-like sampler ConvGRU", batch=16, steps=18),
)

# The same workloads scaled down so that the CPU suite runs in a few minutes on
# two cores: same structure (kernels, layers, steps, spatial sizes except DGMR's
# batch), half the channels, fewer samples.
CPU_WORKLOADS: Tuple[Workload, ...] = (
    _step("raft-convgru", Stage(128, 64, (46, 62), 3), "RAFT update step, ConvGRU 3x3", batch=1),
    _step("raft-sepconvgru", Stage(128, 64, (46, 62), 5), "RAFT update step, SepConvGRU 1x5 + 5x1",
          batch=1, separable=True),
    _seq("nowcast", [Stage(8, 32, (96, 96), 3), Stage(96, 96, (32, 32), 3), Stage(96, 96, (16, 16), 3)],
         "TrajGRU/HKO-7 style encoder, 3 ConvGRU stages", batch=1, steps=5),
    _seq("mmnist", [Stage(16, 64, (16, 16), 5, num_layers=2)], "Moving MNIST, 2 layers 5x5", batch=4, steps=10),
    _seq("dgmr", [Stage(384, 192, (8, 8), 3)], "DGMR-like sampler ConvGRU", batch=4, steps=18),
)

# Tiny versions for the tests of the harness itself.
TINY_WORKLOADS: Tuple[Workload, ...] = (
    _step("raft-convgru", Stage(5, 4, (6, 7), 3), "tiny", batch=2),
    _step("raft-sepconvgru", Stage(5, 4, (6, 7), 5), "tiny", batch=2, separable=True),
    _seq("nowcast", [Stage(2, 3, (8, 8), 3), Stage(3, 4, (4, 4), 3)], "tiny", batch=2, steps=3),
    _seq("mmnist", [Stage(2, 3, (5, 5), 5, num_layers=2)], "tiny", batch=2, steps=3),
)

WORKLOAD_SETS: Dict[str, Tuple[Workload, ...]] = {"full": FULL_WORKLOADS, "cpu": CPU_WORKLOADS, "tiny": TINY_WORKLOADS}


# ----------------------------------------------------------------------------
# Master weights: per stage, per layer, the ConvGRUCell2d (or the (1, k)/(k, 1)
# pair) that every provider's model is converted from.
# ----------------------------------------------------------------------------

Master = List[List[List[ConvGRUCell2d]]]  # [stage][layer][pass]


def make_master(workload: Workload, device, seed: int = 0, dtype: torch.dtype = torch.float32) -> Master:
    """Master weights on ``device`` (float32 unless ``dtype``), the same for every provider.

    The default initialisation (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) keeps the
    gates away from saturation, so the comparisons between providers mean something."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        master: Master = []
        for stage in workload.stages:
            layers = []
            for layer in range(stage.num_layers):
                c_in = stage.input_channels if layer == 0 else stage.hidden_channels
                k = stage.kernel_size
                kernels = [(1, k), (k, 1)] if workload.separable else [(k, k)]
                layers.append([ConvGRUCell2d(c_in, stage.hidden_channels, kk).to(device=device, dtype=dtype)
                               for kk in kernels])
            master.append(layers)
        return master
    finally:
        torch.random.set_rng_state(gen_state)


def _copy_cell(cell: ConvGRUCell2d, dtype, backend: str) -> ConvGRUCell2d:
    new = ConvGRUCell2d(cell.input_channels, cell.hidden_channels, cell.kernel_size, backend=backend,
                        device=cell.weight_ih.device, dtype=dtype)
    new.load_state_dict(cell.state_dict())
    return new


def _sequence_from_cells(cells: Sequence[ConvGRUCell2d], dtype, backend: str) -> ConvGRU2d:
    first = cells[0]
    module = ConvGRU2d(first.input_channels, first.hidden_channels, first.kernel_size, num_layers=len(cells),
                       backend=backend, device=first.weight_ih.device, dtype=dtype)
    with torch.no_grad():
        for layer, cell in enumerate(cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(module, f"{name}_l{layer}").copy_(getattr(cell, name))
    return module


# ----------------------------------------------------------------------------
# Runners: ``forward(xs, hs) -> outputs``, one entry per stage.
# Step workloads: x (N, C, H, W), h (N, hidden, H, W), output h'.
# Sequence workloads: x (T, N, C, H, W), hs ignored (zero initial state),
# output the last layer's states (T, N, hidden, H, W).
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# The fused step's switch, held during forward and backward
# ----------------------------------------------------------------------------


def switch() -> str:
    """The fused step's setting in force: ``"auto"``, ``"1"`` or ``"0"``."""
    return convgru_triton.get_settings().fused_step


@contextlib.contextmanager
def fused_switch(value: Optional[str]) -> Iterator[None]:
    """The ``fused_step`` setting at ``value`` inside
    (``convgru_triton.override_settings``), the previous one restored after,
    also when the block raises; ``None`` leaves the setting alone. The
    package's plans key on the settings' generation, so a switch around a call
    takes effect at that call (and a call under the same value finds the plans
    of the previous one). The runners hold it through the backward pass too
    (:class:`_SwitchInBackward`)."""
    if value is None:
        yield
        return
    with convgru_triton.override_settings(fused_step=value):
        yield


class _HeldSwitch:
    """The switch as one backward pass holds it: set by the pass's first
    :class:`_SwitchInBackward` node, which hands this object to the autograd
    engine as an end-of-pass callback (the engine then holds the only strong
    reference to it), and given back exactly once, whichever comes first:

    * the engine calls it when the whole pass has finished;
    * the engine drops it unrun when a node of the pass raised (a failed pass's
      callbacks are discarded with it): ``__del__``; on CPU that happens before
      the exception reaches the caller, on CUDA the device's worker thread may
      let go of the pass a moment later;
    * :func:`give_back_switch`, which :func:`make_step` calls when its backward
      raised, so that the harness never depends on that moment."""

    def __init__(self, value: str) -> None:
        # Entered now, exited by give_back: an override held across the pass.
        self.override = convgru_triton.override_settings(fused_step=value)
        self.override.__enter__()
        self.given_back = False

    def __call__(self) -> None:
        self.give_back()

    def __del__(self) -> None:
        self.give_back()

    def give_back(self) -> None:
        global _HELD
        if self.given_back:
            return
        self.given_back = True
        if _HELD is not None and _HELD() is self:
            _HELD = None
        self.override.__exit__(None, None, None)


# The switch a backward pass holds now, weakly (a strong reference here would keep a
# failed pass's _HeldSwitch alive, and the switch set, after the engine dropped it).
_HELD: "Optional[weakref.ReferenceType[_HeldSwitch]]" = None


def _held() -> Optional[_HeldSwitch]:
    held = _HELD() if _HELD is not None else None
    return held if held is not None and not held.given_back else None


def _hold_switch_for_this_backward(value: str) -> None:
    global _HELD
    if _held() is not None:  # another output of the same backward pass set it already
        return
    held = _HeldSwitch(value)
    _HELD = weakref.ref(held)
    # Runs when the engine has finished this whole backward pass (every node,
    # the parameters' gradients included), as DDP's gradient hooks use it.
    torch.autograd.Variable._execution_engine.queue_callback(held)


def give_back_switch() -> None:
    """Restore the ``fused_step`` setting if a backward pass still holds it
    (after that pass raised: see :class:`_HeldSwitch`); nothing otherwise."""
    held = _held()
    if held is not None:
        held.give_back()


class _SwitchInBackward(torch.autograd.Function):
    """Identity on a model output. The backward runs after ``forward`` has
    returned (and its switch is restored), started by the caller's
    ``backward()``; this node is the first of the model's to run in it (every
    gradient of the model flows from the outputs), so it sets the switch for
    the nodes after it, and :class:`_HeldSwitch` gives it back when the pass
    ends, also when a node of it raised."""

    @staticmethod
    def forward(ctx, value, x):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _hold_switch_for_this_backward(ctx.value)
        return None, grad


def _switch_in_backward(outputs: List[torch.Tensor], value: Optional[str]) -> List[torch.Tensor]:
    if value is None or not torch.is_grad_enabled():
        return outputs
    return [_SwitchInBackward.apply(value, o) if o.requires_grad else o for o in outputs]


class StepRunner(nn.Module):
    def __init__(self, steps: Sequence[nn.Module], state_first: bool, fused: Optional[str] = None) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.state_first = state_first
        self.fused = fused  # the fused_step setting during forward and backward (ours: FUSED_SWITCH)

    def forward(self, xs, hs):
        with fused_switch(self.fused):
            outputs = [step(h, x) if self.state_first else step(x, h) for step, x, h in zip(self.steps, xs, hs)]
        return _switch_in_backward(outputs, self.fused)


class LoopRunner(nn.Module):
    """Baselines over sequences: layer after layer, step after step."""

    def __init__(self, stages: Sequence[Sequence[nn.Module]], state_first: bool) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.ModuleList(layers) for layers in stages)
        self.state_first = state_first
        self.hidden = [[getattr(getattr(m, "_orig_mod", m), "hidden_channels") for m in layers] for layers in stages]

    def forward(self, xs, hs=None):
        outputs = []
        for layers, hidden, x in zip(self.stages, self.hidden, xs):
            layer_input = x
            for step, channels in zip(layers, hidden):
                h = layer_input.new_zeros((x.shape[1], channels) + tuple(x.shape[3:]))
                states = []
                for t in range(layer_input.shape[0]):
                    h = step(h, layer_input[t]) if self.state_first else step(layer_input[t], h)
                    states.append(h)
                layer_input = torch.stack(states)
            outputs.append(layer_input)
        return outputs


class SequenceRunner(nn.Module):
    """``ours`` over sequences: one ConvGRU2d per stage."""

    def __init__(self, modules: Sequence[nn.Module], fused: Optional[str] = None) -> None:
        super().__init__()
        self.grus = nn.ModuleList(modules)
        self.fused = fused  # as StepRunner.fused

    def forward(self, xs, hs=None):
        with fused_switch(self.fused):
            outputs = [gru(x)[0] for gru, x in zip(self.grus, xs)]
        return _switch_in_backward(outputs, self.fused)


def _compile(module: nn.Module) -> nn.Module:
    # Default mode; static shapes, as a user with a fixed crop size gets (no
    # recompilation with dynamic shapes when a second stage shape comes by).
    return torch.compile(module, dynamic=False)


def build_model(workload: Workload, provider: str, master: Master, dtype: torch.dtype,
                backend: str = "auto") -> nn.Module:
    """The ``provider``'s model of ``workload`` with the ``master`` weights cast to ``dtype``.

    ``backend`` applies to the ``ours*`` providers (``"torch"`` gives the package's
    eager reference with the same structure and parameter names; ``ours-fused``
    with ``"auto"`` is ``"triton"``: on a CPU under the interpreter ``auto``
    would pick the eager backend, which has no fused step)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    step_op = workload.op == "conv_gru_cell"
    if provider in OURS:
        fused = FUSED_SWITCH[provider]
        if provider in FUSED and backend == "auto":
            backend = "triton"
        if step_op:
            steps = []
            for layers in master:
                cells = [_copy_cell(c, dtype, backend) for c in layers[0]]
                step = cells[0] if len(cells) == 1 else TwoPass(*cells)
                steps.append(_compile(step) if provider == "ours-compile" else step)
            return StepRunner(steps, state_first=False, fused=fused)
        grus = []
        for layers in master:
            if workload.separable:
                raise ValueError("separable sequence workloads are not defined")
            gru = _sequence_from_cells([passes[0] for passes in layers], dtype, backend)
            grus.append(_compile(gru) if provider == "ours-compile" else gru)
        return SequenceRunner(grus, fused=fused)

    convert = seed_from_cells if provider == "seed" else raft_from_cells
    stages = []
    for layers in master:
        steps = [convert(passes).to(dtype) for passes in layers]
        if provider == "compile":
            steps = [_compile(s) for s in steps]
        stages.append(steps)
    state_first = provider != "seed"
    if step_op:
        return StepRunner([layers[0] for layers in stages], state_first)
    return LoopRunner(stages, state_first)


def unavailable(provider: str, device, dtype: torch.dtype) -> Optional[str]:
    """Why ``provider`` cannot run on ``device`` in ``dtype`` (``None``: it can).
    Only ``ours-fused`` has conditions: the fused step is Triton kernels, so it
    needs CUDA, or the CPU under ``TRITON_INTERPRET=1`` (which has no
    bfloat16); elsewhere it would run cuDNN + the gate kernels under its name."""
    if provider not in FUSED:
        return None
    from convgru_triton._backend import select_backend

    device = torch.device(device)
    try:
        select_backend(device, "triton")
    except RuntimeError as exc:
        return f"{provider} needs the Triton kernels: {exc}"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return f"{provider}: the Triton interpreter has no bfloat16"
    return None


@contextlib.contextmanager
def count_fused_launches() -> Iterator[List[int]]:
    """``[n]``: the launches of :mod:`convgru_triton.ops.fused_step`'s forward
    kernels inside (its ``_launch``, counted), so that a benchmark can say which
    path ran: ``ours-fused`` must launch them, ``ours`` must not."""
    from convgru_triton.ops.fused_step import kernels as fused_step

    launch = getattr(fused_step, "_launch", None)
    if launch is None:
        raise RuntimeError("convgru_triton.ops.fused_step.kernels._launch is gone: the benchmarks count the fused "
                           "step's launches through it (bench/workloads.count_fused_launches)")
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return launch(*args, **kwargs)

    fused_step._launch = counted
    try:
        yield count
    finally:
        fused_step._launch = launch


def check_path(provider: str, launches: int) -> None:
    """Raise AssertionError when ``provider`` ran the other path than its name says
    (``launches``: :func:`count_fused_launches` over one of its calls)."""
    if provider in FUSED and launches == 0:
        raise AssertionError(f"{provider} launched no fused-step kernel: it ran cuDNN + the gate kernels "
                             f"(the fused_step setting 1 ({FUSED_ENV_VAR}=1) was not honoured, or the fused "
                             f"step declined)")
    if provider in OURS and provider not in FUSED and launches:
        raise AssertionError(f"{provider} launched {launches} fused-step kernels with "
                             f"the fused_step setting 0 ({FUSED_ENV_VAR}=0)")


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


@dataclass
class Inputs:
    xs: List[torch.Tensor]
    hs: List[Optional[torch.Tensor]]
    grads: List[torch.Tensor]  # gradients of the outputs for the backward pass

    def leaves(self) -> List[torch.Tensor]:
        return [t for t in list(self.xs) + list(self.hs) if t is not None]


def make_inputs(workload: Workload, device, dtype: torch.dtype, requires_grad: bool, seed: int = 1) -> Inputs:
    """Inputs (standard normal), initial states (tanh of a standard normal, like RAFT's
    context features; zeros for sequences) and output gradients, reproducible."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    xs, hs, grads = [], [], []
    n = workload.batch
    for stage in workload.stages:
        spatial = stage.size
        if workload.op == "conv_gru_cell":
            xs.append(randn(n, stage.input_channels, *spatial))
            hs.append(torch.tanh(randn(n, stage.hidden_channels, *spatial)))
            grads.append(randn(n, stage.hidden_channels, *spatial))
        else:
            xs.append(randn(workload.steps, n, stage.input_channels, *spatial))
            hs.append(None)
            grads.append(randn(workload.steps, n, stage.hidden_channels, *spatial))
    for t in xs + hs:
        if t is not None:
            t.requires_grad_(requires_grad)
    return Inputs(xs, hs, grads)


def make_step(model: nn.Module, inputs: Inputs, backward: bool) -> Callable[[], None]:
    """One call of a workload as the timing scripts run it: the gradients of the
    parameters and inputs cleared, then the forward pass under ``torch.no_grad()``,
    or forward and backward with the inputs' output gradients (no device sync)."""
    leaves = list(model.parameters()) + inputs.leaves()

    def step() -> None:
        for t in leaves:
            t.grad = None
        if backward:
            try:
                torch.autograd.backward(model(inputs.xs, inputs.hs), inputs.grads)
            except BaseException:
                give_back_switch()  # a failed pass may still hold the fused step's switch
                raise
        else:
            with torch.no_grad():
                model(inputs.xs, inputs.hs)

    return step


def state_bytes(workload: Workload, dtype: torch.dtype) -> int:
    """Bytes of all states the workload produces (every step, layer and stage)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for stage in workload.stages:
        total += workload.batch * workload.steps * stage.num_layers * stage.hidden_channels * stage.size[0] * stage.size[1]
    return total * size * (2 if workload.separable else 1)
