"""Whole-model RAFT: torchvision's ``raft_large`` and ``raft_small``, the
original against the same model converted (``convgru_triton.convert.
from_torchvision_raft``: the recurrent block swapped for ``SepConvGRUCell2d``
/ ``ConvGRUCell2d``), eager and under ``torch.compile``.

What RAFT does with the model, timed per call, CUDA-synchronised:

* ``train``: one training step as RAFT trains: N=6 image pairs of 368x496
  (its FlyingChairs crops), 12 flow updates, the sequence loss (the L1 error
  of every update's prediction, weighted ``0.8 ** (12 - i)``, the last one
  most), gradients clipped to norm 1, an AdamW step (lr 4e-4, weight decay
  1e-4, eps 1e-8); the model in training mode;
* ``infer``: N=1, 440x1024 (Sintel/KITTI-sized, padded to a multiple of 8),
  32 flow updates, no gradients, evaluation mode.

Precisions: ``bf16`` (bfloat16 autocast), ``fp16`` (float16 autocast; training
with a ``GradScaler``), ``fp32`` (the TF32 settings as they are, recorded in
the JSON). ``compile`` is ``torch.compile(model, dynamic=False)`` (default
mode; the loss and the optimizer step stay eager); its first call's time is
reported as ``first_call_s``.

Rows run eager first, then compiled; within each, bfloat16 training, bfloat16
inference, float16 training, float32 training, float16 inference, float32
inference; per model the original then the converted one (same weights, same
data), so that a time limit leaves complete pairs. Each row: a fresh copy of
the model and optimizer, ``--warmup`` untimed calls, then up to ``--repeats``
timed ones (fewer when ``--time-limit`` is reached; a row starts only while
time is left). A row that fails (e.g. out of memory) says why; the others run.

    python -m bench.raft_model --out DIR [--time-limit 90] [--modes eager,compile] [--models raft_large]
    python -m bench.raft_model --smoke --out DIR      # tiny sizes on any device (CPU: the script's check)

``--smoke`` runs every row at tiny sizes with ``torch.compile``'s ``eager``
backend (Dynamo traces the model; nothing is compiled to kernels), on
torchvision's models where torchvision imports and otherwise on the
stand-ins of ``bench/torchvision_raft_standin.py`` (torchvision's recurrent
block and interface). Without ``--smoke`` it needs CUDA and torchvision, and
writes a result saying it skipped when torchvision does not import.

Writes ``raft_model-<device type>.{json,md}`` into ``--out``, rewritten after
every row, so a run stopped half-way keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

MODELS = ("raft_large", "raft_small")
VARIANTS = ("original", "converted")
MODES = ("eager", "compile")
PRECISIONS = ("bf16", "fp16", "fp32")
PASSES = ("train", "infer")
#: (pass, precision) in the order rows run: what a time limit should leave measured first.
ORDER = (("train", "bf16"), ("infer", "bf16"), ("train", "fp16"), ("train", "fp32"), ("infer", "fp16"),
         ("infer", "fp32"))
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
GAMMA = 0.8  # RAFT's sequence-loss weight decay over the updates
MAX_GRAD_NORM = 1.0
ADAMW = dict(lr=4e-4, weight_decay=1e-4, eps=1e-8)


@dataclass(frozen=True)
class Shape:
    batch: int
    height: int
    width: int
    updates: int


FULL = {"train": Shape(6, 368, 496, 12), "infer": Shape(1, 440, 1024, 32)}
# torchvision's correlation pyramid halves a 1/8 map three times: 64 pixels is its least size.
SMOKE = {"train": Shape(2, 64, 64, 2), "infer": Shape(1, 64, 72, 3)}
SMOKE_STANDIN = {"train": Shape(1, 32, 32, 2), "infer": Shape(1, 32, 40, 2)}


def sequence_loss(predictions: Sequence[torch.Tensor], flow_gt: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """RAFT's loss: ``sum_i gamma ** (n - 1 - i) * mean(|prediction_i - flow_gt|)`` over the
    ``n`` predictions ``(N, 2, H, W)``, in float32 whatever the autocast dtype."""
    n = len(predictions)
    loss = flow_gt.new_zeros((), dtype=torch.float32)
    for i, prediction in enumerate(predictions):
        loss = loss + gamma ** (n - 1 - i) * (prediction.float() - flow_gt).abs().mean()
    return loss


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def model_source(smoke: bool) -> tuple:
    """``(source, builder, note)``: "torchvision" and its model builders where it
    imports; in a smoke run without it, "stand-in" and the stand-ins; otherwise
    ``builder`` is None and ``note`` says why."""
    from bench.torchvision_raft_standin import standin_raft, torchvision_unavailable

    reason = torchvision_unavailable()
    if reason is None:
        import torchvision
        from torchvision.models import optical_flow

        return "torchvision", lambda name: getattr(optical_flow, name)(weights=None), \
            f"torchvision {torchvision.__version__}"
    if smoke:
        return "stand-in", lambda name: standin_raft(name, tiny=True), reason
    return "none", None, reason


def build_pair(builder: Callable, name: str, device: torch.device):
    """The original model (seeded weights, float32, on ``device``) and a converted copy."""
    from convgru_triton.convert import from_torchvision_raft

    torch.manual_seed(0)
    original = builder(name).to(device)
    converted = from_torchvision_raft(copy.deepcopy(original))
    return {"original": original, "converted": converted}


def make_data(shape: Shape, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    image1, image2 = (torch.rand(shape.batch, 3, shape.height, shape.width, generator=g) * 2 - 1 for _ in range(2))
    flow = torch.randn(shape.batch, 2, shape.height, shape.width, generator=g) * 4
    return image1.to(device), image2.to(device), flow.to(device)


# ----------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str):
    dtype = AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def make_call(model: torch.nn.Module, runner: torch.nn.Module, pass_: str, precision: str, shape: Shape,
              data, device: torch.device) -> Callable[[], torch.Tensor]:
    """One call of the row: a training step (forward, sequence loss, backward,
    clipping, AdamW; a GradScaler for fp16) or an inference; returns the loss
    or the last prediction's mean, detached."""
    image1, image2, flow_gt = data
    if pass_ == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), _autocast(device, precision):
                predictions = runner(image1, image2, num_flow_updates=shape.updates)
            return predictions[-1].float().mean()

        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            predictions = runner(image1, image2, num_flow_updates=shape.updates)
        loss = sequence_loss(predictions, flow_gt)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(row: Dict, base: torch.nn.Module, shape: Shape, device: torch.device, deadline: float, warmup: int,
            repeats: int, compile_backend: str) -> Dict:
    """Fill ``row`` (model, variant, mode, precision, pass) with its measurements:
    ``ms`` (median per call), ``ms_all``, ``first_call_s``, ``first_value`` (the
    first call's loss, or the last prediction's mean), ``peak_mib`` (CUDA),
    ``fused_launches`` (the fused step's kernels in the first call)."""
    from bench import workloads as wl

    model = copy.deepcopy(base)
    runner = model
    if row["mode"] == "compile":
        torch._dynamo.reset()
        runner = torch.compile(model, dynamic=False, backend=compile_backend)
    data = make_data(shape, device)
    call = make_call(model, runner, row["pass"], row["precision"], shape, data, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with wl.count_fused_launches() as launches:
        first = call()
        _sync(device)
    row["first_call_s"] = time.perf_counter() - start
    row["first_value"] = float(first)
    row["fused_launches"] = launches[0]
    for _ in range(max(0, warmup - 1)):
        call()
    times = []
    for _ in range(max(1, repeats)):
        if times and time.perf_counter() > deadline:
            break
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    row["ms"] = statistics.median(times) * 1e3
    row["ms_all"] = [t * 1e3 for t in times]
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def plan_rows(models: Sequence[str], modes: Sequence[str], precisions: Sequence[str],
              passes: Sequence[str]) -> List[Dict]:
    """The rows in the order they run (module docstring)."""
    rows = []
    for mode in modes:
        for pass_, precision in ORDER:
            if pass_ not in passes or precision not in precisions:
                continue
            for model in models:
                for variant in VARIANTS:
                    rows.append({"model": model, "variant": variant, "mode": mode, "precision": precision,
                                 "pass": pass_})
    return rows


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------


def _key(row: Dict) -> tuple:
    return row["model"], row["pass"], row["precision"], row["mode"]


def markdown(result: Dict) -> str:
    lines = [f"# Whole-model RAFT: original vs converted ({result['source']})", "",
             f"{result['device_name']} · torch {result['machine'].get('torch')} · {result['source_note']} · "
             f"commit {result['machine'].get('commit', '?')[:12]}"
             + (" · **smoke run** (tiny sizes; the numbers mean nothing)" if result["smoke"] else ""), ""]
    if result.get("skipped"):
        return "\n".join(lines + [f"Skipped: {result['skipped']}", ""])
    shapes = result["shapes"]
    lines += [f"train: N={shapes['train']['batch']}, {shapes['train']['height']}x{shapes['train']['width']}, "
              f"{shapes['train']['updates']} updates, sequence loss (gamma {GAMMA}), clip {MAX_GRAD_NORM}, AdamW; "
              f"infer: N={shapes['infer']['batch']}, {shapes['infer']['height']}x{shapes['infer']['width']}, "
              f"{shapes['infer']['updates']} updates. ms per call, median; `orig / conv` > 1: the converted "
              f"model is faster. `Δ first`: relative difference of the first call's loss (train) or mean "
              f"flow (infer), same weights and data.", "",
              "| model | pass | precision | mode | original ms | converted ms | orig / conv | peak MiB orig | "
              "peak MiB conv | Δ first | fused launches |",
              "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    pairs: Dict[tuple, Dict[str, Dict]] = {}
    for row in result["rows"]:
        pairs.setdefault(_key(row), {})[row["variant"]] = row

    def num(row, key, fmt):
        v = (row or {}).get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else "—"

    notes = []
    for key, pair in pairs.items():
        o, c = pair.get("original"), pair.get("converted")
        ratio = delta = "—"
        if o and c and "ms" in o and "ms" in c:
            ratio = f"{o['ms'] / c['ms']:.2f}"
        if o and c and "first_value" in o and "first_value" in c:
            delta = f"{abs(c['first_value'] - o['first_value']) / max(abs(o['first_value']), 1e-30):.1e}"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {num(o, 'ms', '.1f')} | {num(c, 'ms', '.1f')} | "
                     f"{ratio} | {num(o, 'peak_mib', '.0f')} | {num(c, 'peak_mib', '.0f')} | {delta} | "
                     f"{num(c, 'fused_launches', 'd')} |")
        for row in (o, c):
            if row and row.get("status", "ok") != "ok":
                notes.append(f"- {' '.join(map(str, key))} {row['variant']}: {row['status']}")
    compiled = [r for r in result["rows"] if r["mode"] == "compile" and "first_call_s" in r]
    if compiled:
        lines += ["", "First call under torch.compile (compilation included): "
                  + ", ".join(f"{r['model']} {r['pass']} {r['precision']} {r['variant']} {r['first_call_s']:.0f} s"
                              for r in compiled)]
    return "\n".join(lines + ([""] + notes if notes else []) + [""])


def write(result: Dict, out: Optional[str]) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"raft_model-{result['device_type']}")
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        with open(stem + suffix + ".part", "w") as f:
            f.write(text)
        os.replace(stem + suffix + ".part", stem + suffix)


