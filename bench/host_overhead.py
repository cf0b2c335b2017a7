"""Host time per ConvGRU step: what the CPU spends to issue one step, GPU work stubbed.

RAFT steps its GRU cell 12-32 times per image pair; at RAFT's sizes an H200
needs ~0.1 ms of GPU time per update step, so a step that costs the host more
than that is host-bound whatever the kernels do. This measures the host side
alone, on any machine without a GPU:

* ``ours`` (Triton path): the package's real Triton launch path -- validation,
  the cell plans (:mod:`convgru_triton._plan`) or the sequence operator, the
  bound launches, Triton's argument binding and specialization at a first
  launch -- on tiny CPU tensors, with a fake CUDA target (sm_90) in Triton's
  driver and kernels that are never compiled nor launched: every "launch" ends
  in a no-op that counts it, per kernel name. The convolutions run for real on
  the tiny tensors (as they do for the baselines), so they cost their dispatch
  overhead only.
* ``ours (above launchers)``: the sequence with the gate math (the six gate
  launches of ``GateLaunches`` in :mod:`convgru_triton.ops.gates.kernels`)
  replaced by no-ops: the host time the operator spends *outside* the
  launchers; ``ours`` minus this is the time inside them. Sequence rows
  only: a cell step's plan calls its compiled kernels directly and never goes
  through that interface, so there the row would time ``ours`` again.
* ``ours (torch backend)``: the eager fallback (CPU) on the same tensors.
* ``ours (compiled)``: ``torch.compile(fullgraph=True)`` of ``ours``'s call,
  with the same fake target. A cell step compiles to Inductor's own kernels
  for the step's math (here C++ kernels that run on the tiny tensors, so this
  row is an upper bound on the host time of Inductor's GPU launches); a
  sequence keeps the package's operator, whose launches are stubbed.
* ``raft``, ``seed``: the eager baselines of :mod:`bench.baselines` on the same
  tensors and weights.

Rows: ``ConvGRUCell2d`` (``reset_after`` False and True), ``SepConvGRUCell2d``,
its 12-step loop (the unit torch.compile sees whole) and a T=8 ``ConvGRU2d``
sequence (baselines stepped 8 times), each under ``torch.no_grad()`` and as
forward+backward.

RAFT's update loop (:data:`LOOP_ROWS`): ``SepConvGRUCell2d`` (RAFT) and
``ConvGRUCell2d`` 3x3 (RAFT-small) stepped 12 times with the state fed back, in
RAFT's four modes -- inference or training (the 12 steps with grad, then
``h.float().sum().backward()``), float32 or bfloat16 autocast
(``torch.autocast("cpu")``: the tensors are CPU ones) -- on both step paths,
``fused_step="0"`` (cuDNN convolutions + the gate kernels, the default) and
``"1"`` (the fused convolution-and-gate kernels), against RAFT's eager cell in
the same mode. The fake target lets the fused step take CPU tensors (its
``supports`` sees them as CUDA ones); launches are counted per kernel name,
fused and gate kernels apart, and a fused row that launched no fused kernel,
or a default row that launched one, raises. Training rows bump the weights'
versions before each loop, as an optimizer step would, so that the weight
casts a plan keeps are made again, as autocast makes RAFT's. These rows run
ATen's own CPU convolutions, oneDNN off (:func:`_onednn_off`), for every
provider: oneDNN's bfloat16 convolution is CPU work a GPU's host never does.

One thread. The time is the CPU time of the thread (``time.thread_time``), not
wall time: on a shared machine a process waiting for a core does not count,
so the figures hold while other jobs run (caches shared with them still move
them a little). Providers are timed interleaved (round-robin, ``--repeats``
times), and the median of the per-call times is reported with its min-max
spread; a ratio between two providers is the median over rounds of their
times in the same round (:func:`paired_ratio`). Python calls and aten ops per
call do not depend on the load (:func:`count_calls`).

    python -m bench.host_overhead [--steps 300] [--repeats 11] [--rows ...] [--out bench/results]

writes ``host_overhead-cpu.{json,md}``. The fake target needs Triton 3.x
(``triton.runtime.driver.set_active``, ``JITFunction._do_compile``); see
:func:`stubbed_triton`. What is *not* counted: the CUDA driver's launch call
and Triton's own launcher (``CompiledKernel.run``), which the stub replaces.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench._triton_compat import FakeCudaDriver

# ----------------------------------------------------------------------------
# Triton with a fake GPU: binding and specialization run, launches do nothing
# ----------------------------------------------------------------------------


class _NoOpKernel:
    """What ``JITFunction`` caches instead of a compiled kernel. It has the
    attributes a launch touches (``run``, ``function``, ``packed_metadata``,
    ``launch_metadata``, ``__getitem__`` for a direct launch of a compiled
    kernel) and counts launches, in all and per kernel name: a plan's bound
    launches call ``run`` directly, so this is where they are seen."""

    function = None
    packed_metadata = None

    def __init__(self, counter: List[int], by_kernel: "collections.Counter", name: str) -> None:
        self._counter, self._by_kernel, self.name = counter, by_kernel, name

    def launch_metadata(self, *args):
        return None

    def run(self, *args, **kwargs):
        self._counter[0] += 1
        self._by_kernel[self.name] += 1

    def __getitem__(self, grid):
        return self.run


def _jit_functions():
    """Every Triton ``JITFunction`` defined in the package's modules."""
    from triton.runtime.jit import JITFunction

    seen = []
    for name, module in list(sys.modules.items()):
        if name.startswith("convgru_triton") and module is not None:
            for value in vars(module).values():
                if isinstance(value, JITFunction) and value not in seen:
                    seen.append(value)
    return seen


