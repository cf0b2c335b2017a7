"""Roofline floors of the benchmark workloads: the least time any implementation of
this package's design can take on a given GPU.

    python -m bench.roofline [--device h200,h100-sxm] [--dtype bfloat16] [--reset-after]

Two numbers per piece of work: the fewest bytes it must move through device memory over the copy
bandwidth, and its arithmetic over the matrix rate. The larger is its floor;
pieces run one after another, so a step's floor is the sum of its pieces'.

* **Gate kernels** (memory-bound): bytes = what each fused kernel must read and
  write once per element of the state, E = N * H * S elements of ``element``
  bytes each (biases, 3H values, ignored):

  ==========================  ====================================================  ======  ==========
  kernel                      reads / writes (per state element)                    fwd     fwd (no grad)
  ==========================  ====================================================  ======  ==========
  gru_reset_after_fwd         gx 3, gh 3, h 1 / h' 1, gates 3, aux 1 (aux, gates    12E     8E
                              only when saving for backward)
  gru_reset_gate_fwd          gx[r,z] 2, gh_rz 2, h 1 / gates[r,z] 2, r*h 1          8E      8E
  gru_update_fwd              gx[n] 1, gh_n 1, z 1, h 1 / h' 1, gates[n] 1 (saving)  6E      5E
  gru_reset_after_bwd         g 1, g2 1*, gates 3, aux 1, h 1 / d gx 3, d gh 3, d h  13E+1E*
  gru_update_bwd              g 1, g2 1*, z 1, n 1, h 1 / d a_z 1, d a_n 1, d h 1    7E+1E*
  gru_reset_gate_bwd          d(r*h) 1, r 1, h 1, d h 1 / d h 1, d a_r 1             6E
  ==========================  ====================================================  ======  ==========

  (*) ``g2``, the gradient arriving from the output at step t besides the one
  carried from step t+1: every step of a sequence but the last one processed.
* **Convolutions** (cuDNN): FLOPs = 2 * N * S * C_out * C_in * k_h * k_w each; the
  backward computes the input and the weight gradient, twice the forward's
  FLOPs (the input's gradient only when it needs one: always in the
  benchmarks' fwd+bwd, whose inputs require grad). Bytes = input + weight +
  output once. float32 convolutions run as TF32 (PyTorch's default
  ``torch.backends.cudnn.allow_tf32 = True``).
* **The fused step** (``fused=True``; ``convgru_triton.ops.fused_step``,
  the ``ours-fused`` provider; ``reset_after=False``): the hidden convolution
  and the forward gate kernels become two kernels whose only bytes are the
  unavoidable ones (the gate pre-activations ``W_h * h`` never reach memory):

  ==========================  =========================================================  ======  ==========
  kernel                      reads / writes (per state element; + the weights once)     fwd     fwd (no grad)
  ==========================  =========================================================  ======  ==========
  conv_rz_fwd                 h 1, gx[r,z] 2 / gates[r,z] 2, r*h 1                       6E      6E
  conv_n_fwd                  r*h 1, gx[n] 1, z 1, h 1 / h' 1, gates[n] 1 (saving)       6E      5E
  ==========================  =========================================================  ======  ==========

  FLOPs: the hidden convolution's (2H output channels, then H). The input
  convolution and the whole backward stay as above (the fused backward is not
  modelled): the fused floor differs from the unfused one in the forward's
  hidden convolution and gate kernels only.

Device numbers (:data:`DEVICES`), each with its source: H200 copy bandwidth and
bf16 matrix rate measured on the H200 machine type lent to this project
(2026-10-28 and 2026-11-04: a device-to-device copy moved ~4.3 TB/s counting
reads and writes; an 8192^3 bf16 product through PyTorch ran 769-798 TFLOP/s on
random data); H100 SXM from NVIDIA's datasheet
(dense rates, no sparsity; datasheet bandwidth is a peak no copy reaches:
floors on it are optimistic).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

# A workload is bench.workloads.Workload; this module only reads its fields, so
# that it imports neither torch nor the package.

ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Device:
    """Ceilings of one GPU: ``copy_gb_s`` device-memory bandwidth in GB/s (1e9
    bytes/s, reads + writes), ``matmul_tflops`` convolution/matrix rate per dtype
    in TFLOP/s (1e12), ``source`` where each number comes from."""

    name: str
    copy_gb_s: float
    matmul_tflops: Dict[str, float]
    source: str
    measured: bool = False


DEVICES: Dict[str, Device] = {
    "h200": Device(
        "H200 (measured on the project's lent machine)", 4300.0,
        # bf16: measured 769-798 on the lent H200 machine type; fp16: same tensor-core rate as bf16 on Hopper (datasheet), taken
        # equal to the measured bf16; tf32 / fp64: datasheet (495 / 67) scaled by measured/datasheet bf16
        # (790 / 989) for tf32, datasheet for fp64 (not measured).
        {"bfloat16": 790.0, "float16": 790.0, "float32": 395.0, "float64": 67.0},
        "copy 4.3 TB/s and bf16 790 TFLOP/s measured on the lent H200 machine type (2026-10-28/11-04); fp16 = bf16; "
        "tf32 = datasheet 495 x 790/989; fp64 = datasheet 67",
        measured=True,
    ),
    "h100-sxm": Device(
        "H100 SXM (datasheet)", 3350.0,
        {"bfloat16": 989.0, "float16": 989.0, "float32": 495.0, "float64": 67.0},
        "NVIDIA H100 SXM datasheet: HBM3 3.35 TB/s; dense bf16/fp16 989, tf32 495, fp64 tensor core 67 TFLOP/s",
    ),
}


@dataclass
class Piece:
    """One kernel or convolution of a step: ``bytes`` moved, ``flops`` done,
    ``count`` times per call of the workload (steps, layers, stages)."""

    name: str
    kind: str  # "gate" or "conv"
    bytes: float
    flops: float = 0.0
    count: int = 1

    def floor_ms(self, device: Device, dtype: str) -> float:
        """Floor of one run of this piece, ms."""
        t_bytes = self.bytes / (device.copy_gb_s * 1e9)
        t_flops = self.flops / (device.matmul_tflops[dtype] * 1e12) if self.flops else 0.0
        return max(t_bytes, t_flops) * 1e3


def gate_bytes(kernel: str, elements: int, element: int, save: bool = True, grad2: bool = False) -> int:
    """Fewest bytes kernel ``kernel`` (name without ``_kernel``, e.g.
    ``"gru_update_fwd"``) moves for a state of ``elements`` elements of
    ``element`` bytes; see the module docstring's table."""
    per = {
        "gru_reset_after_fwd": 12 if save else 8,
        "gru_reset_gate_fwd": 8,
        "gru_update_fwd": 6 if save else 5,
        "gru_reset_after_bwd": 13 + (1 if grad2 else 0),
        "gru_update_bwd": 7 + (1 if grad2 else 0),
        "gru_reset_gate_bwd": 6,
    }
    if kernel not in per:
        raise ValueError(f"unknown gate kernel {kernel!r}; known: {sorted(per)}")
    return per[kernel] * elements * element


