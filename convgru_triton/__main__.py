"""``python -m convgru_triton``: what a bug report needs to say about this setup.

Prints the versions (package, torch, Triton, Python, CUDA, cuDNN), the GPU,
every setting in force with where it came from (default, environment or
``override_settings``), the tuning files that would be consulted, and for a
RAFT-sized ``SepConvGRUCell2d`` and ``ConvGRUCell2d`` the backend, the step
path and the memory format that would run here, each with its reason.
Exits 0, also without a GPU or without Triton; a bad environment variable is
reported, not raised.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List

import torch

from . import __version__, _backend, _plan, _settings, _tuning

# RAFT's update cells (princeton-vl/RAFT): RAFT-large's SepConvGRU, hidden 128,
# input 128 + 128, on the 1/8-resolution map of a 368x496 crop (46x62);
# RAFT-small's ConvGRU, hidden 96, input 82 + 64, 3x3.
_CELLS = (
    ("SepConvGRUCell2d(256, 128), RAFT-large", 128, ((1, 5), (5, 1)), (46, 62)),
    ("ConvGRUCell2d(146, 96, 3), RAFT-small", 96, ((3, 3),), (46, 62)),
)


def report() -> str:
    lines: List[str] = ["convgru_triton setup", ""]
    lines.append(f"convgru_triton  {__version__} ({os.path.dirname(os.path.abspath(__file__))})")
    lines.append(f"torch           {torch.__version__}")
    error = _backend.triton_import_error()
    if error is None:
        import triton

        lines.append(f"triton          {triton.__version__}")
    else:
        lines.append(f"triton          unavailable: {error}")
    lines.append(f"python          {platform.python_version()} ({sys.executable})")
    lines.append(f"platform        {platform.platform()}")
    lines.append(f"CUDA (torch)    {torch.version.cuda or 'none (CPU build)'}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.append(f"cuDNN           {cudnn or 'none'}")
    cuda = torch.cuda.is_available()
    if cuda:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        lines.append(f"GPU             {torch.cuda.get_device_name(index)} (sm_{major}{minor}, device {index} "
                     f"of {torch.cuda.device_count()})")
    else:
        lines.append("GPU             none: CUDA is not available to torch")
    lines += ["", "settings (value, source: default | environment | override)"]
    for name, (value, source) in _settings.describe().items():
        lines.append(f"  {name:15s} {value!s:14s} {source}   [{_settings.environment_variable(name)}]")
    bad = _settings.environment_error()
    if bad is not None:
        lines.append(f"  ERROR: {bad}")
    settings = _settings.peek_settings()
    lines.append(f"  triton interpreter: {'on' if settings.triton_interpret else 'off'} (TRITON_INTERPRET at import)")
    device = torch.device("cuda") if cuda else torch.device("cpu")
    lines += ["", "tuning files"]
    key = _tuning._device_key(device) if cuda else None
    if key is None:
        lines.append("  none consulted: no CUDA device (launches use the built-in defaults)")
    else:
        for origin, path in _tuning.source_paths(key):
            lines.append(f"  {origin:15s} {path}  [{'in use' if os.path.exists(path) else 'absent'}]")
    lines += ["", f"what a cell step would run here (eager, {device.type})"]
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    try:
        for title, hidden, kernels, spatial in _CELLS:
            for dtype in dtypes:
                lines.append(f"  {title}, {str(dtype).replace('torch.', '')}:")
                for i, kernel in enumerate(kernels):
                    facts = _plan.explain(device, dtype, kernel, hidden, spatial)
                    if i == 0:
                        lines.append("    backend: {} ({})".format(*facts["backend"]))
                        lines.append("    memory format: {} ({})".format(*facts["memory format"]))
                    for direction, (path, why) in facts["step path"].items():
                        lines.append(f"    step path, {kernel[0]}x{kernel[1]} kernel, {direction}: {path} ({why})")
    except ValueError as exc:  # a bad setting: every call would raise it
        lines.append(f"  cannot say: every call raises: {exc}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convgru_triton", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
