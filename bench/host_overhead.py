"""Host time per ConvGRU step: what the CPU spends to issue one step, GPU work stubbed.

RAFT steps its GRU cell 12-32 times per image pair; at RAFT's sizes an H200
needs ~0.1 ms of GPU time per update step, so a step that costs the host more
than that is host-bound whatever the kernels do. This measures the host side
alone, on any machine without a GPU:

* ``ours`` (Triton path): the package's real Triton launch path -- validation,
  the sequence operator, the launchers, Triton's argument binding and
  specialization -- on tiny CPU tensors, with a fake CUDA target (sm_90) in
  Triton's driver and kernels that are never compiled nor launched: every
  "launch" ends in a no-op. The convolutions run for real on the tiny tensors
  (as they do for the baselines), so they cost their dispatch overhead only.
* ``ours (above launchers)``: the same with the gate math (``_TritonGateMath``,
  the launchers' interface) replaced by no-ops: the host time the package spends
  *outside* the launchers. ``ours`` minus this is the time inside them.
* ``ours (torch backend)``: the eager fallback (CPU) on the same tensors.
* ``ours (compiled)``: ``torch.compile(fullgraph=True)`` of ``ours``'s call,
  with the same fake target: what a compiled step costs the host against the
  eager one. A cell step compiles to Inductor's own kernels for the step's
  math (here C++ kernels that run on the tiny tensors, so this row is an
  upper bound on the host time of Inductor's GPU launches); a sequence keeps
  the package's operator, whose launches are stubbed.
* ``raft``, ``seed``: the eager baselines of :mod:`bench.baselines` on the same
  tensors and weights.

Rows: ``ConvGRUCell2d`` (``reset_after`` False and True), ``SepConvGRUCell2d``
and a T=8 ``ConvGRU2d`` sequence (baselines stepped 8 times), each under
``torch.no_grad()`` and as forward+backward. One thread. The time is the
CPU time of the thread (``time.thread_time``), not wall time: on a shared
machine a process waiting for a core does not count, so the figures hold
while other jobs run (caches shared with them still move them a little).
Providers are timed interleaved (round-robin, ``--repeats`` times), and the
median of the per-call times is reported with its min-max spread; a ratio
between two providers is the median over rounds of their times in the same
round (:func:`paired_ratio`).

    python -m bench.host_overhead [--steps 300] [--repeats 11] [--out bench/results]

writes ``host_overhead-cpu.{json,md}``. The fake target needs Triton 3.x
(``triton.runtime.driver.set_active``, ``JITFunction._do_compile``); see
:func:`stubbed_triton`. What is *not* counted: the CUDA driver's own launch
call (a few microseconds per kernel on a real GPU), which the stub replaces.
"""

from __future__ import annotations

import argparse
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
    kernel) and counts launches."""

    function = None
    packed_metadata = None

    def __init__(self, counter: List[int]) -> None:
        self._counter = counter

    def launch_metadata(self, *args):
        return None

    def run(self, *args, **kwargs):
        self._counter[0] += 1

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
        self.counter = [0]


_FAKE: Optional[_FakeState] = None


@contextlib.contextmanager
def stubbed_triton():
    """Run the package's Triton path on CPU tensors without a GPU; yields a
    one-element list counting kernel launches.

    Inside: Triton's active driver reports a CUDA sm_90 target, every kernel
    specialization "compiles" to a :class:`_NoOpKernel` (kept in a kernel cache
    of its own, so that a real GPU's cache is never mixed with stubs), and the
    package's backend rule accepts ``backend="triton"`` for CPU tensors (it
    allows that under the Triton interpreter, which this pretends to be).
    What the fake target compiled and cached is kept for the next block."""
    global _FAKE
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import convgru_triton._backend as backend_rule
    from convgru_triton.ops import conv_gru_cell as launchers  # the kernels' module must be loaded

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
        stub = _NoOpKernel(counter)
        self.device_caches[device][0][key] = stub
        return stub

    # The launchers' geometries and bound kernels, which keep the compiled
    # kernels they replay, are swapped too: stubs must never outlive the fake target, nor real kernels be
    # replayed inside it.
    saved_geometries, saved_steps = launchers._GEOMETRIES, launchers._STEPS
    try:
        launchers._GEOMETRIES, launchers._STEPS = fake.geometries, fake.steps
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
        for k, caches in zip(kernels, saved_caches):
            k.device_caches = caches
        backend_rule._interpreter_enabled = saved_interpreter
        JITFunction._do_compile = saved_compile
        driver._active = saved_active


@contextlib.contextmanager
def gate_math_disabled():
    """Replace every method of the launchers' interface (``_TritonGateMath``) by a
    no-op, and its ``bind`` (the launches bound to one call) by the class: what
    remains is the host time above the launchers."""
    from convgru_triton.ops import conv_gru

    cls = conv_gru._TritonGateMath
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
    """Cell steps per call: the sequence row runs T steps, the separable cell two updates."""
    return {"sequence": STEPS, "loop": UPDATES}.get(row.kind, 1)


def measure(rows: List[Row], providers=PROVIDERS, steps: int = 300, repeats: int = 11) -> Dict:
    """Per row and provider: per-call host time in microseconds (median, min, max over
    ``repeats`` interleaved runs of ``steps`` calls) and kernel launches per call."""
    torch.set_num_threads(1)
    results: Dict = {}
    for row in rows:
        tensors = make_tensors(row.backward)
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
                    for _ in range(steps):
                        fn()
                    times[provider].append((time.thread_time() - start) / steps * 1e6)
        results[row.label] = {
            p: {
                "median_us": statistics.median(ts), "min_us": min(ts), "max_us": max(ts),
                "runs_us": [round(t, 2) for t in ts], "launches": launches[p],
                "python_calls": counts[p][0], "aten_ops": counts[p][1],
            }
            for p, ts in times.items()
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


def markdown(results: Dict, info: Optional[Dict] = None) -> str:
    lines = []
    if info:
        lines += [f"{info.get('cpu', '?')}, 1 thread · torch {info.get('torch', '?')} · triton "
                  f"{info.get('triton', '?')} · commit {str(info.get('commit', '?'))[:12]}", ""]
    lines += [
        "Host CPU µs per call (thread CPU time; median of interleaved runs, min–max in brackets). `ours`: Triton path, GPU work "
        "stubbed; `above`: the same with the launchers' interface stubbed (inside = ours − above); "
        "ratios are against `raft`: the median over rounds of the two providers' times in the same round.",
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
    return "\n".join(lines) + "\n"


def _machine_info() -> Dict:
    from bench.machine import convgru_machine_info

    return convgru_machine_info(torch.device("cpu"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved runs per provider")
    parser.add_argument("--rows", default="all", help="comma-separated row kinds: cell,sep,loop,sequence")
    parser.add_argument("--out", default=None, help="directory for host_overhead-cpu.{json,md}")
    args = parser.parse_args(argv)
    if "triton" not in sys.modules:  # the fake target needs compiled-mode Triton, chosen at its import
        os.environ.pop("TRITON_INTERPRET", None)
    rows = ROWS if args.rows == "all" else [r for r in ROWS if r.kind in args.rows.split(",")]
    results = measure(rows, steps=args.steps, repeats=args.repeats)
    info = _machine_info()
    text = markdown(results, info)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_overhead-cpu.json"), "w") as f:
            json.dump({"machine_info": info, "steps": args.steps, "repeats": args.repeats, "results": results},
                      f, indent=1)
        with open(os.path.join(args.out, "host_overhead-cpu.md"), "w") as f:
            f.write("# Host overhead per step\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
