"""Moving digits: forecast the next 10 frames of bouncing handwritten digits.

An encoder-forecaster ConvGRU in the style of Shi et al. (2015, "Convolutional
LSTM Network: A Machine Learning Approach for Precipitation Nowcasting"):

* frames are cut into 4x4 patches (64x64x1 -> 16x16x16), as Shi et al. did
  for Moving MNIST;
* an encoder ConvGRU (2 layers) reads the 10 input frames; its final states
  start a forecaster ConvGRU (2 layers), which unrolls 10 steps, each reading
  the frame it predicted before (the last input frame first);
* a 1x1 convolution turns every forecaster output back into a frame of patches.

The digits are real handwritten ones: scikit-learn's bundled 8x8 digits
(1797 images, nothing is downloaded), upscaled and bouncing on a canvas.
Sequences are generated on the fly from a fixed seed; training and held-out
sequences use disjoint sets of digit images.

Run (CPU, a few minutes):

    python examples/moving_digits/train.py

Larger, on a GPU, with the fused Triton kernels:

    python examples/moving_digits/train.py --device cuda --backend triton --hidden 128 --steps 5000 --batch-size 32 --lr 1e-3

Writes to --out (default examples/moving_digits/out/, not tracked by git):
checkpoint.pt, predictions.png (input / target / predicted frames), loss.png
(training loss), metrics.png and metrics.json (MSE and SSIM per predicted
frame, model vs copying the last input frame). The committed pictures in
examples/moving_digits/results/ are rewritten only by asking for them:
--out examples/moving_digits/results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import convgru_triton
except ImportError:  # run from a clone without installing: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import convgru_triton

from convgru_triton import ConvGRU2d

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


def load_digit_images(size: int) -> torch.Tensor:
    """scikit-learn's 1797 handwritten 8x8 digits, values in [0, 1], upscaled to
    ``size`` x ``size`` (bilinear): a (1797, size, size) float tensor."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    up = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return up[:, 0].clamp_(0.0, 1.0)


def split_digits(images: torch.Tensor, held_out: float = 0.2):
    """Disjoint training and held-out digit images (a fixed split)."""
    n_test = int(len(images) * held_out)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
    return images[order[n_test:]], images[order[:n_test]]


def make_sequences(
    digits: torch.Tensor, count: int, frames: int, canvas: int, num_digits: int, generator: torch.Generator,
    min_speed: float = 2.0, max_speed: float = 4.0,
) -> torch.Tensor:
    """``count`` sequences of ``num_digits`` digits bouncing off the canvas walls.

    Each digit starts at a random position with a random direction and a speed
    in [min_speed, max_speed] pixels per frame; overlapping digits combine with
    max. Returns (frames, count, 1, canvas, canvas) in [0, 1].
    """
    size = digits.shape[-1]
    limit = float(canvas - size)
    which = torch.randint(len(digits), (count, num_digits), generator=generator)
    pos = torch.rand(count, num_digits, 2, generator=generator) * limit
    angle = torch.rand(count, num_digits, generator=generator) * 2 * math.pi
    speed = min_speed + torch.rand(count, num_digits, generator=generator) * (max_speed - min_speed)
    vel = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1) * speed[..., None]
    out = torch.zeros(frames, count, 1, canvas, canvas)
    for t in range(frames):
        corner = pos.round().long()
        for i in range(count):
            for d in range(num_digits):
                y, x = corner[i, d].tolist()
                region = out[t, i, 0, y : y + size, x : x + size]
                torch.maximum(region, digits[which[i, d]], out=region)
        pos = pos + vel
        # Bounce: reflect the position and the velocity at each wall.
        low, high = pos < 0, pos > limit
        pos = torch.where(low, -pos, torch.where(high, 2 * limit - pos, pos))
        vel = torch.where(low | high, -vel, vel)
    return out


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


class EncoderForecaster(nn.Module):
    """Shi et al.'s encoder-forecaster with ConvGRUs over frames cut into patches.

    The encoder reads the input frames; the forecaster starts from the encoder's
    final states (every layer) and unrolls one step per future frame, reading
    the frame it predicted last (the last input frame at first). A 1x1
    convolution maps the forecaster's output to the logits of a frame's patches.

    forward(frames (T_in, N, 1, H, W), future) -> (future, N, 1, H, W) in [0, 1]
    (logits instead with ``logits=True``).
    """

    def __init__(self, hidden: int = 32, layers: int = 2, patch: int = 4, kernel_size: int = 3,
                 backend: str = "auto") -> None:
        super().__init__()
        self.patch = patch
        channels = patch * patch
        self.encoder = ConvGRU2d(channels, hidden, kernel_size, num_layers=layers, backend=backend)
        self.forecaster = ConvGRU2d(channels, hidden, kernel_size, num_layers=layers, backend=backend)
        self.head = nn.Conv2d(hidden, channels, 1)
        # Start from the background (ink covers a few percent of a frame): the
        # first steps then learn the digits, not the mean intensity.
        nn.init.constant_(self.head.bias, -3.0)

    def forward(self, frames: torch.Tensor, future: int, logits: bool = False) -> torch.Tensor:
        steps, batch = frames.shape[:2]
        patches = F.pixel_unshuffle(frames.flatten(0, 1), self.patch).unflatten(0, (steps, batch))
        _, states = self.encoder(patches)
        frame, outputs = patches[-1], []
        for _ in range(future):
            out, states = self.forecaster(frame[None], states)
            out = self.head(out[0])
            frame = torch.sigmoid(out)
            outputs.append(out)
        out = F.pixel_shuffle(torch.stack(outputs).flatten(0, 1), self.patch).unflatten(0, (future, batch))
        return out if logits else torch.sigmoid(out)


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


