"""Tune the fused gate kernels for this GPU and write its tuning file.

    python -m convgru_triton.tune              # tune the current GPU, write the user file
    python -m convgru_triton.tune --dry-run    # show what would be tuned (works anywhere)
    convgru-triton-tune --dtypes float16 --max-size 2^24 --output my_gpu.json

For every kernel, dtype and state size of a ladder, each candidate launch
configuration is run once and its outputs are compared with the reference
(:mod:`convgru_triton.ops.gates.naive`); candidates that fail to compile, run out of
resources or give a wrong result are skipped, the others are timed with
``triton.testing.do_bench``. The fastest per (kernel, dtype, size) goes into
``<gpu>.json``, written atomically (temporary file + rename) to
``$CONVGRU_TRITON_TUNING_DIR`` or ``~/.cache/convgru_triton/tuning`` unless
``--output`` says where; :mod:`convgru_triton._tuning` reads it from there on.
Entries of an existing valid file for the same GPU and Triton version that this
run does not re-tune are kept.

Exit status: 0 on success, 2 when there is no CUDA GPU or Triton (a dry run
works without them), 1 when nothing could be tuned or the file not be written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _settings, _tuning
from ._tuning import KERNELS, LaunchConfig

DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_BLOCK_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)
DEFAULT_NUM_WARPS = (1, 2, 4, 8, 16)
DEFAULT_NUM_STAGES = (_tuning.DEFAULT_NUM_STAGES,)
DEFAULT_MIN_SIZE = 2**16
DEFAULT_MAX_SIZE = 2**28
# Elements per thread of a candidate: at least one, at most this many (more
# only spills registers for an elementwise kernel).
MAX_ELEMENTS_PER_THREAD = 64

# Elements of the state's size read + written per element by each kernel, as the
# tuner launches it (forward kernels saving for backward, one incoming gradient).
ELEMENTS_MOVED = {
    "gru_reset_after_fwd": 7 + 5,  # gx 3, gh 3, h | h', saved 4
    "gru_reset_after_bwd": 6 + 7,  # g, saved 4, h | d gx 3, d gh 3, d h
    "gru_reset_gate_fwd": 5 + 3,  # gx 2, gh 2, h | r, z, r*h
    "gru_update_fwd": 4 + 2,  # gx_n, gh_n, z, h | h', n
    "gru_update_bwd": 4 + 3,  # g, z, n, h | d a_z, d a_n, d h
    "gru_reset_gate_bwd": 4 + 2,  # d(r*h), r, h, d h | d a_r, d h
}

# Largest difference from the reference a candidate may have (the kernels compute
# in float32; the backward kernels read gates rounded to the storage dtype).
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 8e-2,
}

Timer = Callable[[Callable[[], Any]], float]


# ----------------------------------------------------------------------------
# Plan: sizes and candidate configurations
# ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"1048576"``, ``"2^20"``, ``"2**20"`` -> 1048576."""
    match = re.fullmatch(r"\s*2\s*(?:\^|\*\*)\s*(\d+)\s*", text)
    try:
        value = 2 ** int(match.group(1)) if match else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1048576 or 2^20)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def size_ladder(min_size: int, max_size: int, step: int = 2) -> List[int]:
    """Powers of two from ``min_size`` to ``max_size`` (rounded up to powers of
    two), ``step`` apart in the exponent; the largest is always included."""
    lo, hi = _tuning.size_class(min_size), _tuning.size_class(max_size)
    if hi < lo:
        raise ValueError(f"max size {max_size} is below min size {min_size}")
    exponents = list(range(lo, hi + 1, max(1, step)))
    if exponents[-1] != hi:
        exponents.append(hi)
    return [2**e for e in exponents]


def candidate_configs(
    block_sizes: Iterable[int] = DEFAULT_BLOCK_SIZES,
    num_warps: Iterable[int] = DEFAULT_NUM_WARPS,
    num_stages: Iterable[int] = DEFAULT_NUM_STAGES,
) -> List[LaunchConfig]:
    """Valid combinations with 1 to ``MAX_ELEMENTS_PER_THREAD`` elements per thread."""
    configs = []
    for block in block_sizes:
        for warps in num_warps:
            for stages in num_stages:
                cfg = _tuning.check_config_values(block, warps, stages)
                per_thread = block / (32 * warps)
                if 1 <= per_thread <= MAX_ELEMENTS_PER_THREAD:
                    configs.append(cfg)
    return configs


def _fmt_size(numel: int) -> str:
    return f"2^{numel.bit_length() - 1}" if numel & (numel - 1) == 0 else str(numel)


def _fmt_cfg(cfg: LaunchConfig) -> str:
    return f"{cfg.block_size}x{cfg.num_warps}w/{cfg.num_stages}s"


# ----------------------------------------------------------------------------
# Cases: inputs, one launch, the reference check
# ----------------------------------------------------------------------------


@dataclass
class Case:
    """One kernel on one state size and dtype: ``run()`` launches it once (with
    whatever configuration the registry gives, i.e. the forced one) and returns
    its outputs; ``reset()`` restores buffers a launch writes in place;
    ``check(outputs)`` is ``None`` or what differs from the reference."""

    kernel: str
    dtype: torch.dtype
    numel: int
    device: torch.device
    run: Callable[[], Any]
    check: Callable[[Any], Optional[str]]
    reset: Callable[[], None] = lambda: None


def state_shape(numel: int) -> Tuple[int, int, int]:
    """(N, H, S) of a state of ``numel`` elements: 2 samples of 32 channels when it divides."""
    for n, h in ((2, 32), (2, 8), (1, 4), (1, 1)):
        if numel % (n * h) == 0:
            return n, h, numel // (n * h)
    raise AssertionError("unreachable")