class _FakeState:
    """What the fake target keeps between :func:`stubbed_triton` blocks: its
    driver, each kernel's cache of stubs and the launchers' geometries and bound
    kernels (which hold the kernels they replay), so that the interleaved timed runs measure
    the steady state, not a first launch through the binder each time."""

    def __init__(self) -> None:
        self.driver = FakeCudaDriver(90)
        self.device_caches: Dict = {}
        self.geometries: Dict = {}
        self.steps: Dict = {}
        self.decisions: Dict = {}  # the fused step's use_fused cache, made with CPU tensors seen as CUDA ones
        self.counter = [0]
        self.by_kernel: collections.Counter = collections.Counter()


_FAKE: Optional[_FakeState] = None


@contextlib.contextmanager
def stubbed_triton():
    """Run the package's Triton path on CPU tensors without a GPU; yields a
    one-element list counting kernel launches.

    Inside: Triton's active driver reports a CUDA sm_90 target, every kernel
    specialization "compiles" to a :class:`_NoOpKernel` (kept in a kernel cache
    of its own, so that a real GPU's cache is never mixed with stubs), and the
    package's backend rule accepts ``backend="triton"`` for CPU tensors (it
    allows that under the Triton interpreter, which this pretends to be), and
    the fused step's ``supports`` sees CPU tensors as CUDA ones (so that
    ``fused_step="1"`` takes the fused kernels, bfloat16 included). What the
    fake target compiled and cached is kept for the next block; per-kernel
    launch counts are in :func:`kernel_launches`."""
    global _FAKE
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import convgru_triton._backend as backend_rule
    from convgru_triton.ops.gates import kernels as launchers  # the kernels' module must be loaded
    from convgru_triton.ops.fused_step import kernels as fused_step

    if _FAKE is None:
        _FAKE = _FakeState()
    fake = _FAKE
    counter = fake.counter
    saved_active = driver._active
    saved_compile = JITFunction._do_compile
    saved_interpreter = backend_rule._interpreter_enabled
    kernels = _jit_functions()
    saved_caches = [k.device_caches for k in kernels]

    def no_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        stub = _NoOpKernel(counter, fake.by_kernel, self.fn.__name__)
        self.device_caches[device][0][key] = stub
        return stub

    # The launchers' geometries and bound kernels, which keep the compiled
    # kernels they replay, are swapped too: stubs must never outlive the fake target, nor real kernels be
    # replayed inside it.
    saved_geometries, saved_steps = launchers._GEOMETRIES, launchers._STEPS
    # The fused step's decisions, made with CPU tensors seen as CUDA ones, likewise.
    saved_supports, saved_decisions = fused_step.supports, fused_step._DECISIONS

    def supports(spec, dtype, device):
        return saved_supports(spec, dtype, torch.device("cuda") if device.type == "cpu" else device)

    try:
        launchers._GEOMETRIES, launchers._STEPS = fake.geometries, fake.steps
        fused_step.supports, fused_step._DECISIONS = supports, fake.decisions
        driver.set_active(fake.driver)
        JITFunction._do_compile = no_compile
        backend_rule._interpreter_enabled = lambda: True
        for k in kernels:
            if k not in fake.device_caches:
                fake.device_caches[k] = type(k.device_caches)(k.create_binder)
            k.device_caches = fake.device_caches[k]
        yield counter
    finally:
        fake.geometries, fake.steps = launchers._GEOMETRIES, launchers._STEPS
        launchers._GEOMETRIES, launchers._STEPS = saved_geometries, saved_steps
        fake.decisions = fused_step._DECISIONS
        fused_step.supports, fused_step._DECISIONS = saved_supports, saved_decisions
        for k, caches in zip(kernels, saved_caches):
            k.device_caches = caches
        backend_rule._interpreter_enabled = saved_interpreter
        JITFunction._do_compile = saved_compile
        driver._active = saved_active