#: Images per float64 convolution in :func:`ssim` (bounds its memory).
SSIM_IMAGES_PER_CHUNK = 64


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al., 2004) of single-channel images (..., 1, H, W), one value
    per image: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, the mean
    of the SSIM map over the valid (unpadded) positions."""
    lead = a.shape[:-3]
    a = a.reshape(-1, 1, *a.shape[-2:])
    b = b.reshape(-1, 1, *b.shape[-2:])
    w = _gaussian_window(dtype=torch.float64, device=a.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    # A float64 convolution on the CPU unfolds its input (121 values per output
    # position for this window): 64 images at a time keep that under 200 MB.
    for start in range(0, a.shape[0], SSIM_IMAGES_PER_CHUNK):
        x = a[start : start + SSIM_IMAGES_PER_CHUNK].double()
        y = b[start : start + SSIM_IMAGES_PER_CHUNK].double()
        mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
        var_x = F.conv2d(x * x, w) - mu_x * mu_x
        var_y = F.conv2d(y * y, w) - mu_y * mu_y
        cov = F.conv2d(x * y, w) - mu_x * mu_y
        num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
        den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
        values.append((num / den).mean(dim=(-3, -2, -1)))
    return torch.cat(values).reshape(lead).float()


def per_sample_metrics(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """MSE and SSIM of (T, N, 1, H, W) predictions, one value per frame and sample: (T, N) each."""
    return {"mse": ((pred - target) ** 2).mean(dim=(2, 3, 4)), "ssim": ssim(pred, target)}


@torch.no_grad()
def evaluate(model: nn.Module, sequences: torch.Tensor, frames_in: int, batch_size: int, device) -> Dict:
    """Per-frame MSE and SSIM of the model and of copying the last input frame,
    averaged over the held-out sequences. Predicted and scored ``batch_size``
    sequences at a time, so that memory does not grow with their number."""
    model.eval()
    preds, scores = [], {"model": [], "copy_last": []}
    for start in range(0, sequences.shape[1], batch_size):
        chunk = sequences[:, start : start + batch_size]
        pred = model(chunk[:frames_in].to(device), sequences.shape[0] - frames_in).float().cpu()
        target = chunk[frames_in:]
        copy_last = chunk[frames_in - 1 : frames_in].expand_as(target)
        scores["model"].append(per_sample_metrics(pred, target))
        scores["copy_last"].append(per_sample_metrics(copy_last, target))
        preds.append(pred)
    model.train()
    result = {who: {key: torch.cat([s[key] for s in chunks], dim=1).mean(dim=1).tolist() for key in ("mse", "ssim")}
              for who, chunks in scores.items()}
    result["pred"] = torch.cat(preds, dim=1)
    return result


# ----------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------


def save_prediction_grid(path: Path, sequences: torch.Tensor, pred: torch.Tensor, frames_in: int, samples: int = 2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames_out = pred.shape[0]
    cols = max(frames_in, frames_out)
    rows = 3 * samples
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.95), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for s in range(samples):
        strips = [
            ("input", sequences[:frames_in, s], 1),
            ("target", sequences[frames_in:, s], frames_in + 1),
            ("predicted", pred[:, s], frames_in + 1),
        ]
        for r, (name, frames, first) in enumerate(strips):
            row = 3 * s + r
            for t in range(frames.shape[0]):
                ax = axes[row, t]
                ax.imshow(frames[t, 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_title(f"t={first + t}", fontsize=6, pad=2)
            axes[row, 0].text(-0.15, 0.5, name, transform=axes[row, 0].transAxes, ha="right", va="center",
                              fontsize=8)
    fig.suptitle("Moving digits: held-out sequences, 10 input frames -> 10 predicted", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.93, bottom=0.01, wspace=0.05, hspace=0.35)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_loss_curve(path: Path, losses: List[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    window = max(1, len(losses) // 25)
    if len(losses) >= window:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(range(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (binary cross-entropy)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_metric_curves(path: Path, metrics: Dict, frames_in: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in ((axes[0], "mse", "MSE (lower is better)"), (axes[1], "ssim", "SSIM (higher is better)")):
        for who, style in (("model", "-o"), ("copy_last", "--s")):
            values = metrics[who][key]
            ax.plot(range(frames_in + 1, frames_in + 1 + len(values)), values, style, ms=3,
                    label="ConvGRU" if who == "model" else "copy last frame")
        ax.set_xlabel("predicted frame")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=800, help="training steps (batches)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32, help="hidden channels of every ConvGRU layer")
    p.add_argument("--layers", type=int, default=2, help="ConvGRU layers in the encoder and the forecaster")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 5%%)")
    p.add_argument("--canvas", type=int, default=64, help="canvas size in pixels")
    p.add_argument("--digit-size", type=int, default=16, help="size of an upscaled digit in pixels")
    p.add_argument("--num-digits", type=int, default=2, help="digits per sequence")
    p.add_argument("--frames-in", type=int, default=10)
    p.add_argument("--frames-out", type=int, default=10)
    p.add_argument("--patch", type=int, default=4, help="frames are cut into patch x patch patches")
    p.add_argument("--eval-samples", type=int, default=256, help="held-out sequences for the metrics")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="convgru_triton backend: 'triton' runs the fused kernels (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "out",
                   help="output folder (the default is not tracked by git; results/ holds the committed pictures)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    from tqdm import tqdm

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.canvas % args.patch:
        raise SystemExit(f"--canvas ({args.canvas}) must be a multiple of --patch ({args.patch})")
    if args.digit_size > args.canvas:
        raise SystemExit(f"--digit-size ({args.digit_size}) must fit the canvas ({args.canvas})")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    train_digits, test_digits = split_digits(load_digit_images(args.digit_size))
    frames = args.frames_in + args.frames_out
    data_gen = torch.Generator().manual_seed(args.seed)
    held_out = make_sequences(test_digits, args.eval_samples, frames, args.canvas, args.num_digits,
                              torch.Generator().manual_seed(10_000 + args.seed))

    model = EncoderForecaster(args.hidden, args.layers, args.patch, backend=args.backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / max(1, args.steps))))
    if not args.quiet:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"device {device}, {convgru_triton.explain_backend(model.encoder, device)}; {n_params} parameters")

    losses: List[float] = []
    bar = tqdm(range(args.steps), desc="training", disable=args.quiet, dynamic_ncols=True)
    for _ in bar:
        seq = make_sequences(train_digits, args.batch_size, frames, args.canvas, args.num_digits, data_gen).to(device)
        logits = model(seq[: args.frames_in], args.frames_out, logits=True)
        loss = F.binary_cross_entropy_with_logits(logits, seq[args.frames_in :])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.perf_counter() - started

    result = evaluate(model, held_out, args.frames_in, 64, device)
    pred = result.pop("pred")
    model_m, base_m = result["model"], result["copy_last"]
    summary = {
        "mse_model": sum(model_m["mse"]) / len(model_m["mse"]),
        "mse_copy_last": sum(base_m["mse"]) / len(base_m["mse"]),
        "ssim_model": sum(model_m["ssim"]) / len(model_m["ssim"]),
        "ssim_copy_last": sum(base_m["ssim"]) / len(base_m["ssim"]),
    }
    torch.save({"model": model.state_dict(), "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()}},
               args.out / "checkpoint.pt")
    save_prediction_grid(args.out / "predictions.png", held_out, pred, args.frames_in)
    save_loss_curve(args.out / "loss.png", losses)
    save_metric_curves(args.out / "metrics.png", result, args.frames_in)
    report = {"per_frame": result, "mean": summary, "final_loss": losses[-1] if losses else None,
              "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1),
              "device": str(device), "torch": torch.__version__}
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2))

    if not args.quiet:
        print(f"\nheld-out: {args.eval_samples} sequences of unseen digit images")
        print(f"{'frame':>5} {'MSE model':>10} {'MSE copy':>10} {'SSIM model':>11} {'SSIM copy':>10}")
        for t in range(args.frames_out):
            print(f"{args.frames_in + 1 + t:>5} {model_m['mse'][t]:>10.4f} {base_m['mse'][t]:>10.4f} "
                  f"{model_m['ssim'][t]:>11.3f} {base_m['ssim'][t]:>10.3f}")
        print(f"{'mean':>5} {summary['mse_model']:>10.4f} {summary['mse_copy_last']:>10.4f} "
              f"{summary['ssim_model']:>11.3f} {summary['ssim_copy_last']:>10.3f}")
        verdict = "beats" if summary["mse_model"] < summary["mse_copy_last"] else "does NOT beat"
        print(f"the ConvGRU {verdict} copy-last-frame on MSE; "
              f"{report['total_seconds']:.0f} s in all; wrote {args.out}/"
              "{checkpoint.pt, predictions.png, loss.png, metrics.png, metrics.json}")
    return report


if __name__ == "__main__":
    main()
