"""What every result file says about where it came from: device, versions, commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch


def _git(*args) -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def convgru_machine_info(device) -> dict:
    """Device (CPU model or GPU name), torch/triton/CUDA versions, commit id (``$COMMIT``
    or ``git rev-parse HEAD``) and whether tracked files had uncommitted changes."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # the package works without Triton
        triton_version = f"not importable ({type(exc).__name__})"
    commit = os.environ.get("COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    dirty = False if os.environ.get("COMMIT") else bool(_git("status", "--porcelain", "--untracked-files=no"))
    info = {
        "device": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": _load_average(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "commit": commit,
        "dirty": dirty,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