def kernel_launches() -> "collections.Counter":
    """Launches of the stubbed kernels so far, per kernel name (a copy)."""
    return collections.Counter() if _FAKE is None else collections.Counter(_FAKE.by_kernel)


def fused_kernel_names() -> frozenset:
    """The names of the fused step's kernels (forward and data gradient), as the
    stub sees them; every other package kernel is a gate kernel."""
    from convgru_triton.ops.fused_step import kernels as fused_step

    return frozenset(fused_step._REGISTRY_NAMES) | frozenset(fused_step._BWD_REGISTRY_NAMES)


@contextlib.contextmanager
def gate_math_disabled():
    """Replace every gate launch of ``GateLaunches`` (the sequence operator's
    Triton gate math) by a no-op, and its ``bind`` (the launches bound to one
    call) by one returning the class: what remains is the host time above the
    launchers."""
    from convgru_triton.ops.gates import kernels

    cls = kernels.GateLaunches
    names = [n for n in ("bind", "reset_after_fwd", "reset_after_bwd", "reset_gate_fwd", "update_fwd", "update_bwd",
                         "reset_gate_bwd") if n in vars(cls)]
    saved = {n: vars(cls)[n] for n in names}
    try:
        for n in names:
            if n == "bind":
                setattr(cls, n, classmethod(lambda c, *args: c))
            else:
                setattr(cls, n, staticmethod(lambda *args, **kwargs: None))
        yield
    finally:
        for n, v in saved.items():
            setattr(cls, n, v)


# ----------------------------------------------------------------------------
# Rows and providers
# ----------------------------------------------------------------------------

BATCH, CHANNELS, HIDDEN, SIZE, STEPS = 1, 4, 4, 4, 8
UPDATES = 12  # RAFT's update iterations per frame pair in training: the "loop" row's state-fed-back steps
PROVIDERS = ("raft", "seed", "ours", "ours (above launchers)", "ours (torch backend)", "ours (compiled)")


@dataclass(frozen=True)
class Row:
    name: str       # e.g. "ConvGRUCell2d reset_after=False"
    kind: str       # "cell", "sep", "loop" (UPDATES separable steps, state fed back) or "sequence"
    reset_after: bool
    backward: bool

    @property
    def label(self) -> str:
        return f"{self.name}, {'fwd+bwd' if self.backward else 'no grad'}"


ROWS = [
    Row(name, kind, reset_after, backward)
    for name, kind, reset_after in (
        ("ConvGRUCell2d reset_after=False", "cell", False),
        ("ConvGRUCell2d reset_after=True", "cell", True),
        ("SepConvGRUCell2d", "sep", False),
        (f"SepConvGRUCell2d x{UPDATES} loop", "loop", False),
        (f"ConvGRU2d T={STEPS}", "sequence", False),
    )
    for backward in (False, True)
]


