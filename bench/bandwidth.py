"""Gate-kernel efficiency: achieved bytes/s of the fused kernels against a
device-to-device copy on the same card (GPU only).

    python -m bench.bandwidth --out DIR [--name STEM] [--sizes-mb 1,4,16,64,256,1024]
                              [--dtypes float32,bfloat16] [--no-grad2]
    python -m bench.bandwidth --hidden 128 --spatial 46x62 --layouts nchw,cl --sizes-mb 64,256 ...
                                                     # RAFT's odd map, both layouts
    python -m bench.bandwidth --dry-run --out DIR    # tiny sizes, CPU, Triton interpreter

For each size of the state h (N, H, S) from 1 MB to 1 GB, each dtype and each
layout (``nchw``: contiguous; ``cl``: channels_last, every tensor), every
launcher of :mod:`convgru_triton.ops.gates.kernels` is timed with
``triton.testing.do_bench`` (median, L2 flushed between calls) and its traffic
counted: the bytes each kernel must read and write per element of the state
(E = elements of h, biases ignored):

==========================  =========================================================  ====
kernel (launcher)           reads / writes                                             total
==========================  =========================================================  ====
gru_reset_gate_fwd          gx[r,z], gh_rz, h / gates[r,z], r*h                          8E
gru_update_fwd (save)       gx[n], gh_n, z, h / h', gates[n]                             6E
gru_update_bwd              g, g2, z, n, h / d a_z, d a_n, d h                           8E
gru_reset_gate_bwd          d(r*h), r, h, d h / d h, d a_r                               6E
gru_reset_after_fwd (save)  gx, gh, h / h', gates[r,z,n], aux                           12E
gru_reset_after_bwd         g, g2, gates, aux, h / d gx, d gh, d h                      14E
==========================  =========================================================  ====

(``g2``, the second incoming gradient the sequence operator passes, is dropped
with ``--no-grad2``: one E less for the two backward kernels that take it.)
The reference is ``dst.copy_(src)`` moving the same number of bytes (src of
half the kernel's traffic), timed the same way on the same card; efficiency =
kernel bytes/s / copy bytes/s. Before timing, each kernel's outputs are checked
against the equations (written out here in torch) at the smallest size.

Writes ``DIR/STEM.json`` and ``DIR/STEM.md`` (default STEM ``gpu-<gpu>-bandwidth``).
On a machine without CUDA it exits with status 2 unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

if "--dry-run" in sys.argv[1:]:
    # Must be set before triton is first imported; the dry run runs the kernels on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

TARGET = 0.80  # of copy bandwidth, for states of at least TARGET_MIN_BYTES
TARGET_MIN_BYTES = 64 * 2**20
HIDDEN = 64  # state (N, 64, 32, 32): one sample is 65536 elements
SPATIAL = (32, 32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUT_NAMES = {"nchw": "contiguous", "cl": "channels_last"}


def _ops():
    from convgru_triton.ops.gates import kernels as conv_gru_cell

    return conv_gru_cell


def _call(fn: Callable, *args, **buffers):
    """Call a launcher, handing it the output buffers it accepts as keywords (the
    launchers allocate what they are not given)."""
    params = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in buffers.items() if k in params and v is not None})


# ----------------------------------------------------------------------------
# One size and dtype: tensors, the six launches, their traffic and checks
# ----------------------------------------------------------------------------


class Case:
    """Tensors of one state size; ``kernels()`` gives (name, traffic in bytes, launch)."""

    def __init__(self, batch: int, dtype: torch.dtype, device, grad2: bool, hidden: int = HIDDEN,
                 spatial=SPATIAL, seed: int = 0, channels_last: bool = False):
        gen = torch.Generator(device=device).manual_seed(seed)
        H = self.hidden = hidden
        spatial = tuple(spatial)

        def randn(*shape):
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def state(channels):
            return randn(batch, channels, *spatial).contiguous(memory_format=fmt)

        def empty(channels):
            return torch.empty((batch, channels) + spatial, dtype=dtype, device=device, memory_format=fmt)

        self.dtype, self.device, self.grad2, self.channels_last = dtype, device, grad2, channels_last
        self.element = torch.empty((), dtype=dtype).element_size()
        self.elements = batch * H * spatial[0] * spatial[1]
        self.h = torch.tanh(state(H))
        self.gx, self.gh, self.gh_n = state(3 * H), state(3 * H), state(H)
        # W_hrz * h as the operator has it: a convolution output of its own, dense.
        # Not gh[:, :2H]: that view's sample stride is 3H planes, so the launcher
        # would copy it into a dense buffer first, and the copy would be timed with
        # the kernel (45-58% "of copy" for this kernel on an H200).
        self.gh_rz = state(2 * H)
        self.bias_ih, self.bias_hh = randn(3 * H) * 0.1, randn(3 * H) * 0.1
        self.g = state(H)
        self.g2 = state(H) if grad2 else None
        self.d_rh = state(H)
        # Outputs, preallocated: the launchers write into buffers they are given.
        self.gates, self.rh, self.h_new = empty(3 * H), empty(H), empty(H)
        self.ra_gates, self.ra_aux, self.ra_h_new = empty(3 * H), empty(H), empty(H)
        self.d_gates, self.d_h = empty(3 * H), empty(H)
        self.d_gx, self.d_gh, self.d_h2 = empty(3 * H), empty(3 * H), empty(H)
        self.saved = None

    # The launches ---------------------------------------------------------

    def reset_gate_fwd(self):
        op = _ops()
        self.gates, self.rh = _call(op._reset_gate_fwd, self.gx, self.gh_rz, self.h, self.bias_ih,
                                    self.bias_hh, gates=self.gates, rh=self.rh)

    def update_fwd(self):
        op = _ops()
        return _call(op._update_fwd, self.gx, self.gh_n, self.gates, self.h, self.bias_ih, self.bias_hh, True,
                     h_new=self.h_new)

    def update_bwd(self):
        op = _ops()
        # Keep what it returns: a launcher without the keyword allocates d_h itself.
        self.d_h = _call(op._update_bwd, self.g, self.g2, self.gates, self.h, self.d_gates, d_h=self.d_h)
        return self.d_h

    def reset_gate_bwd(self):
        op = _ops()
        op._reset_gate_bwd(self.d_rh, self.gates, self.h, self.d_gates, self.d_h)

    def reset_after_fwd(self):
        op = _ops()
        out = _call(op._reset_after_fwd, self.gx, self.gh, self.h, self.bias_ih, self.bias_hh, True,
                    h_new=self.ra_h_new, gates=self.ra_gates, aux=self.ra_aux)
        self.ra_h_new, self.saved = out  # saved: whatever the launcher's backward twin takes
        return self.ra_h_new

    def reset_after_bwd(self):
        op = _ops()
        return _call(op._reset_after_bwd, self.g, self.g2, self.saved, self.h, self.channels_last,
                     d_gx=self.d_gx, d_gh=self.d_gh, d_h=self.d_h2)

    def kernels(self):
        """(kernel name, bytes read + written, launch) in the order they must first run."""
        b, g2 = self.elements * self.element, (1 if self.grad2 else 0)
        return [
            ("gru_reset_gate_fwd", 8 * b, self.reset_gate_fwd),
            ("gru_update_fwd", 6 * b, self.update_fwd),
            ("gru_update_bwd", (7 + g2) * b, self.update_bwd),
            ("gru_reset_gate_bwd", 6 * b, self.reset_gate_bwd),
            ("gru_reset_after_fwd", 12 * b, self.reset_after_fwd),
            ("gru_reset_after_bwd", (13 + g2) * b, self.reset_after_bwd),
        ]

    # Checks against the equations ------------------------------------------

    def check(self) -> None:
        """Run every launch once and compare with the equations in float32."""
        H = self.hidden
        f = lambda t: t.float()  # noqa: E731
        bias = lambda b, i: f(b)[i * H:(i + 1) * H].view(1, H, 1, 1)  # noqa: E731
        gx, gh, gh_rz, h = f(self.gx), f(self.gh), f(self.gh_rz), f(self.h)
        tol = 1e-5 if self.dtype == torch.float32 else 3e-2
        g = f(self.g) + (f(self.g2) if self.g2 is not None else 0)

        def close(name, got, want):
            err = float((f(got) - want).abs().max() / want.abs().max().clamp_min(1.0))
            if not err <= tol:
                raise AssertionError(f"{name}: kernel output differs from the equations by {err:.3g} "
                                     f"(tolerance {tol})")

        # reset_after=False
        self.reset_gate_fwd()
        h_new = self.update_fwd()
        r = torch.sigmoid(gx[:, :H] + gh_rz[:, :H] + bias(self.bias_ih, 0) + bias(self.bias_hh, 0))
        z = torch.sigmoid(gx[:, H:2 * H] + gh_rz[:, H:] + bias(self.bias_ih, 1) + bias(self.bias_hh, 1))
        n = torch.tanh(gx[:, 2 * H:] + f(self.gh_n) + bias(self.bias_ih, 2) + bias(self.bias_hh, 2))
        close("reset_gate_fwd r", self.gates[:, :H], r)
        close("reset_gate_fwd z", self.gates[:, H:2 * H], z)
        close("reset_gate_fwd r*h", self.rh, r * h)
        close("update_fwd h'", h_new, h + z * (n - h))
        close("update_fwd n", self.gates[:, 2 * H:], n)
        z, n = f(self.gates[:, H:2 * H]), f(self.gates[:, 2 * H:])
        r = f(self.gates[:, :H])
        d_h = self.update_bwd()
        close("update_bwd d_az", self.d_gates[:, H:2 * H], g * (n - h) * z * (1 - z))
        close("update_bwd d_an", self.d_gates[:, 2 * H:], g * z * (1 - n * n))
        close("update_bwd d_h", d_h, g * (1 - z))
        d_h_before = f(d_h).clone()
        self.reset_gate_bwd()
        d_rh = f(self.d_rh)
        close("reset_gate_bwd d_h", self.d_h, d_h_before + d_rh * r)
        close("reset_gate_bwd d_ar", self.d_gates[:, :H], d_rh * h * r * (1 - r))
        # reset_after=True
        h_new = self.reset_after_fwd()
        r = torch.sigmoid(gx[:, :H] + gh[:, :H] + bias(self.bias_ih, 0) + bias(self.bias_hh, 0))
        z = torch.sigmoid(gx[:, H:2 * H] + gh[:, H:2 * H] + bias(self.bias_ih, 1) + bias(self.bias_hh, 1))
        hn = gh[:, 2 * H:] + bias(self.bias_hh, 2)
        n = torch.tanh(gx[:, 2 * H:] + bias(self.bias_ih, 2) + r * hn)
        close("reset_after_fwd h'", h_new, h + z * (n - h))
        d_gx, d_gh, d_h = self.reset_after_bwd()  # against the forward values computed above
        d_an = g * z * (1 - n * n)
        d_az = g * (n - h) * z * (1 - z)
        d_ar = d_an * hn * r * (1 - r)
        close("reset_after_bwd d_gx", d_gx, torch.cat([d_ar, d_az, d_an], 1))
        close("reset_after_bwd d_gh", d_gh, torch.cat([d_ar, d_az, d_an * r], 1))
        close("reset_after_bwd d_h", d_h, g * (1 - z))


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


class _CopyWatch:
    """Counts the launches that had to copy a tensor into a conforming buffer
    (``conv_gru_cell._conforming``: a strided view, the other layout) while
    active. Such a launch times the copy with the kernel, so :func:`measure`
    refuses it instead of reporting a kernel slower than it is."""

    def __init__(self):
        self.copies = 0

    def __enter__(self):
        op = _ops()
        self._original = original = op._conforming

        def counting(*args, **kwargs):
            self.copies += 1
            return original(*args, **kwargs)

        op._conforming = counting
        return self

    def __exit__(self, *exc):
        _ops()._conforming = self._original
        return False


def _launch_checked(name: str, launch: Callable) -> None:
    """First launch of a kernel (compiles it): refused if it copied its tensors."""
    with _CopyWatch() as watch:
        launch()
    if watch.copies:
        raise AssertionError(f"{name}: the launch copied {watch.copies} tensor set(s) into conforming buffers "
                             "(a strided view or a tensor in the other layout); the copy would be timed with "
                             "the kernel. Give it tensors dense per sample in the output's layout.")


def _cpu_timer(fn: Callable, reps: int = 1) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _gpu_timer(fn: Callable) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except TypeError:  # older Triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def measure(sizes_bytes: Sequence[int], dtypes: Sequence[str], device, grad2: bool, dry_run: bool,
            hidden: int = HIDDEN, spatial=SPATIAL, log=print, layouts: Sequence[str] = ("nchw",)) -> List[Dict]:
    timer = _cpu_timer if dry_run else _gpu_timer
    rows: List[Dict] = []
    copy_cache: Dict[int, float] = {}
    for dtype_name, layout in [(d, lay) for d in dtypes for lay in layouts]:
        dtype = DTYPES[dtype_name]
        element = torch.empty((), dtype=dtype).element_size()
        checked = False
        for size in sizes_bytes:
            per_sample = hidden * spatial[0] * spatial[1] * element
            batch = max(1, size // per_sample)
            case = Case(batch, dtype, device, grad2, hidden, spatial, channels_last=layout == "cl")
            if not checked:
                case.check()
                checked = True
            for name, traffic, launch in case.kernels():
                _launch_checked(name, launch)  # compile (and, for reset_after_bwd, its saved inputs exist)
                ms = timer(launch)
                half = traffic // 2
                if half not in copy_cache:
                    src = torch.empty(half, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    copy_cache[half] = timer(lambda: dst.copy_(src))
                    del src, dst
                copy_ms = copy_cache[half]
                row = dict(kernel=name, dtype=dtype_name, layout=layout, state_bytes=case.elements * element,
                           traffic_bytes=traffic, ms=ms, gb_per_s=traffic / ms / 1e6,
                           copy_ms=copy_ms, copy_gb_per_s=traffic / copy_ms / 1e6,
                           efficiency=copy_ms / ms)
                rows.append(row)
                log(f"{dtype_name:9} {layout:4} state {row['state_bytes'] / 2**20:8.2f} MiB  {name:20} "
                    f"{row['gb_per_s']:8.1f} GB/s  copy {row['copy_gb_per_s']:8.1f} GB/s  "
                    f"{row['efficiency'] * 100:5.1f}%")
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _mb(nbytes: int) -> str:
    mb = nbytes / 2**20
    return f"{mb:.0f}" if mb >= 1 else f"{mb:.3g}"


def _roofline_copy_gb_s(result: dict) -> Optional[float]:
    """The roofline model's copy bandwidth for this GPU (GB/s), ``None`` if not modeled or a dry run."""
    if result.get("dry_run"):
        return None
    try:
        from bench import roofline
    except Exception:
        return None
    key = roofline.device_for_gpu_name(result.get("machine", {}).get("gpu") or "")
    return roofline.DEVICES[key].copy_gb_s if key else None