def _conv(name: str, n: int, s: int, c_in: int, c_out: int, taps: int, element: int, count: int,
          backward: bool = False, input_grad: bool = True) -> Piece:
    flops = 2.0 * n * s * c_out * c_in * taps
    io = (n * s * c_in + c_out * c_in * taps + n * s * c_out) * element
    if backward:
        # weight gradient: reads input and output gradient, writes weight; input gradient: reads
        # output gradient and weight, writes input gradient
        flops *= 2 if input_grad else 1
        io = (n * s * c_in + n * s * c_out + c_out * c_in * taps) * element + (
            (n * s * c_out + c_out * c_in * taps + n * s * c_in) * element if input_grad else 0)
    return Piece(name, "conv", io, flops, count)


def pieces(workload, dtype: str = "bfloat16", pass_: str = "fwd+bwd", reset_after: bool = False,
           fused: bool = False) -> List[Piece]:
    """Every kernel and convolution one call of ``workload`` (a
    :class:`bench.workloads.Workload`) runs, with how many times; ``pass_`` is
    ``"fwd"`` (inference, nothing saved) or ``"fwd+bwd"``. ``fused``: the
    forward's hidden convolution and gate kernels as the fused step's two
    kernels (kind ``"fused"``; ``reset_after=False`` only)."""
    if pass_ not in ("fwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd' or 'fwd+bwd', got {pass_!r}")
    if fused and reset_after:
        raise ValueError("fused=True models the reset_after=False kernels (the benchmarks' formulation) only")
    element = ELEMENT_BYTES[dtype]
    train = pass_ == "fwd+bwd"
    out: List[Piece] = []
    for i, st in enumerate(workload.stages):
        n, h = workload.batch, st.hidden_channels
        s = st.size[0] * st.size[1]
        e = n * h * s
        k = st.kernel_size
        passes = [(1, k), (k, 1)] if workload.separable else [(k, k)]
        steps = workload.steps
        tag = f"{workload.name}[{i}]" if len(workload.stages) > 1 else workload.name
        for layer in range(st.num_layers):
            c_in = st.input_channels if layer == 0 else h
            for kh, kw in passes:
                taps = kh * kw
                reps = steps
                out.append(_conv(f"{tag} input conv {kh}x{kw}", n, s, c_in, 3 * h, taps, element, reps))
                if fused:
                    w = h * h * taps  # weight elements of one gate
                    out.append(Piece(f"{tag} fused conv_rz_fwd {kh}x{kw}", "fused", (6 * e + 2 * w) * element,
                                     2.0 * n * s * 2 * h * h * taps, reps))
                    out.append(Piece(f"{tag} fused conv_n_fwd {kh}x{kw}", "fused",
                                     ((6 if train else 5) * e + w) * element, 2.0 * n * s * h * h * taps, reps))
                else:
                    out.append(_conv(f"{tag} hidden conv {kh}x{kw}", n, s, h, 3 * h, taps, element, reps))
                if reset_after:
                    out.append(Piece(f"{tag} gru_reset_after_fwd", "gate",
                                     gate_bytes("gru_reset_after_fwd", e, element, save=train), count=reps))
                elif not fused:  # the fused kernels above did the gate math
                    out.append(Piece(f"{tag} gru_reset_gate_fwd", "gate",
                                     gate_bytes("gru_reset_gate_fwd", e, element), count=reps))
                    out.append(Piece(f"{tag} gru_update_fwd", "gate",
                                     gate_bytes("gru_update_fwd", e, element, save=train), count=reps))
                if not train:
                    continue
                # backward: steps-1 steps take a second incoming gradient, the last processed one not
                bwd = ["gru_reset_after_bwd"] if reset_after else ["gru_update_bwd", "gru_reset_gate_bwd"]
                for kern in bwd:
                    takes_g2 = kern != "gru_reset_gate_bwd"
                    if takes_g2 and steps > 1:
                        out.append(Piece(f"{tag} {kern} (+g2)", "gate", gate_bytes(kern, e, element, grad2=True),
                                         count=steps - 1))
                    out.append(Piece(f"{tag} {kern}", "gate", gate_bytes(kern, e, element), count=1 if takes_g2 and steps > 1 else steps))
                out.append(_conv(f"{tag} hidden conv bwd {kh}x{kw}", n, s, h, 3 * h, taps, element, reps,
                                 backward=True))
                out.append(_conv(f"{tag} input conv bwd {kh}x{kw}", n, s, c_in, 3 * h, taps, element, reps,
                                 backward=True))
    return out