def _ours_module(row: Row, backend: str) -> nn.Module:
    from convgru_triton import ConvGRU2d, ConvGRUCell2d, SepConvGRUCell2d

    torch.manual_seed(0)
    if row.kind == "cell":
        return ConvGRUCell2d(CHANNELS, HIDDEN, 3, reset_after=row.reset_after, backend=backend)
    if row.kind in ("sep", "loop"):
        return SepConvGRUCell2d(CHANNELS, HIDDEN, 5, backend=backend)
    return ConvGRU2d(CHANNELS, HIDDEN, 3, backend=backend)


def _baseline(row: Row, provider: str) -> Optional[nn.Module]:
    """The baseline's step module (``forward(x, h)``), or None where it has no
    counterpart (the baselines compute the reset_after=False candidate only)."""
    from bench.baselines import raft_from_cells, seed_from_cells

    if row.reset_after:
        return None
    reference = _ours_module(row, "torch")
    cells = [reference.horizontal, reference.vertical] if row.kind in ("sep", "loop") else [reference]
    if row.kind == "sequence":
        from convgru_triton import ConvGRUCell2d

        cell = ConvGRUCell2d(CHANNELS, HIDDEN, 3)
        cell.load_state_dict({k[:-3]: v for k, v in reference.state_dict().items()})
        cells = [cell]
    if provider == "raft":
        step = raft_from_cells(cells)
        return _XFirst(step)
    return seed_from_cells(cells)