def _compare(pairs: Sequence[Tuple[str, torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> Optional[str]:
    """``None`` when every actual tensor is within ``tol * (1 + |expected|)`` of
    its expected one (``tol`` by dtype), else what is wrong with the first that is not."""
    tol = TOLERANCE.get(dtype, 1e-2)
    for name, actual, expected in pairs:
        actual = actual.to(expected.dtype)
        finite = torch.isfinite(actual)
        if not finite.all():
            return f"{name}: {int((~finite).sum())} elements not finite (not written?)"
        diff = (actual - expected).abs()
        if (diff > tol * (1 + expected.abs())).any():
            return f"{name}: differs from the reference by up to {diff.max().item():.3g}"
    return None


def build_case(
    kernel: str,
    dtype: torch.dtype,
    numel: int,
    device: torch.device,
    seed: int = 0,
    shape: Optional[Tuple[int, int, int]] = None,
) -> Case:
    """Inputs, launch and reference check of ``kernel`` (one of :data:`KERNELS`) on
    a state of ``numel`` elements (shaped (N, H, S) = ``shape`` or :func:`state_shape`);
    the reference is the kernel's ``*_ref`` twin in :mod:`convgru_triton.ops.gates.naive`,
    run in float32 (float64 for float64) on the same, storage-dtype inputs."""
    from .ops.gates import kernels as op
    from .ops.gates import naive

    n, hd, s = shape if shape is not None else state_shape(numel)
    if n * hd * s != numel:
        raise ValueError(f"shape {shape} does not have {numel} elements")
    gen = torch.Generator(device=device).manual_seed(seed)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, activation=None):
        t = torch.randn(*shape, generator=gen, device=device, dtype=ref_dtype)
        return (activation(t) if activation is not None else t).to(dtype)

    def state(activation=None):
        return rand(n, hd, s, activation=activation)

    def gates(slots, activation=None):
        return rand(n, slots * hd, s, activation=activation)

    def ref(*ts):
        return [t.to(ref_dtype) if t is not None else None for t in ts]

    def compare(*pairs):
        return _compare(pairs, dtype)

    def slot(t, i):
        return t[:, i * hd : (i + 1) * hd]

    if kernel == "gru_reset_after_fwd":
        gx, gh, h, bih, bhh = gates(3), gates(3), state(), rand(3 * hd), rand(3 * hd)
        h_ref, r_ref, z_ref, n_ref, hn_ref = naive.gru_reset_after_fwd_ref(*ref(gx, gh, h, bih, bhh))

        def run():
            return op._reset_after_fwd(gx, gh, h, bih, bhh, True)

        def check(out):
            h_new, (g, aux) = out
            return compare(("h'", h_new, h_ref), ("r", slot(g, 0), r_ref), ("z", slot(g, 1), z_ref),
                           ("n", slot(g, 2), n_ref), ("W_hn*h + b_hn", aux, hn_ref))

        return Case(kernel, dtype, numel, device, run, check)

    if kernel == "gru_reset_after_bwd":
        g, h, aux = state(), state(), state()
        saved_gates = torch.cat([state(torch.sigmoid), state(torch.sigmoid), state(torch.tanh)], dim=1)
        r, z, cand = (slot(saved_gates, i) for i in range(3))
        d_gx_ref, d_gh_ref, d_h_ref = naive.gru_reset_after_bwd_ref(*ref(g, r, z, cand, aux, h))

        def run():
            return op._reset_after_bwd(g, None, (saved_gates, aux), h, False)

        def check(out):
            d_gx, d_gh, d_h = out
            return compare(("d gates_x", d_gx, d_gx_ref), ("d gates_h", d_gh, d_gh_ref), ("d h", d_h, d_h_ref))

        return Case(kernel, dtype, numel, device, run, check)

    if kernel == "gru_reset_gate_fwd":
        gx, gh_rz, h, bih, bhh = gates(3), gates(2), state(), rand(3 * hd), rand(3 * hd)
        r_ref, z_ref, rh_ref = naive.gru_reset_gate_fwd_ref(*ref(gx, gh_rz, h, bih, bhh))

        def run():
            return op._reset_gate_fwd(gx, gh_rz, h, bih, bhh)

        def check(out):
            g, rh = out
            return compare(("r", slot(g, 0), r_ref), ("z", slot(g, 1), z_ref), ("r*h", rh, rh_ref))

        return Case(kernel, dtype, numel, device, run, check)

    if kernel == "gru_update_fwd":
        gx, gh_n, h, bih, bhh = gates(3), state(), state(), rand(3 * hd), rand(3 * hd)
        saved_gates = gates(3, torch.sigmoid)
        h_ref, n_ref = naive.gru_update_fwd_ref(*ref(gx, gh_n, slot(saved_gates, 1), h, bih, bhh))

        def run():
            return op._update_fwd(gx, gh_n, saved_gates, h, bih, bhh, True)

        def reset():
            slot(saved_gates, 2).fill_(float("nan"))

        def check(h_new):
            return compare(("h'", h_new, h_ref), ("n", slot(saved_gates, 2), n_ref))

        return Case(kernel, dtype, numel, device, run, check, reset)

    if kernel == "gru_update_bwd":
        g, h = state(), state()
        saved_gates = torch.cat([state(torch.sigmoid), state(torch.sigmoid), state(torch.tanh)], dim=1)
        d_az_ref, d_an_ref, d_h_ref = naive.gru_update_bwd_ref(*ref(g, slot(saved_gates, 1), slot(saved_gates, 2), h))
        d_gates = torch.empty(n, 3 * hd, s, device=device, dtype=dtype)

        def run():
            return op._update_bwd(g, None, saved_gates, h, d_gates)

        def reset():
            d_gates.fill_(float("nan"))

        def check(d_h):
            return compare(("d a_z", slot(d_gates, 1), d_az_ref), ("d a_n", slot(d_gates, 2), d_an_ref),
                           ("d h", d_h, d_h_ref))

        return Case(kernel, dtype, numel, device, run, check, reset)

    if kernel == "gru_reset_gate_bwd":
        d_rh, h, d_h_in = state(), state(), state()
        saved_gates = gates(3, torch.sigmoid)
        d_ar_ref, d_h_part = naive.gru_reset_gate_bwd_ref(*ref(d_rh, slot(saved_gates, 0), h))
        d_h_ref = d_h_in.to(ref_dtype) + d_h_part
        d_gates = torch.empty(n, 3 * hd, s, device=device, dtype=dtype)
        d_h = d_h_in.clone()  # the kernel adds to it in place

        def run():
            op._reset_gate_bwd(d_rh, saved_gates, h, d_gates, d_h)
            return d_h

        def reset():
            d_gates.fill_(float("nan"))
            d_h.copy_(d_h_in)

        def check(d_h_out):
            return compare(("d a_r", slot(d_gates, 0), d_ar_ref), ("d h", d_h_out, d_h_ref))

        return Case(kernel, dtype, numel, device, run, check, reset)

    raise ValueError(f"unknown kernel {kernel!r}; the tuned kernels are {KERNELS}")


# ----------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------


@dataclass
class Trial:
    """One candidate: its time in ms, or why it was skipped."""

    config: LaunchConfig
    ms: Optional[float] = None
    skipped: Optional[str] = None


@dataclass
class Result:
    kernel: str
    dtype: torch.dtype
    numel: int
    bytes_moved: int
    trials: List[Trial] = field(default_factory=list)

    @property
    def best(self) -> Optional[Trial]:
        timed = [t for t in self.trials if t.ms is not None]
        return min(timed, key=lambda t: t.ms) if timed else None

    def gb_per_s(self, trial: Optional[Trial]) -> Optional[float]:
        if trial is None or trial.ms is None or not self.bytes_moved:
            return None
        return self.bytes_moved / (trial.ms * 1e-3) / 1e9

    @property
    def default(self) -> Optional[Trial]:
        return next((t for t in self.trials if t.config == _tuning.default_config(self.dtype) and t.ms is not None), None)


@contextlib.contextmanager
def _poisoned_outputs():
    """Fill every buffer the launchers allocate with NaN first, so that an element
    a candidate does not write cannot pass the check with a stale correct value."""
    from .ops.gates import kernels as op

    allocate = getattr(op, "_empty", None)
    if allocate is None:
        yield
        return

    def poisoned(*args, **kwargs):
        t = allocate(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    op._empty = poisoned
    try:
        yield
    finally:
        op._empty = allocate


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def search(case: Case, candidates: Sequence[LaunchConfig], timer: Timer) -> List[Trial]:
    """Check, then time, every candidate on ``case``; a candidate that raises
    (compilation, resources, launch) or gives a wrong result is skipped with the reason."""
    trials = []
    for cfg in candidates:
        trial = Trial(cfg)
        trials.append(trial)
        try:
            with _tuning.forced_config(cfg):
                case.reset()
                with _poisoned_outputs():
                    out = case.run()
                _synchronize(case.device)
                problem = case.check(out)
        except Exception as exc:  # CompilationError, OutOfResources, CUDA errors, ...
            trial.skipped = f"failed: {_reason(exc)}"
            continue
        if problem:
            trial.skipped = f"wrong result: {problem}"
            continue
        try:
            with _tuning.forced_config(cfg):
                ms = float(timer(case.run))
        except Exception as exc:
            trial.skipped = f"failed while timing: {_reason(exc)}"
            continue
        if not (math.isfinite(ms) and ms > 0):
            trial.skipped = f"bad timing {ms!r}"
            continue
        trial.ms = ms
    return trials


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr)
            except ImportError:
                pass

    def step(self, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.done:>{len(str(self.total))}}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tune(
    kernels: Sequence[str],
    dtypes: Sequence[torch.dtype],
    sizes: Sequence[int],
    candidates: Sequence[LaunchConfig],
    device: torch.device,
    timer: Timer,
    progress: bool = True,
) -> List[Result]:
    """Search every (kernel, dtype, size); a size whose buffers do not fit is skipped."""
    results = []
    bar = _Progress(len(kernels) * len(dtypes) * len(sizes), progress)
    try:
        for dtype in dtypes:
            for kernel in kernels:
                for numel in sizes:
                    label = f"{kernel} {_tuning.dtype_name(dtype)} {_fmt_size(numel)}"
                    result = Result(kernel, dtype, numel, ELEMENTS_MOVED[kernel] * numel * _itemsize(dtype))
                    need, free = _memory_needed(kernel, dtype, numel), _memory_free(device)
                    if free is not None and need > free:
                        bar.step(f"{label}: skipped, needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                        continue
                    try:
                        case = build_case(kernel, dtype, numel, device)
                    except torch.cuda.OutOfMemoryError as exc:
                        bar.step(f"{label}: skipped, out of memory ({_reason(exc)})")
                        _free(device)
                        continue
                    result.trials = search(case, candidates, timer)
                    del case
                    _free(device)
                    results.append(result)
                    best = result.best
                    if best is None:
                        bar.step(f"{label}: no candidate ran ({result.trials[0].skipped if result.trials else 'none'})")
                    else:
                        ran = sum(t.ms is not None for t in result.trials)
                        bar.step(
                            f"{label}: {_fmt_cfg(best.config)} {best.ms * 1e3:.1f} us "
                            f"{result.gb_per_s(best):.0f} GB/s ({ran}/{len(result.trials)} candidates ran)"
                        )
    finally:
        bar.close()
    return results


def _memory_needed(kernel: str, dtype: torch.dtype, numel: int) -> int:
    """Rough upper bound of the memory a case takes: its buffers in the storage
    dtype, the reference outputs and the comparison's temporaries in float32."""
    return numel * (ELEMENTS_MOVED[kernel] * (_itemsize(dtype) + 4) + 4 * 4)


def _memory_free(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.mem_get_info(device)[0]
    except Exception:
        return None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# Output: table, document, atomic write
# ----------------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    head = ("kernel", "dtype", "size", "block", "warps", "stages", "time us", "GB/s", "default us", "speedup", "ran")
    rows = [head]
    for r in results:
        best, default = r.best, r.default
        ran = f"{sum(t.ms is not None for t in r.trials)}/{len(r.trials)}"
        if best is None:
            rows.append((r.kernel, _tuning.dtype_name(r.dtype), _fmt_size(r.numel)) + ("-",) * 7 + (ran,))
            continue
        rows.append((
            r.kernel, _tuning.dtype_name(r.dtype), _fmt_size(r.numel),
            str(best.config.block_size), str(best.config.num_warps), str(best.config.num_stages),
            f"{best.ms * 1e3:.2f}", f"{r.gb_per_s(best):.0f}",
            f"{default.ms * 1e3:.2f}" if default else "-",
            f"{default.ms / best.ms:.2f}x" if default else "-",
            ran,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def make_document(
    results: Sequence[Result], device_name: str, existing: Optional[dict] = None, triton_version: Optional[str] = None
) -> dict:
    """The tuning file for ``results``; entries of ``existing`` (a valid file for the
    same GPU and Triton version) that this run did not tune are kept."""
    key = _tuning.normalize_device_name(device_name)
    version = triton_version or _tuning.triton_version() or "unknown"
    entries: Dict[Tuple[str, str, int], dict] = {}
    carried: Dict[str, Any] = {}
    if existing is not None:
        try:
            _tuning.parse_document(existing, key)
            _tuning.check_triton_version(existing["triton_version"], version)
            _tuning.parse_fused_sections(existing)
            for e in existing["entries"]:
                entries[(e["kernel"], e["dtype"], _tuning.size_class(e["numel"]))] = dict(e)
            # The fused step's entries (another mode of the tuner) are kept as they are.
            carried = {k: existing[k] for k in ("step_paths", "fused_tiles") if k in existing}
        except (_tuning.TuningFileError, KeyError):
            entries, carried = {}, {}
    for r in results:
        best = r.best
        if best is None:
            continue
        entry = {
            "kernel": r.kernel,
            "dtype": _tuning.dtype_name(r.dtype),
            "numel": r.numel,
            "block_size": best.config.block_size,
            "num_warps": best.config.num_warps,
            "num_stages": best.config.num_stages,
            "time_ms": round(best.ms, 6),
        }
        gbps = r.gb_per_s(best)
        if gbps is not None:
            entry["gb_per_s"] = round(gbps, 1)
        entries[(r.kernel, entry["dtype"], _tuning.size_class(r.numel))] = entry
    order = {k: i for i, k in enumerate(KERNELS)}
    doc = {
        "schema": _tuning.SCHEMA_VERSION,
        "device": key,
        "device_name": device_name,
        "triton_version": version,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "tool": "python -m convgru_triton.tune",
        "entries": [entries[k] for k in sorted(entries, key=lambda k: (order.get(k[0], 99), k[1], k[2]))],
        **carried,
    }
    _tuning.parse_document(doc, key)  # what we write must be what we read
    return doc


def write_atomic(path: str, doc: dict) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file in the same folder
    and a rename: readers see the old file or the new one, never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_existing(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------
# The fused step: fused kernels or cuDNN + gate kernels, and their tiles
# ----------------------------------------------------------------------------

#: RAFT's update step: N=6 on the 1/8 map of a 368x496 crop, hidden 128.
RAFT_STEP = (6, 128, 46, 62)
#: RAFT's ConvGRU (3x3) and SepConvGRU ((1, 5) then (5, 1)).
DEFAULT_STEP_KERNELS = ((3, 3), (1, 5), (5, 1))
#: The sequence workloads of bench/workloads.py (FULL_WORKLOADS): (N, hidden, Y, X, (kh, kw)).
SEQUENCE_STEPS = (
    (4, 64, 96, 96, (3, 3)), (4, 192, 32, 32, (3, 3)), (4, 192, 16, 16, (3, 3)),  # nowcast
    (16, 128, 16, 16, (5, 5)),  # mmnist
    (16, 384, 8, 8, (3, 3)),  # dgmr
)
# Tile candidates; the tile sets the wave count. RAFT's step in channels_last,
# M = 6*46*62 = 17,112 pixels, hidden 128, on 132 SMs: 64x32 tiles make
# 268 x 4 = 1072 programs, 2.7 waves at 3 programs per SM (168 registers x 128
# threads each, sm_90, Triton 3.9); 64x64 or 128x32 at 8 warps make 536, 4.06
# waves at one per SM (162-175 registers x 256 threads), 2.03 at two. Which
# wins depends on the occupancy the GPU reaches, so it is measured, not
# assumed; a persistent grid and split-K are not built.
DEFAULT_BLOCK_M = (64, 128)
DEFAULT_BLOCK_N = (32, 64)
DEFAULT_FUSED_WARPS = (4, 8)
DEFAULT_FUSED_STAGES = (2, 3, 4)
#: Largest difference of a step's outputs (forward: h', r, z, n, aux; backward:
#: d gates_x, d gates_h, dL/dh) from the float64 reference. float32: the cuDNN
#: path may use TF32 (torch's default for convolutions), K = 128 * 9 products
#: (3 * 128 * 9 in the backward's dgrad); a wrong tile is off by O(1) or NaN.
STEP_TOLERANCE = {torch.float64: 1e-8, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@dataclass(frozen=True)
class StepShape:
    """One step to tune: state (batch, hidden, height, width), kernel, formulation, dtype, layout."""

    batch: int
    hidden: int
    height: int
    width: int
    kernel_size: Tuple[int, int]
    reset_after: bool
    dtype: torch.dtype
    channels_last: bool

    @property
    def numel(self) -> int:
        return self.batch * self.hidden * self.height * self.width

    def __str__(self) -> str:
        return (f"N={self.batch} H={self.hidden} {self.height}x{self.width} {self.kernel_size[0]}x{self.kernel_size[1]} "
                f"{'reset_after' if self.reset_after else 'reset_before'} {_tuning.dtype_name(self.dtype)} "
                f"{'cl' if self.channels_last else 'nchw'}")


#: The most float32 accumulator values a thread of a candidate holds:
#: accumulators x BLOCK_M x BLOCK_N / (32 x num_warps), with three accumulators
#: in the forward (reset_after's kernel) and one in the backward (the dgrad
#: kernels: :data:`ACCUMULATORS`).
#: Compiled for sm_90 (bfloat16, RAFT's hidden 128 on 46x62, 3x3, NCHW, Triton
#: 3.9; registers did not depend on num_stages 2-4): 48 values took 80-175
#: registers per thread (64x32 at 8 warps 80, 64x32 at 4 warps 168, 64x64 at 8
#: warps 162, 128x32 at 8 warps 175); 96 took 255 with no room left (128x32 at
#: 4 warps) or spilled (64x64 at 4 warps, 128x64 at 8 warps: 112-byte stack
#: frames), 192 spilled 1992 bytes (128x64 at 4 warps).
MAX_ACCUMULATOR_VALUES_PER_THREAD = 48
#: float32 accumulators per program of the fused kernels of a direction (the most of any of its kernels).
ACCUMULATORS = {"fwd": 3, "bwd": 1}
#: A representative kernel per direction, whose default tile leads the candidates
#: (the forward's reset_after kernel defaults to 8 warps, the others to 4).
_DEFAULT_TILE_KERNEL = {"fwd": "conv_rz_fwd", "bwd": "conv_dgrad_bwd"}


def fused_tile_candidates(dtype: torch.dtype, block_m: Sequence[int] = DEFAULT_BLOCK_M,
                          block_n: Sequence[int] = DEFAULT_BLOCK_N, num_warps: Sequence[int] = DEFAULT_FUSED_WARPS,
                          num_stages: Sequence[int] = DEFAULT_FUSED_STAGES,
                          dropped: Optional[List[_tuning.TileConfig]] = None,
                          direction: str = "fwd") -> List[_tuning.TileConfig]:
    """The tile candidates of ``direction``'s fused kernels: the default tile
    first, then every valid combination (BLOCK_K the default's: 64, 32 in
    float32) within :data:`MAX_ACCUMULATOR_VALUES_PER_THREAD` for the
    direction's :data:`ACCUMULATORS` (the others spill or have no register
    left at sm_90); those beyond it are appended to ``dropped`` when given.
    Raises TuningFileError on a bad value, ValueError on a bad direction."""
    if direction not in ACCUMULATORS:
        raise ValueError(f"direction must be one of {tuple(ACCUMULATORS)}, got {direction!r}")
    default = _tuning.default_tile(_DEFAULT_TILE_KERNEL[direction], dtype)
    block_k, accumulators = default.block_k, ACCUMULATORS[direction]
    out = [default]
    for m in block_m:
        for n in block_n:
            for w in num_warps:
                for st in num_stages:
                    tile = _tuning.check_tile_values(m, n, block_k, w, st)
                    if accumulators * m * n // (32 * w) > MAX_ACCUMULATOR_VALUES_PER_THREAD:
                        if dropped is not None and tile not in dropped:
                            dropped.append(tile)
                    elif tile not in out:
                        out.append(tile)
    return out


@contextlib.contextmanager
def _fused_setting(value: str):
    """The ``fused_step`` setting at ``value`` inside, the caller's after
    (nothing to change, and nothing done, where it is ``value`` already)."""
    if _settings.environment_error() is None and _settings.peek_settings().fused_step == value:
        yield
        return
    with _settings.override(fused_step=value):
        yield


class StepCase:
    """Inputs, NaN-poisoned output buffers and the float64 reference of one
    step in ``direction``, run through the operator's own hook on either path
    (``run(fused)``), ``check()`` against the reference:

    * ``"fwd"``: the forward step (``conv_gru._step_forward``'s contract;
      the fused path is ``fused_step.forward_step``): writes h', the saved
      gates (r, z, n) and aux.
    * ``"bwd"``: a middle step of a sequence's backward through
      ``conv_gru._step_backward`` (the fused path: ``fused_step.backward_step``,
      the dgrad kernels with the gate backward in their epilogue; the other:
      the gate kernels and cuDNN's dgrad). Its inputs are what a forward saved
      (the float64 reference step's gates and aux, rounded to the dtype), the
      state h and dL/dh' as the output's gradient plus the one carried from the
      next step; it writes d gates_x, d gates_h (reset_after) and dL/dh. The
      weight gradient is not part of it: the sequence operator takes it in one
      batched cuDNN call over all steps, whichever path the steps took."""

    def __init__(self, shape: StepShape, device: torch.device, direction: str = "fwd"):
        if direction not in _tuning.DIRECTIONS:  # before the imports: they load Triton
            raise ValueError(f"direction must be one of {_tuning.DIRECTIONS}, got {direction!r}")
        from ._conv import ConvSpec
        from .ops.fused_step import kernels as fused_step
        from .ops.fused_step import naive as fused_naive
        from .ops.sequence import op as conv_gru

        self.shape, self.device, self.direction = shape, device, direction
        n, hid, y, x, kk = shape.batch, shape.hidden, shape.height, shape.width, shape.kernel_size
        gen = torch.Generator().manual_seed(0)

        def rand(*size, scale):
            return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(device)

        fmt = torch.channels_last if shape.channels_last else torch.contiguous_format
        gx64, h64 = rand(n, 3 * hid, y, x, scale=0.5), rand(n, hid, y, x, scale=0.5)
        w64 = rand(3 * hid, hid, *kk, scale=(hid * kk[0] * kk[1]) ** -0.5)
        b_ih64, b_hh64 = rand(3 * hid, scale=0.1), rand(3 * hid, scale=0.1)
        d = shape.dtype
        self.gx, self.h = gx64.to(d).contiguous(memory_format=fmt), h64.to(d).contiguous(memory_format=fmt)
        self.w, self.b_ih, self.b_hh = w64.to(d), b_ih64.to(d), b_hh64.to(d)
        self.spec = ConvSpec(tuple(kk), (1, 1))
        # The references start from the dtype-rounded inputs, in float64.
        rounded = [t.to(torch.float64) for t in (self.gx, self.h, self.w, self.b_ih, self.b_hh)]
        step = fused_naive.reference_step(shape.reset_after, self.spec, *rounded)
        # Made under the fused_step setting "1": a plan that may fuse (and the
        # operator's fused_step module loaded) whatever the caller's setting says.
        with _fused_setting("1"):
            p = conv_gru.plan(self.spec, shape.reset_after, False, True)
        self.fused_plan, self.plan = p, p._replace(fused_step=False)  # the latter: cuDNN + the gate kernels
        self.weights = conv_gru._hidden_weights(self.plan, self.w)
        self._fused = fused_step
        cl = shape.channels_last
        if direction == "fwd":
            self.expected = step
            self.names = ("h'", "gates", "aux")
            self.state = conv_gru._empty_frame(self.h, hid, cl)
            self.gates = conv_gru._empty_frame(self.h, 3 * hid, cl)
            self.aux = conv_gru._empty_frame(self.h, hid, cl)
            self.math = self.plan.math.bind(self.state, self.b_ih, self.b_hh, (self.gx, self.h))
            self._step = conv_gru._step_forward
            return
        # dL/dh': the output's gradient and the one carried from the next step (the kernels add them).
        g64, g2_64 = rand(n, hid, y, x, scale=0.5), rand(n, hid, y, x, scale=0.5)
        self.grad, self.grad2 = (t.to(d).contiguous(memory_format=fmt) for t in (g64, g2_64))
        self.gates, self.aux = (t.to(d).contiguous(memory_format=fmt) for t in step[1:])
        grad_sum = self.grad.to(torch.float64) + self.grad2.to(torch.float64)
        d_gx, d_gh, d_h = fused_naive.reference_backward_step(shape.reset_after, self.spec, grad_sum, *rounded)
        self.d_gx = conv_gru._empty_frame(self.h, 3 * hid, cl)
        self.d_h = conv_gru._empty_frame(self.h, hid, cl)
        if shape.reset_after:
            self.d_gh, self.d_rz, self.d_n = conv_gru._empty_frame(self.h, 3 * hid, cl), None, None
            self.expected, self.names = (d_gx, d_gh, d_h), ("d gates_x", "d gates_h", "d h")
        else:
            self.d_gh, (self.d_rz, self.d_n) = None, self.d_gx.split_with_sizes((2 * hid, hid), 1)
            self.expected, self.names = (d_gx, d_h), ("d gates_x", "d h")
        # Bound as conv_gru._backward binds it: the state-gradient frame and the call's other tensors.
        self.math = self.plan.math.bind(self.d_h, None, None, (self.grad, self.grad2, self.h, self.gates, self.aux))
        self._step = conv_gru._step_backward

    def outputs(self) -> Tuple[torch.Tensor, ...]:
        if self.direction == "fwd":
            return self.state, self.gates, self.aux
        return (self.d_gx, self.d_gh, self.d_h) if self.shape.reset_after else (self.d_gx, self.d_h)

    def poison(self) -> None:
        for t in self.outputs():
            t.fill_(float("nan"))

    def run(self, fused: bool) -> None:
        if self.direction == "bwd":
            # The hook itself on either plan; a fused plan whose step declines
            # falls back to cuDNN there, which the tuner's check run catches
            # (no fused launch recorded).
            if fused:
                with _fused_setting("1"):
                    self._backward(self.fused_plan)
            else:
                self._backward(self.plan)
            return
        if fused:
            with _fused_setting("1"):
                ran = self._fused.forward_step(self.shape.reset_after, self.spec, self.gx, self.h, self.weights,
                                               self.b_ih, self.b_hh, self.state, self.gates, self.aux, True)
            if not ran:
                raise RuntimeError("the fused step declined this case (fused_step.supports)")
            return
        self._step(self.plan, self.math, self.gx, self.h, self.weights, self.b_ih, self.b_hh, self.state,
                   self.gates, self.aux, True)

    def _backward(self, plan) -> None:
        # with_weights=False: the sequence operator's per-step call (see the class docstring).
        self._step(plan, self.math, self.grad, self.grad2, self.h, self.weights, self.gates, self.aux, self.d_gx,
                   self.d_gh, self.d_rz, self.d_n, self.d_h, False)

    def check(self) -> Optional[str]:
        """``None`` when every output is within :data:`STEP_TOLERANCE` of the reference, else what is off."""
        tol = STEP_TOLERANCE.get(self.shape.dtype, 1e-2)
        for name, got, want in zip(self.names, self.outputs(), self.expected):
            diff = (got.to(torch.float64) - want).abs()
            if not torch.isfinite(diff).all():
                return f"{name}: {int((~torch.isfinite(diff)).sum())} elements not written or not finite"
            worst = float(diff.max()) if diff.numel() else 0.0
            if worst > tol:
                return f"{name}: max abs difference {worst:.3g} > {tol:g}"
        return None


@dataclass
class StepResult:
    """One step shape: the cuDNN path's trial (config ``None``) and each tile's."""

    shape: StepShape
    direction: str
    cudnn: Trial
    fused: List[Trial] = field(default_factory=list)

    @property
    def best_fused(self) -> Optional[Trial]:
        timed = [t for t in self.fused if t.ms is not None]
        return min(timed, key=lambda t: t.ms) if timed else None

    @property
    def path(self) -> str:
        """The faster path; cuDNN when the fused step did not run (or the cuDNN path did not either)."""
        best = self.best_fused
        if best is not None and (self.cudnn.ms is None or best.ms < self.cudnn.ms):
            return "fused"
        return "cudnn"


def _spills(compiled: Sequence[Any]) -> Optional[str]:
    """Why a tile is dropped for what the compiler made of it: spills (n_spills),
    read from the kernels that ran (nothing to read under the interpreter)."""
    for k in compiled:
        spills = getattr(k, "n_spills", None)
        if spills:
            name = getattr(getattr(k, "src", None), "name", None) or getattr(k, "name", "kernel")
            return f"{name} spills {spills} registers ({getattr(k, 'n_regs', '?')} registers per thread)"
    return None


def _trial(case: StepCase, fused: bool, tile: Optional[_tuning.TileConfig], timer: Timer) -> Trial:
    """Check (into NaN-poisoned buffers), then time, one path of ``case``."""
    from .ops.fused_step import kernels as fused_step

    trial = Trial(tile)  # type: ignore[arg-type]
    try:
        with _tuning.forced_tile(tile):
            case.poison()
            fused_step._COMPILED = compiled = []
            try:
                case.run(fused)
            finally:
                fused_step._COMPILED = None
            if fused and not compiled:
                # The hook fell back to cuDNN + the gate kernels: timing it would label that path "fused".
                raise RuntimeError("the fused step declined this case: no fused kernel launched")
            _synchronize(case.device)
            problem = case.check()
    except Exception as exc:  # CompilationError, OutOfResources, CUDA errors, a declined case
        trial.skipped = f"failed: {_reason(exc)}"
        return trial
    if problem:
        trial.skipped = f"wrong result: {problem}"
        return trial
    spills = _spills(compiled) if fused else None
    if spills:
        trial.skipped = spills
        return trial
    try:
        # The setting held around the timing, so that the timed calls do not change it.
        with _tuning.forced_tile(tile), (_fused_setting("1") if fused else contextlib.nullcontext()):
            ms = float(timer(lambda: case.run(fused)))
    except Exception as exc:
        trial.skipped = f"failed while timing: {_reason(exc)}"
        return trial
    if not (math.isfinite(ms) and ms > 0):
        trial.skipped = f"bad timing {ms!r}"
    else:
        trial.ms = ms
    return trial


def tune_fused_step(shapes: Sequence[StepShape],
                    tiles_of: Callable[[torch.dtype, str], Sequence[_tuning.TileConfig]],
                    device: torch.device, timer: Timer, progress: bool = True,
                    directions: Sequence[str] = _tuning.DIRECTIONS) -> List[StepResult]:
    """For each direction (``"fwd"``, ``"bwd"``: :class:`StepCase`) and shape:
    the whole step on the cuDNN + gate kernel path, then on the fused path with
    every tile of ``tiles_of(dtype, direction)``; each run's outputs are
    checked against the float64 reference before it is timed (a wrong,
    failing, declined or spilling tile is skipped with the reason)."""
    for direction in directions:
        if direction not in _tuning.DIRECTIONS:
            raise ValueError(f"direction must be one of {_tuning.DIRECTIONS}, got {direction!r}")
    results = []
    bar = _Progress(len(shapes) * len(directions), progress)
    try:
        for direction in directions:
            for shape in shapes:
                label = f"{direction} {shape}"
                try:
                    case = StepCase(shape, device, direction)
                except torch.cuda.OutOfMemoryError as exc:
                    bar.step(f"{label}: skipped, out of memory ({_reason(exc)})")
                    _free(device)
                    continue
                result = StepResult(shape, direction, _trial(case, False, None, timer))
                result.fused = [_trial(case, True, tile, timer) for tile in tiles_of(shape.dtype, direction)]
                results.append(result)
                del case
                _free(device)
                best = result.best_fused
                cudnn = f"{result.cudnn.ms * 1e3:.1f} us" if result.cudnn.ms else result.cudnn.skipped
                fused = f"{best.ms * 1e3:.1f} us ({best.config})" if best else "no tile ran"
                bar.step(f"{label}: cuDNN + gates {cudnn}; fused {fused} -> {result.path}")
    finally:
        bar.close()
    return results


def format_step_table(results: Sequence[StepResult]) -> str:
    """One row per step and direction: both paths' times, the best tile, how
    many tiles ran, the faster path ("-": a path that did not run)."""
    head = ("direction", "step", "cuDNN+gates us", "fused us", "tile", "ran", "choice")
    rows = [head]
    for r in results:
        best = r.best_fused
        rows.append((r.direction, str(r.shape), f"{r.cudnn.ms * 1e3:.2f}" if r.cudnn.ms is not None else "-",
                     f"{best.ms * 1e3:.2f}" if best else "-", str(best.config) if best else "-",
                     f"{sum(t.ms is not None for t in r.fused)}/{len(r.fused)}", r.path))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tile_kernels(reset_after: bool, direction: str) -> Tuple[str, ...]:
    """The fused kernels (registry names) a step of this formulation and direction launches."""
    if direction == "bwd":
        return ("conv_dgrad_bwd",) if reset_after else ("conv_dgrad_reset_gate_bwd", "conv_dgrad_bwd")
    return ("conv_reset_after_fwd",) if reset_after else ("conv_rz_fwd", "conv_n_fwd")


def fused_sections(results: Sequence[StepResult]) -> Tuple[List[dict], List[dict]]:
    """The ``step_paths`` and ``fused_tiles`` entries for ``results``, each
    direction's under its own ``direction`` (paths) and kernels (tiles: the
    forward's conv_*_fwd, the backward's conv_dgrad_*). Shapes that share a
    registry key (two layouts, or for a tile two kernel sizes, and for
    conv_dgrad_bwd both formulations; one size class) are decided together:
    the path by their summed times, the tile by its summed time relative to
    each shape's best (tiles that ran on all of them)."""
    paths: Dict[tuple, List[StepResult]] = {}
    tiles: Dict[tuple, List[StepResult]] = {}
    for r in results:
        s, cls = r.shape, _tuning.size_class(r.shape.numel)
        paths.setdefault((_tuning.dtype_name(s.dtype), s.reset_after, r.direction, tuple(s.kernel_size), cls),
                         []).append(r)
        if r.best_fused is not None:
            for kernel in _tile_kernels(s.reset_after, r.direction):
                tiles.setdefault((kernel, _tuning.dtype_name(s.dtype), cls), []).append(r)
    path_entries = []
    for (dtype, reset_after, direction, ks, cls), group in paths.items():
        both = [r for r in group if r.cudnn.ms is not None and r.best_fused is not None]
        if both:
            fused_ms = sum(r.best_fused.ms for r in both)
            cudnn_ms = sum(r.cudnn.ms for r in both)
            path = "fused" if fused_ms < cudnn_ms else "cudnn"
        elif any(r.cudnn.ms is not None for r in group):
            path, fused_ms, cudnn_ms = "cudnn", None, sum(r.cudnn.ms for r in group if r.cudnn.ms is not None)
        else:
            continue  # neither path ran: nothing measured to write
        entry = {"dtype": dtype, "reset_after": reset_after, "direction": direction, "kernel_size": list(ks),
                 "numel": max(r.shape.numel for r in group), "path": path, "cudnn_ms": round(cudnn_ms, 6)}
        if fused_ms is not None:
            entry["fused_ms"] = round(fused_ms, 6)
        path_entries.append(entry)
    tile_entries = []
    for (kernel, dtype, cls), group in tiles.items():
        scores: Dict[_tuning.TileConfig, float] = {}
        for tile in {t.config for r in group for t in r.fused if t.ms is not None}:
            times = [next((t.ms for t in r.fused if t.config == tile and t.ms is not None), None) for r in group]
            if all(ms is not None for ms in times):
                scores[tile] = sum(ms / r.best_fused.ms for ms, r in zip(times, group))
        if not scores:
            continue
        tile = min(scores, key=lambda t: (scores[t], str(t)))
        tile_entries.append({"kernel": kernel, "dtype": dtype, "numel": max(r.shape.numel for r in group),
                             "block_m": tile.block_m, "block_n": tile.block_n, "block_k": tile.block_k,
                             "num_warps": tile.num_warps, "num_stages": tile.num_stages,
                             "time_ms": round(min(t.ms for r in group for t in r.fused
                                                  if t.config == tile and t.ms is not None), 6)})
    return path_entries, tile_entries


def merge_fused_sections(doc: dict, results: Sequence[StepResult], existing: Optional[dict] = None) -> dict:
    """``doc`` (a tuning file) with the fused-step entries of ``results`` added;
    those of ``existing`` (a valid file for the same GPU and Triton version)
    that this run did not re-tune are kept."""
    new_paths, new_tiles = fused_sections(results)

    def path_key(e):
        return (e["dtype"], e["reset_after"], e["direction"], tuple(e.get("kernel_size") or ()),
                _tuning.size_class(e["numel"]))

    def tile_key(e):
        return (e["kernel"], e["dtype"], _tuning.size_class(e["numel"]))

    old_paths, old_tiles = [], []
    if existing is not None:
        try:
            _tuning.parse_document(existing, doc["device"])
            _tuning.parse_fused_sections(existing)
            _tuning.check_triton_version(existing["triton_version"], doc["triton_version"])
            old_paths, old_tiles = list(existing.get("step_paths", [])), list(existing.get("fused_tiles", []))
        except (_tuning.TuningFileError, KeyError):
            pass
    paths = {path_key(e): e for e in old_paths + list(doc.get("step_paths", [])) + new_paths}
    tiles = {tile_key(e): e for e in old_tiles + list(doc.get("fused_tiles", [])) + new_tiles}
    doc = dict(doc)
    doc["step_paths"] = [paths[k] for k in sorted(paths, key=str)]
    doc["fused_tiles"] = [tiles[k] for k in sorted(tiles, key=str)]
    _tuning.parse_fused_sections(doc)  # what we write must be what we read
    return doc


def parse_step_shape(text: str) -> Tuple[int, int, int, int, Optional[Tuple[int, int]]]:
    """``"6,128,46x62"`` or ``"6,128,46x62,3x3"`` -> (N, hidden, Y, X, kernel or None)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        n, hid = int(parts[0]), int(parts[1])
        y, x = (int(v) for v in parts[2].lower().split("x"))
        ks = tuple(int(v) for v in parts[3].lower().split("x")) if len(parts) == 4 else None
        if min(n, hid, y, x) <= 0 or (ks is not None and (len(ks) != 2 or min(ks) <= 0)):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a step shape is N,hidden,YxX or N,hidden,YxX,KHxKW with positive integers, got {text!r}") from None
    return n, hid, y, x, ks  # type: ignore[return-value]


def _kernel_size(text: str) -> Tuple[int, int]:
    try:
        kh, kw = (int(v) for v in text.lower().split("x"))
        if kh <= 0 or kw <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"a kernel size is KHxKW, got {text!r}") from None
    return kh, kw


def step_shapes(shapes: Sequence[tuple], kernel_sizes: Sequence[Tuple[int, int]], dtypes: Sequence[torch.dtype],
                formulations: Sequence[bool], layouts: Sequence[bool]) -> List[StepShape]:
    out = []
    for n, hid, y, x, ks in shapes:
        for kk in ([ks] if ks is not None else kernel_sizes):
            for dtype in dtypes:
                for reset_after in formulations:
                    for cl in layouts:
                        out.append(StepShape(n, hid, y, x, tuple(kk), reset_after, dtype, cl))
    return out


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _list(kind: Callable[[str], Any], choices: Optional[Sequence[str]] = None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if choices is not None:
            bad = [t for t in items if t not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)} (choose from {', '.join(choices)})")
        try:
            return [kind(t) for t in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convgru_triton.tune",
        description="Tune the block size, warps and stages of the fused ConvGRU gate kernels on this GPU "
        "and write its tuning file, which the package then uses.",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be tuned and where it would be written")
    p.add_argument("--output", "-o", help="file (or folder) to write; default: "
                   f"${_tuning.ENV_DIR} or {_tuning.user_cache_dir()}, file <gpu>.json")
    p.add_argument("--device", default=None, help="CUDA device to tune (default: the current one)")
    p.add_argument("--kernels", type=_list(str, KERNELS), default=list(KERNELS), help="comma-separated (default: all)")
    p.add_argument("--dtypes", type=_list(str, list(_tuning.DTYPES)), default=None,
                   help="comma-separated (default: float32,float16,bfloat16; with --fused-step bfloat16)")
    p.add_argument("--min-size", type=parse_size, default=DEFAULT_MIN_SIZE,
                   help="smallest state, elements (default 2^16)")
    p.add_argument("--max-size", type=parse_size, default=DEFAULT_MAX_SIZE,
                   help="largest state, elements (default 2^28)")
    p.add_argument("--size-step", type=int, default=2,
                   help="exponent step of the size ladder (default 2: 2^16, 2^18, ...)")
    p.add_argument("--block-sizes", type=_list(int), default=list(DEFAULT_BLOCK_SIZES))
    p.add_argument("--num-warps", type=_list(int), default=list(DEFAULT_NUM_WARPS))
    p.add_argument("--num-stages", type=_list(int), default=list(DEFAULT_NUM_STAGES))
    p.add_argument("--warmup", type=float, default=10.0, help="do_bench warm-up per candidate, ms (default 10)")
    p.add_argument("--rep", type=float, default=50.0, help="do_bench measuring time per candidate, ms (default 50)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    f = p.add_argument_group("the fused step (--fused-step): fused kernels or cuDNN + gate kernels, and their tiles")
    f.add_argument("--fused-step", action="store_true",
                   help="time whole steps (forward and/or backward: --directions) on both paths and over the "
                   "fused kernels' tiles; write the choice (step_paths) and the best tile (fused_tiles) instead of "
                   "tuning the gate kernels")
    f.add_argument("--shapes", type=parse_step_shape, nargs="+", default=None,
                   help="N,hidden,YxX[,KHxKW] ... (default: RAFT's 6,128,46x62)")
    f.add_argument("--sequence-shapes", action="store_true",
                   help="also the sequence workloads' steps of bench/workloads.py (nowcast, mmnist, dgmr)")
    f.add_argument("--kernel-sizes", type=_list(_kernel_size), default=list(DEFAULT_STEP_KERNELS),
                   help="for shapes without one (default: 3x3,1x5,5x1)")
    f.add_argument("--directions", type=_list(str, list(_tuning.DIRECTIONS)), default=list(_tuning.DIRECTIONS),
                   help="fwd (the forward step) and/or bwd (the backward step's data gradient and gate backward; "
                        "the weight gradient stays cuDNN), comma-separated (default: both)")
    f.add_argument("--formulations", type=_list(str, ["reset_before", "reset_after"]),
                   default=["reset_before", "reset_after"], help="comma-separated (default: both)")
    f.add_argument("--layouts", type=_list(str, ["cl", "nchw"]), default=["cl"],
                   help="cl (channels_last, the package's layout inside) and/or nchw (default: cl)")
    f.add_argument("--block-m", type=_list(int), default=list(DEFAULT_BLOCK_M),
                   help="output pixels per program, comma-separated (default: 64,128)")
    f.add_argument("--block-n", type=_list(int), default=list(DEFAULT_BLOCK_N),
                   help="hidden channels per program, comma-separated (default: 32,64)")
    f.add_argument("--fused-warps", type=_list(int), default=list(DEFAULT_FUSED_WARPS),
                   help="num_warps of the fused kernels, comma-separated (default: 4,8); tiles over "
                        f"{MAX_ACCUMULATOR_VALUES_PER_THREAD} accumulator values per thread are not timed")
    f.add_argument("--fused-stages", type=_list(int), default=list(DEFAULT_FUSED_STAGES),
                   help="num_stages (software pipelining depth), comma-separated (default: 2,3,4)")
    return p


def _default_output(device_key: str) -> str:
    return os.path.join(_tuning.user_tuning_dir(), device_key + ".json")


def _registry_reads(path: str, device_key: str) -> bool:
    wanted = os.path.abspath(path)
    return any(os.path.abspath(p) == wanted for _, p in _tuning.source_paths(device_key))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        sizes = size_ladder(args.min_size, args.max_size, args.size_step)
        candidates = candidate_configs(args.block_sizes, args.num_warps, args.num_stages)
    except (ValueError, _tuning.TuningFileError) as exc:
        parser.error(str(exc))
    if not candidates:
        parser.error("no valid candidate: every block size / warps pair gives less than 1 "
                     f"or more than {MAX_ELEMENTS_PER_THREAD} elements per thread")
    if args.dtypes is None:
        args.dtypes = ["bfloat16"] if args.fused_step else list(DEFAULT_DTYPES)
    dtypes = [_tuning.DTYPES[d] for d in args.dtypes]
    shapes: List[StepShape] = []
    directions = [d for d in _tuning.DIRECTIONS if d in args.directions]  # forward first, each once
    if args.fused_step:
        try:
            for direction in directions:
                acc = ACCUMULATORS[direction]
                for d in dtypes:
                    dropped: List[_tuning.TileConfig] = []
                    kept = fused_tile_candidates(d, args.block_m, args.block_n, args.fused_warps, args.fused_stages,
                                                 dropped, direction)
                    if dropped:
                        # Said, not silent: a tile asked for and not timed.
                        print(f"not timing {len(dropped)} tile(s) in {_tuning.dtype_name(d)} for the {direction} "
                              f"step, with more than {MAX_ACCUMULATOR_VALUES_PER_THREAD} float32 accumulator values "
                              f"per thread (they spill or leave no register at sm_90): "
                              f"{'; '.join(str(t) for t in dropped)}", file=sys.stderr)
                    if len(kept) == 1 and dropped:
                        parser.error(f"every tile asked for by --block-m/--block-n/--fused-warps holds more than "
                                     f"{MAX_ACCUMULATOR_VALUES_PER_THREAD} accumulator values per thread in the "
                                     f"{direction} step ({acc} x BLOCK_M x BLOCK_N / (32 x num_warps)); only the "
                                     f"default {kept[0]} is left")
        except _tuning.TuningFileError as exc:
            parser.error(f"a tile candidate: {exc}")
        base = list(args.shapes or [RAFT_STEP + (None,)])
        if args.sequence_shapes:
            base += list(SEQUENCE_STEPS)
        shapes = step_shapes(base, args.kernel_sizes, dtypes, [f == "reset_after" for f in args.formulations],
                             [layout == "cl" for layout in args.layouts])
    try:
        device = torch.device(args.device or "cuda")
    except RuntimeError:
        device = None
    if device is None or device.type != "cuda":
        parser.error(f"--device must be a CUDA device such as cuda:1, got {args.device!r}")
    cuda = torch.cuda.is_available()

    if args.dry_run:
        if cuda:
            name = torch.cuda.get_device_name(device)
            key = _tuning.normalize_device_name(name)
            where = f"GPU: {name}"
        else:
            key = "<gpu>"
            where = "GPU: none visible here (a real run needs one; this is the plan only)"
        output = args.output or _default_output(key)
        print(where)
        if args.fused_step:
            paths = {"fwd": "cuDNN convolutions + gate kernels",
                     "bwd": "gate kernels + cuDNN dgrad (the weight gradient is cuDNN on both paths, not timed)"}
            for direction in directions:
                n_tiles = len(fused_tile_candidates(dtypes[0], args.block_m, args.block_n, args.fused_warps,
                                                    args.fused_stages, direction=direction))
                kernels = sorted({k for s in shapes for k in _tile_kernels(s.reset_after, direction)})
                print(f"fused step, {direction}: {len(shapes)} steps x ({paths[direction]}, and {n_tiles} fused "
                      f"tiles of {', '.join(kernels)}), each checked against the float64 reference before it is timed")
            for shape in shapes:
                print(f"  {shape}")
            print(f"would write: {output} (step_paths for {', '.join(directions)}, fused_tiles)")
            return 0
        n_cases = len(args.kernels) * len(dtypes) * len(sizes)
        print(f"kernels ({len(args.kernels)}): {', '.join(args.kernels)}")
        print(f"dtypes ({len(dtypes)}): {', '.join(args.dtypes)}")
        print(f"sizes ({len(sizes)}): {', '.join(_fmt_size(s) for s in sizes)} elements of the state")
        print(f"candidates ({len(candidates)}): {' '.join(_fmt_cfg(c) for c in candidates)}")
        n_runs = n_cases * len(candidates)
        minutes = n_runs * (args.warmup + args.rep) / 60e3
        print(f"benchmarks: {n_cases} cases x {len(candidates)} candidates = {n_runs}, "
              f"about {minutes:.0f} min of timing plus compilation")
        print(f"would write: {output}")
        return 0

    if not cuda:
        print("convgru_triton.tune: no CUDA GPU is visible (torch.cuda.is_available() is False), and the "
              "configurations are tuned on the GPU they are for. Run it on that GPU, or use --dry-run to see the plan.",
              file=sys.stderr)
        return 2
    try:
        import triton.testing

        from .ops.gates import kernels  # noqa: F401
    except Exception as exc:
        print(f"convgru_triton.tune: Triton or the fused kernels do not import ({_reason(exc)}); nothing to tune.",
              file=sys.stderr)
        return 2

    if _settings.peek_settings().triton_interpret:
        print("convgru_triton.tune: TRITON_INTERPRET is set, so the kernels would run in the Triton interpreter "
              "and the timings would mean nothing; unset it to tune.", file=sys.stderr)
        return 2
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    key = _tuning.normalize_device_name(name)
    output = args.output or _default_output(key)
    if os.path.isdir(output):
        output = os.path.join(output, key + ".json")
    if torch.bfloat16 in dtypes and not torch.cuda.is_bf16_supported():
        print(f"{name} has no bfloat16: not tuning it", file=sys.stderr)
        dtypes.remove(torch.bfloat16)
        shapes = [s for s in shapes if s.dtype != torch.bfloat16]

    if args.fused_step:
        return _main_fused_step(args, shapes, directions, device, name, key, output)

    print(f"tuning {len(args.kernels)} kernels x {len(dtypes)} dtypes x {len(sizes)} sizes x {len(candidates)} "
          f"candidates on {name} (Triton {_tuning.triton_version()}, torch {torch.__version__})", file=sys.stderr)

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    torch.cuda.set_device(device)
    results = tune(args.kernels, dtypes, sizes, candidates, device, timer, progress=not args.quiet)
    print(format_table(results))
    if not any(r.best is not None for r in results):
        print("convgru_triton.tune: no configuration could be tuned; nothing written", file=sys.stderr)
        return 1
    doc = make_document(results, name, _read_existing(output))
    try:
        write_atomic(output, doc)
    except OSError as exc:
        print(f"convgru_triton.tune: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    _tuning.clear_cache()
    print(f"wrote {output} ({len(doc['entries'])} entries)")
    if not _registry_reads(output, key):
        folder = os.path.dirname(os.path.abspath(output))
        print(f"note: the package does not look there; set {_tuning.ENV_DIR}={folder} "
              f"(with the file named {key}.json) or copy it to {_default_output(key)}")
    return 0


def _main_fused_step(args, shapes: Sequence[StepShape], directions: Sequence[str], device: torch.device, name: str,
                     key: str, output: str) -> int:
    import triton.testing

    print(f"tuning the fused step ({', '.join(directions)}): {len(shapes)} steps on {name} "
          f"(Triton {_tuning.triton_version()}, torch {torch.__version__})", file=sys.stderr)

    def timer(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    def tiles_of(dtype, direction):
        return fused_tile_candidates(dtype, args.block_m, args.block_n, args.fused_warps, args.fused_stages,
                                     direction=direction)

    torch.cuda.set_device(device)
    results = tune_fused_step(shapes, tiles_of, device, timer, progress=not args.quiet, directions=directions)
    print(format_step_table(results))
    if not any(r.cudnn.ms is not None for r in results):
        print("convgru_triton.tune: no step could be timed; nothing written", file=sys.stderr)
        return 1
    existing = _read_existing(output)
    doc = make_document([], name, existing)
    doc = merge_fused_sections(doc, results, existing)
    try:
        write_atomic(output, doc)
    except OSError as exc:
        print(f"convgru_triton.tune: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    _tuning.clear_cache()
    print(f"wrote {output} ({len(doc['step_paths'])} step paths, {len(doc['fused_tiles'])} fused tiles)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