def markdown(result: dict) -> str:
    from bench.report import machine_line

    rows = result["rows"]
    lines = ["# Gate-kernel bandwidth", "", machine_line({"machine_info": {"convgru": result["machine"]},
                                                             "datetime": result.get("datetime", "")}), ""]
    if result.get("dry_run"):
        lines += ["**Dry run** (Triton interpreter on CPU): checks the script, the numbers mean nothing.", ""]
    lines += ["Achieved GB/s of each fused kernel (bytes it must read and write / median time, "
              "`triton.testing.do_bench`) and in brackets its share of a `copy_` moving the same bytes "
              f"on the same card. State (N, {result['hidden']}, {result['spatial'][0]}, {result['spatial'][1]}), "
              f"{' and '.join(LAYOUT_NAMES[x] for x in result.get('layouts', ['nchw']))}; "
              f"backward kernels {'with' if result.get('grad2') else 'without'} the second incoming gradient.", ""]
    floor_gb_s = _roofline_copy_gb_s(result)
    if floor_gb_s:
        lines += [f"After the share of copy: measured time / roofline floor (bytes over {floor_gb_s:.0f} GB/s, "
                  "`bench/roofline.py`).", ""]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    for dtype, layout in dict.fromkeys((r["dtype"], r.get("layout", "nchw")) for r in rows):
        lines += [f"**{dtype}, {LAYOUT_NAMES[layout]}**", ""]
        head = ["state MiB"] + [k.replace("gru_", "") for k in kernels]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["--:"] * len(head)) + "|"]
        mine = [r for r in rows if r["dtype"] == dtype and r.get("layout", "nchw") == layout]
        for size in dict.fromkeys(r["state_bytes"] for r in mine):
            cells = [_mb(size)]
            for k in kernels:
                r = next((r for r in mine if r["state_bytes"] == size and r["kernel"] == k), None)
                if r is None:
                    cells.append("—")
                else:
                    over = ""
                    if floor_gb_s:
                        floor_ms = r["traffic_bytes"] / (floor_gb_s * 1e6)  # bytes / (GB/s) in ms
                        over = f", {r['ms'] / floor_ms:.1f}×"
                    cells.append(f"{r['gb_per_s']:.0f} ({r['efficiency'] * 100:.0f}%{over})")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    big = [r for r in rows if r["state_bytes"] >= TARGET_MIN_BYTES]
    if big:
        misses = [r for r in big if r["efficiency"] < TARGET]
        lines.append(f"Target: every kernel at {TARGET * 100:.0f}%+ of copy bandwidth for states ≥ "
                     f"{TARGET_MIN_BYTES // 2**20} MiB: " + ("met." if not misses else f"missed in {len(misses)} "
                                                             f"of {len(big)}:"))
        for r in misses:
            lines.append(f"- {r['kernel']} {r['dtype']} {r.get('layout', 'nchw')} at {_mb(r['state_bytes'])} MiB: "
                         f"{r['efficiency'] * 100:.0f}% ({(TARGET - r['efficiency']) * 100:.0f} points short)")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", help="file stem (default gpu-<gpu>-bandwidth)")
    parser.add_argument("--sizes-mb", default="1,4,16,64,256,1024", help="state sizes in MiB")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-grad2", action="store_true", help="backward kernels with one incoming gradient")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden channels H (default {HIDDEN})")
    parser.add_argument("--spatial", default="x".join(map(str, SPATIAL)),
                        help="map size HxW (default %(default)s; RAFT's 1/8 map is 46x62)")
    parser.add_argument("--layouts", default="nchw", help="nchw (contiguous), cl (channels_last), or both: nchw,cl")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on CPU under the Triton interpreter: checks the script, not the card")
    args = parser.parse_args(argv)

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for x in layouts:
        if x not in LAYOUT_NAMES:
            parser.error(f"unknown layout {x!r}: nchw or cl")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("error: --dry-run needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        hidden, spatial = 4, (8, 8)
        sizes = [2 * hidden * spatial[0] * spatial[1] * 4]  # two tiny float32 samples
        dtypes = ["float32"]  # the interpreter has no bfloat16
    else:
        if not torch.cuda.is_available():
            print("error: the bandwidth measurement needs a CUDA GPU (torch.cuda.is_available() is False); "
                  "use --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        hidden, spatial = args.hidden, tuple(int(v) for v in args.spatial.split("x"))
        sizes = [int(float(s) * 2**20) for s in args.sizes_mb.split(",") if s.strip()]
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        for d in dtypes:
            if d not in DTYPES:
                parser.error(f"unknown dtype {d!r}")

    from bench.machine import convgru_machine_info

    machine = convgru_machine_info(device)
    rows = measure(sizes, dtypes, device, grad2=not args.no_grad2, dry_run=args.dry_run, hidden=hidden,
                   spatial=spatial, layouts=layouts)
    result = {
        "machine": machine,
        "datetime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "dry_run": args.dry_run,
        "grad2": not args.no_grad2,
        "hidden": hidden,
        "spatial": list(spatial),
        "layouts": layouts,
        "rows": rows,
    }
    kind = "gpu" if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", (machine.get("gpu") or machine.get("cpu") or "unknown").lower()).strip("-")[:40]
    stem = args.name or f"{kind}-{slug}-bandwidth" + ("-dry-run" if args.dry_run else "")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {os.path.join(args.out, stem)}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