class _XFirst(nn.Module):
    """RAFT's ``forward(h, x)`` as ``forward(x, h)``."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step

    def forward(self, x, h):
        return self.step(h, x)


def _update_loop(step: Callable) -> Callable:
    """``(x, h) -> h`` after UPDATES calls of ``step(x, h)``, each fed the state
    the last returned (RAFT's update loop, the unit torch.compile sees whole)."""

    def loop(x, h):
        for _ in range(UPDATES):
            h = step(x, h)
        return h

    return loop


def _step_function(row: Row, provider: str, tensors) -> Optional[Callable[[], None]]:
    x, h, xs, grad = tensors
    if provider == "ours (above launchers)" and row.kind != "sequence":
        return None  # a cell step's plan never calls the launchers' interface: this would time ours again
    if provider.startswith("ours"):
        module = _ours_module(row, "torch" if provider == "ours (torch backend)" else "triton")
        call = _update_loop(module) if row.kind == "loop" else module
        if provider == "ours (compiled)":
            call = torch.compile(call, fullgraph=True)
        if row.kind == "sequence":
            def forward():
                return call(xs)[0]
        else:
            def forward():
                return call(x, h)
    else:
        module = _baseline(row, provider)
        if module is None:
            return None
        if row.kind == "loop":
            module = _update_loop(module)
        if row.kind == "sequence":
            def forward():
                state = torch.zeros_like(h)
                states = []
                for t in range(STEPS):
                    state = module(xs[t], state)
                    states.append(state)
                return torch.stack(states)
        else:
            def forward():
                return module(x, h)
    if row.backward:
        grad_out = grad if row.kind == "sequence" else grad[0]

        def step():
            torch.autograd.backward(forward(), grad_out)
    else:
        def step():
            with torch.no_grad():
                forward()
    return step


def make_tensors(requires_grad: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    h = torch.tanh(torch.randn(BATCH, HIDDEN, SIZE, SIZE, generator=gen))
    xs = torch.randn(STEPS, BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    grad = torch.randn(STEPS, BATCH, HIDDEN, SIZE, SIZE, generator=gen)
    for t in (x, h, xs):
        t.requires_grad_(requires_grad)
    return x, h, xs, grad


@contextlib.contextmanager
def provider_context(provider: str):
    """The context a provider's step runs in (the fake GPU for the Triton path)."""
    if provider in ("ours", "ours (compiled)"):
        with stubbed_triton() as launches:
            yield launches
    elif provider == "ours (above launchers)":
        with stubbed_triton() as launches, gate_math_disabled():
            yield launches
    else:
        yield [0]


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher's backends (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_calls(fn: Callable[[], None], aten: bool = True) -> Tuple[int, Optional[int]]:
    """``(python_calls, aten_ops)`` of one call of ``fn``: load-independent
    measures of host work (Python function calls, C calls included, as
    ``sys.setprofile`` sees them; aten ops as a dispatch mode sees them, or
    ``None`` without ``aten``: a compiled function refuses to run under a
    dispatch mode)."""
    calls = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    if not aten:
        return calls[0], None
    with _CountOps() as ops:
        fn()
    return calls[0], ops.count


def steps_of(row: Row) -> int:
    """Steps per call (a separable step counts one): T for the sequence row, UPDATES for the loop row."""
    return {"sequence": STEPS, "loop": UPDATES}.get(row.kind, 1)


def measure(rows: List[Row], providers=PROVIDERS, steps: int = 300, repeats: int = 11) -> Dict:
    """Per row and provider: per-call host time in microseconds (median, min, max over
    ``repeats`` interleaved runs of about ``steps`` cell steps: ``steps`` calls
    of a cell, fewer of a sequence or a loop) and kernel launches per call."""
    torch.set_num_threads(1)
    results: Dict = {}
    for row in rows:
        tensors = make_tensors(row.backward)
        calls = max(1, round(steps / steps_of(row)))
        functions = {}
        launches, counts = {}, {}
        for provider in providers:
            with provider_context(provider) as counter:
                fn = _step_function(row, provider, tensors)
                if fn is None:
                    continue
                for _ in range(20):  # warm-up: caches, binder, oneDNN primitives
                    fn()
                before = counter[0]
                fn()
                launches[provider] = counter[0] - before
                counts[provider] = count_calls(fn, aten=provider != "ours (compiled)")
                if provider == "ours" and launches[provider] == 0:
                    raise RuntimeError(
                        "no Triton kernel was launched: the package did not take its Triton path (is "
                        "TRITON_INTERPRET set? run as python -m bench.host_overhead)")
            functions[provider] = fn
        times: Dict[str, List[float]] = {p: [] for p in functions}
        for _ in range(repeats):
            for provider, fn in functions.items():
                with provider_context(provider):
                    start = time.thread_time()
                    for _ in range(calls):
                        fn()
                    times[provider].append((time.thread_time() - start) / calls * 1e6)
        results[row.label] = {
            p: {
                "median_us": statistics.median(ts), "min_us": min(ts), "max_us": max(ts),
                "runs_us": [round(t, 2) for t in ts], "launches": launches[p],
                "python_calls": counts[p][0], "aten_ops": counts[p][1],
            }
            for p, ts in times.items()
        }
    return results


# ----------------------------------------------------------------------------
# RAFT's update loop: 12 steps, state fed back, RAFT's four modes, both step paths
# ----------------------------------------------------------------------------

#: provider -> the ``fused_step`` setting it runs under (``None``: RAFT's eager cell)
LOOP_PROVIDERS = {"raft": None, "ours (default path)": "0", "ours (fused path)": "1"}
#: ours / raft ratio each path aims at
LOOP_TARGETS = {"ours (default path)": 0.8, "ours (fused path)": 0.5}


@dataclass(frozen=True)
class LoopRow:
    cell: str        # "sep": SepConvGRUCell2d 1x5+5x1 (RAFT); "cell": ConvGRUCell2d 3x3 (RAFT-small)
    training: bool   # the 12 steps with grad, then h.float().sum().backward()
    amp: bool        # under torch.autocast("cpu", dtype=torch.bfloat16)

    @property
    def kind(self) -> str:
        return "raft-" + self.cell

    @property
    def label(self) -> str:
        name = "SepConvGRUCell2d" if self.cell == "sep" else "ConvGRUCell2d 3x3"
        return (f"{name} x{UPDATES}, {'training' if self.training else 'inference'}, "
                f"{'bf16 autocast' if self.amp else 'float32'}")


LOOP_ROWS = [LoopRow(cell, training, amp) for cell in ("sep", "cell") for training in (False, True)
             for amp in (False, True)]


def _loop_modules(row: LoopRow, provider: str) -> Tuple[Callable, List[torch.Tensor]]:
    """``(step(x, h) -> h', parameters)`` of one provider, all with the same weights."""
    from bench.baselines import raft_from_cells
    from convgru_triton import ConvGRUCell2d, SepConvGRUCell2d

    torch.manual_seed(0)
    if row.cell == "sep":
        ours = SepConvGRUCell2d(CHANNELS, HIDDEN, 5, backend="triton")
        cells = [ours.horizontal, ours.vertical]
    else:
        ours = ConvGRUCell2d(CHANNELS, HIDDEN, 3, backend="triton")
        cells = [ours]
    module = _XFirst(raft_from_cells(cells)) if provider == "raft" else ours
    return module, list(module.parameters())


def _loop_function(row: LoopRow, provider: str) -> Callable[[], None]:
    """One RAFT update loop of ``provider``: UPDATES steps from the same input
    and initial state, each fed the state the last returned."""
    step, params = _loop_modules(row, provider)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen).requires_grad_(row.training)
    h0 = torch.tanh(torch.randn(BATCH, HIDDEN, SIZE, SIZE, generator=gen)).requires_grad_(row.training)
    amp, training = row.amp, row.training
    bump = torch._C._autograd._unsafe_set_version_counter

    def loop():
        if training:  # an optimizer step's effect on the weights' versions, without changing them
            bump(tuple(params), tuple(p._version + 1 for p in params))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), torch.set_grad_enabled(training):
            h = h0
            for _ in range(UPDATES):
                h = step(x, h)
        if training:
            h.float().sum().backward()

    return loop


@contextlib.contextmanager
def _onednn_off():
    """ATen's own CPU convolutions instead of oneDNN's. oneDNN's bfloat16
    convolution costs ~45 µs a call on these tiny tensors against ~7 µs in
    float32 (2-core Xeon/EPYC VMs, torch 2.13): CPU work that a cuDNN launch
    does not cost a GPU's host, and that would swamp the bfloat16 rows. ATen's
    kernels take ~10 µs in either dtype."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


@contextlib.contextmanager
def loop_context(provider: str):
    """What a loop row's provider runs in: oneDNN off (:func:`_onednn_off`), and
    for ours the fake GPU and the provider's step path."""
    setting = LOOP_PROVIDERS[provider]
    if setting is None:
        with _onednn_off():
            yield
        return
    import convgru_triton

    with _onednn_off(), stubbed_triton(), convgru_triton.override_settings(fused_step=setting):
        yield


def _check_launches(label: str, provider: str, fused: int, gates: int) -> None:
    """Fail loudly where a row did not run the path it is named after."""
    if provider == "ours (fused path)" and fused == 0:
        raise RuntimeError(f"{label}: the fused path ran no fused kernel ({gates} gate-kernel launches): the "
                           "fused step declined or was not selected, so the row would time the default path")
    if provider == "ours (default path)" and (fused or not gates):
        raise RuntimeError(f"{label}: the default path launched {fused} fused and {gates} gate kernels")


def measure_loops(rows: List[LoopRow], steps: int = 300, repeats: int = 11) -> Dict:
    """Per loop row and provider, per cell step (a SepConvGRU step for the
    separable rows): host time in microseconds (median, min, max over
    ``repeats`` interleaved runs of about ``steps`` steps), Python calls, aten
    ops and kernel launches (fused and gate kernels apart)."""
    torch.set_num_threads(1)
    fused_names = fused_kernel_names()
    calls = max(1, round(steps / UPDATES))
    results: Dict = {}
    for row in rows:
        functions, facts = {}, {}
        for provider in LOOP_PROVIDERS:
            with loop_context(provider):
                fn = _loop_function(row, provider)
                for _ in range(5):  # warm-up: plans, binder, oneDNN primitives
                    fn()
                before = kernel_launches()
                fn()
                launched = kernel_launches() - before
                fused = sum(n for k, n in launched.items() if k in fused_names)
                gates = sum(launched.values()) - fused
                if LOOP_PROVIDERS[provider] is not None:
                    _check_launches(row.label, provider, fused, gates)
                python_calls, aten_ops = count_calls(fn)
            functions[provider] = fn
            facts[provider] = {
                "python_calls": python_calls / UPDATES, "aten_ops": aten_ops / UPDATES,
                "fused_launches": fused / UPDATES, "gate_launches": gates / UPDATES,
                "kernels": dict(sorted(launched.items())),
            }
        times: Dict[str, List[float]] = {p: [] for p in functions}
        for _ in range(repeats):
            for provider, fn in functions.items():
                with loop_context(provider):
                    start = time.thread_time()
                    for _ in range(calls):
                        fn()
                    times[provider].append((time.thread_time() - start) / (calls * UPDATES) * 1e6)
        results[row.label] = {
            "row": {"cell": row.cell, "training": row.training, "amp": row.amp, "steps_per_loop": UPDATES},
            **{p: {"median_us": statistics.median(ts), "min_us": min(ts), "max_us": max(ts),
                   "runs_us": [round(t, 2) for t in ts], **facts[p]} for p, ts in times.items()},
        }
    return results


def paired_ratio(results: Dict, label: str, provider: str, base: str = "raft") -> Optional[float]:
    """The median over rounds of ``provider``'s time over ``base``'s in the same
    round: a paired comparison, runs taken a fraction of a second apart, which
    the machine's load moves far less than it moves either median (on the shared
    2-core VM single runs of one provider ranged over 1.5x)."""
    r = results[label]
    if provider not in r or base not in r:
        return None
    return statistics.median(a / b for a, b in zip(r[provider]["runs_us"], r[base]["runs_us"]))


def _ratio(results: Dict, label: str, provider: str, base: str = "raft") -> str:
    ratio = paired_ratio(results, label, provider, base)
    return "—" if ratio is None else f"{ratio:.2f}×"


def header(info: Dict) -> str:
    """The machine, versions and commit a results file came from."""
    dirty = " (uncommitted changes)" if info.get("dirty") else ""
    return (f"{info.get('cpu', '?')}, 1 thread · torch {info.get('torch', '?')} · triton "
            f"{info.get('triton', '?')} · commit {str(info.get('commit', '?'))[:12]}{dirty}\n\n")


def markdown(results: Dict, info: Optional[Dict] = None) -> str:
    lines = [
        "Host CPU µs per call (thread CPU time; median of interleaved runs, min–max in brackets). `ours`: Triton "
        "path, GPU work stubbed; `above`: the sequence with the launchers' interface stubbed (inside = ours − above; "
        "a cell's plan never calls that interface); ratios are against `raft`: the median over rounds of the two "
        "providers' times in the same round.",
        "",
        "| row | raft | seed | ours (Triton) | above launchers | inside | ours / raft | above / raft | ours (torch) |"
        " torch / raft | launches | ours compiled | compiled / ours |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def cell(r, p):
        if p not in r:
            return "—"
        v = r[p]
        return f"{v['median_us']:.0f} ({v['min_us']:.0f}–{v['max_us']:.0f})"

    for label, r in results.items():
        inside = "—"
        if "ours" in r and "ours (above launchers)" in r:
            inside = f"{r['ours']['median_us'] - r['ours (above launchers)']['median_us']:.0f}"
        launches = r.get("ours", {}).get("launches", "—")
        lines.append(
            f"| {label} | {cell(r, 'raft')} | {cell(r, 'seed')} | {cell(r, 'ours')} | "
            f"{cell(r, 'ours (above launchers)')} | {inside} | {_ratio(results, label, 'ours')} | "
            f"{_ratio(results, label, 'ours (above launchers)')} | "
            f"{cell(r, 'ours (torch backend)')} | {_ratio(results, label, 'ours (torch backend)')} | {launches} | "
            f"{cell(r, 'ours (compiled)')} | {_ratio(results, label, 'ours (compiled)', 'ours')} |"
        )
    lines += [
        "",
        "Work per call, independent of the machine's load: Python function calls (C calls included, as "
        "`sys.setprofile` sees them) / aten ops dispatched (forward and backward).",
        "",
        "| row | raft | seed | ours (Triton) | above launchers | ours (torch) | ours compiled |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]

    def work(r, p):
        if p not in r:
            return "—"
        return f"{r[p]['python_calls']} / {'—' if r[p]['aten_ops'] is None else r[p]['aten_ops']}"

    for label, r in results.items():
        lines.append(f"| {label} | {work(r, 'raft')} | {work(r, 'seed')} | {work(r, 'ours')} | "
                     f"{work(r, 'ours (above launchers)')} | {work(r, 'ours (torch backend)')} | "
                     f"{work(r, 'ours (compiled)')} |")
    return (header(info) if info else "") + "\n".join(lines) + "\n"


def markdown_loops(loops: Dict) -> str:
    """The table of RAFT's update loop: one line per loop row and step path."""
    lines = [
        f"RAFT's update loop: {UPDATES} steps, the state fed back. Host CPU µs per step (per SepConvGRU step for the "
        "separable rows; median of interleaved runs, min–max in brackets), Python calls and aten ops per step, and "
        "kernel launches per step as the stub saw them (fused: the fused step's kernels; gate: the gate kernels). "
        "`ours / raft` is paired per round against RAFT's eager cell in the same mode. Targets: ours / raft "
        f"≤ {LOOP_TARGETS['ours (default path)']:.2f} on the default path (cuDNN + gate kernels), "
        f"≤ {LOOP_TARGETS['ours (fused path)']:.2f} on the fused path; Python calls per step ≤ RAFT's.",
        "",
        "| loop | path | raft µs | ours µs | ours / raft | target | Python calls ours / raft | aten ops ours / raft "
        "| kernels per step |",
        "|---|---|--:|--:|--:|---|--:|--:|---|",
    ]
    for label, r in loops.items():
        raft = r["raft"]
        for provider, target in LOOP_TARGETS.items():
            if provider not in r:
                continue
            v = r[provider]
            ratio = paired_ratio(loops, label, provider)
            met = "met" if ratio <= target else "missed"
            calls_met = "met" if v["python_calls"] <= raft["python_calls"] else "missed"
            kernels = f"{v['fused_launches']:g} fused + {v['gate_launches']:g} gate"
            if provider == "ours (fused path)":
                kernels += " (fused kernels ran)"
            path = provider[len("ours ("):-1]
            lines.append(
                f"| {label} | {path} | {raft['median_us']:.0f} ({raft['min_us']:.0f}–{raft['max_us']:.0f}) | "
                f"{v['median_us']:.0f} ({v['min_us']:.0f}–{v['max_us']:.0f}) | **{ratio:.2f}×** | "
                f"≤ {target:.2f}× {met} | {v['python_calls']:.1f} / {raft['python_calls']:.1f} ({calls_met}) | "
                f"{v['aten_ops']:.1f} / {raft['aten_ops']:.1f} | {kernels} |")
    return "\n".join(lines) + "\n"


def _machine_info() -> Dict:
    from bench.machine import convgru_machine_info

    return convgru_machine_info(torch.device("cpu"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved runs per provider")
    parser.add_argument("--rows", default="all", help="comma-separated row kinds: cell,sep,loop,sequence "
                        "(per-step rows), raft-sep,raft-cell (RAFT's update loop in its four modes, both paths)")
    parser.add_argument("--out", default=None, help="directory for host_overhead-cpu.{json,md}")
    args = parser.parse_args(argv)
    if "triton" not in sys.modules:  # the fake target needs compiled-mode Triton, chosen at its import
        os.environ.pop("TRITON_INTERPRET", None)
    kinds = {r.kind for r in ROWS} | {r.kind for r in LOOP_ROWS} if args.rows == "all" else set(args.rows.split(","))
    unknown = kinds - {r.kind for r in ROWS} - {r.kind for r in LOOP_ROWS}
    if unknown:
        parser.error(f"unknown row kinds {sorted(unknown)}")
    rows = [r for r in ROWS if r.kind in kinds]
    loop_rows = [r for r in LOOP_ROWS if r.kind in kinds]
    loops = measure_loops(loop_rows, steps=args.steps, repeats=args.repeats)
    results = measure(rows, steps=args.steps, repeats=args.repeats)
    info = _machine_info()
    text = header(info)
    if loop_rows:
        text += markdown_loops(loops)
    if rows:
        text += ("\n" if loop_rows else "") + markdown(results)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_overhead-cpu.json"), "w") as f:
            json.dump({"machine_info": info, "steps": args.steps, "repeats": args.repeats, "results": results,
                       "raft_loops": loops}, f, indent=1)
        with open(os.path.join(args.out, "host_overhead-cpu.md"), "w") as f:
            f.write("# Host overhead per step\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