def floor_ms(workload, device="h200", dtype: str = "bfloat16", pass_: str = "fwd+bwd",
             reset_after: bool = False, kind: Optional[str] = None, fused: bool = False) -> float:
    """Floor of one call of ``workload`` in ms on ``device`` (a key of
    :data:`DEVICES` or a :class:`Device`): the sum over its pieces of max(bytes /
    copy bandwidth, FLOPs / matrix rate). ``kind`` ``"gate"``, ``"conv"`` or
    ``"fused"`` sums only those pieces. The benchmarks run ``reset_after=False``
    (the modules' default). ``fused``: the fused step's floor (:func:`pieces`)."""
    dev = DEVICES[device] if isinstance(device, str) else device
    return sum(p.floor_ms(dev, dtype) * p.count for p in pieces(workload, dtype, pass_, reset_after, fused)
               if kind is None or p.kind == kind)


def kernel_floor_ms(kernel: str, state_bytes: int, device="h200", save: bool = True, grad2: bool = False,
                    element: int = 2) -> float:
    """Floor of one gate kernel on a state of ``state_bytes`` bytes (E * element), ms."""
    dev = DEVICES[device] if isinstance(device, str) else device
    return gate_bytes(kernel, state_bytes // element, element, save, grad2) / (dev.copy_gb_s * 1e9) * 1e3


def markdown(workloads=None, devices: Sequence[str] = ("h200", "h100-sxm"), dtypes: Sequence[str] = ("bfloat16",),
             reset_after: bool = False) -> str:
    """One row per workload and pass: floor (ms) per device, split gates / convolutions."""
    if workloads is None:
        from .workloads import FULL_WORKLOADS as workloads
    fused = not reset_after  # the fused step's floor: the reset_after=False kernels only
    lines = ["| workload | dtype | pass | " + " | ".join(
        f"{DEVICES[d].name} floor ms (gates + convs)" + (f" | {DEVICES[d].name} fused-step floor ms" if fused else "")
        for d in devices) + " |", "|---|---|---|" + "--:|" * (len(devices) * (2 if fused else 1))]
    for w in workloads:
        for dtype in dtypes:
            for pass_ in ("fwd", "fwd+bwd"):
                cells = []
                for d in devices:
                    g = floor_ms(w, d, dtype, pass_, reset_after, "gate")
                    c = floor_ms(w, d, dtype, pass_, reset_after, "conv")
                    cells.append(f"{g + c:.3f} ({g:.3f} + {c:.3f})")
                    if fused:
                        cells.append(f"{floor_ms(w, d, dtype, pass_, fused=True):.3f}")
                lines.append(f"| {w.name} | {dtype} | {pass_} | " + " | ".join(cells) + " |")
    notes = [f"- {DEVICES[d].name}: {DEVICES[d].source}" for d in devices]
    return "\n".join(lines + [""] + notes) + "\n"


def step_table(workload, device: str = "h200", dtype: str = "bfloat16", pass_: str = "fwd+bwd",
               reset_after: bool = False) -> str:
    """Every piece of one workload: bytes, FLOPs, count, floor per run (ms)."""
    dev = DEVICES[device]
    lines = ["| piece | MB moved | GFLOP | runs | floor per run ms | bound |", "|---|--:|--:|--:|--:|---|"]
    for p in pieces(workload, dtype, pass_, reset_after):
        t_b = p.bytes / (dev.copy_gb_s * 1e9)
        t_f = p.flops / (dev.matmul_tflops[dtype] * 1e12) if p.flops else 0.0
        lines.append(f"| {p.name} | {p.bytes / 1e6:.2f} | {p.flops / 1e9:.2f} | {p.count} | "
                     f"{p.floor_ms(dev, dtype):.4f} | {'memory' if t_b >= t_f else 'math'} |")
    return "\n".join(lines) + "\n"


def device_for_gpu_name(name: str) -> Optional[str]:
    """Key of :data:`DEVICES` for a ``torch.cuda.get_device_name`` string, ``None``
    when not modeled ("NVIDIA H200" -> h200; "NVIDIA H100 80GB HBM3" / "... SXM"
    -> h100-sxm; an H100 PCIe/NVL has other numbers and gets ``None``)."""
    n = name.upper()
    if "H200" in n:
        return "h200"
    if "H100" in n and ("SXM" in n or "HBM3" in n) and "PCIE" not in n and "NVL" not in n:
        return "h100-sxm"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="h200,h100-sxm", help=f"comma-separated, of {sorted(DEVICES)}")
    p.add_argument("--dtype", default="bfloat16", help="comma-separated, of " + ",".join(ELEMENT_BYTES))
    p.add_argument("--reset-after", action="store_true", help="the reset_after=True formulation")
    p.add_argument("--pieces", metavar="WORKLOAD", help="also list every kernel and convolution of one workload")
    args = p.parse_args(argv)
    devices = [d for d in args.device.split(",") if d]
    dtypes = [d for d in args.dtype.split(",") if d]
    for d in devices:
        if d not in DEVICES:
            p.error(f"unknown device {d!r}")
    for d in dtypes:
        if d not in ELEMENT_BYTES:
            p.error(f"unknown dtype {d!r}")
    from .workloads import FULL_WORKLOADS

    print(f"Floor per call (ms), reset_after={args.reset_after}, full-size workloads:\n")
    print(markdown(FULL_WORKLOADS, devices, dtypes, args.reset_after))
    if args.pieces:
        w = next((w for w in FULL_WORKLOADS if w.name == args.pieces), None)
        if w is None:
            p.error(f"unknown workload {args.pieces!r}")
        print(f"\n{w.name} on {DEVICES[devices[0]].name}, {dtypes[0]}, fwd+bwd:\n")
        print(step_table(w, devices[0], dtypes[0], "fwd+bwd", args.reset_after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