def _list(text: str, allowed: Sequence[str], what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return items


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raft_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for raft_model-<device>.{json,md}")
    parser.add_argument("--device", default=None, help="default: cuda where available, else cpu (--smoke only)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, torch.compile's eager backend")
    parser.add_argument("--time-limit", type=float, default=300.0, help="no row starts after this many seconds")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--passes", default=",".join(PASSES))
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per row (default 2; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5; smoke 1)")
    parser.add_argument("--compile-backend", default=None, help="default inductor (smoke: eager)")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.time_limit
    models, modes = _list(args.models, MODELS, "models"), _list(args.modes, MODES, "modes")
    precisions, passes = _list(args.precisions, PRECISIONS, "precisions"), _list(args.passes, PASSES, "passes")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")

    import convgru_triton
    from bench.machine import convgru_machine_info

    source, builder, note = model_source(args.smoke)
    if builder is not None and device.type != "cuda" and not args.smoke:
        print(f"full sizes need a CUDA device, got {device}: use --smoke for the tiny check", file=sys.stderr)
        return 2
    shapes = FULL if not args.smoke else SMOKE if source == "torchvision" else SMOKE_STANDIN
    result = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "machine": convgru_machine_info(device), "smoke": args.smoke, "source": source, "source_note": note,
        "shapes": {k: asdict(v) for k, v in shapes.items()}, "compile_backend": backend,
        "settings": {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn_benchmark": torch.backends.cudnn.benchmark, "fused_step": convgru_triton.get_settings().fused_step},
        "rows": [],
    }
    if builder is None:
        result["skipped"] = note
        write(result, args.out)
        print(markdown(result))
        return 0
    pairs: Dict[str, Dict[str, torch.nn.Module]] = {}
    for row in plan_rows(models, modes, precisions, passes):
        result["rows"].append(row)
        if time.perf_counter() > deadline:
            row["status"] = "skipped: time limit"
            continue
        try:
            if row["model"] not in pairs:
                pairs[row["model"]] = build_pair(builder, row["model"], device)
            run_row(row, pairs[row["model"]][row["variant"]], shapes[row["pass"]], device, deadline, warmup,
                    repeats, backend)
            row["status"] = "ok"
        except Exception as exc:  # one row's failure (e.g. out of memory) leaves the others measured
            row["status"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{row['model']} {row['pass']} {row['precision']} {row['mode']} {row['variant']}] "
              + (f"{row['ms']:.1f} ms" if "ms" in row else row["status"]), flush=True)
        write(result, args.out)
    write(result, args.out)
    print(markdown(result))
    failed = [r for r in result["rows"] if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
