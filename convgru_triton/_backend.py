"""Which implementation runs a ConvGRU step: the fused Triton kernels or eager PyTorch.

Order of precedence: the ``backend`` argument of a module or function when it
is not ``"auto"``, then the ``backend`` setting (the environment variable
``CONVGRU_TRITON_BACKEND``, read at import, or ``override_settings(backend=...)``),
then the automatic rule: Triton for CUDA tensors when Triton imports, eager
PyTorch everywhere else (CPU tensors, machines without Triton such as macOS).

Forcing ``"triton"`` on CPU tensors is allowed only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which
is how the kernels are tested without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _settings

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "CONVGRU_TRITON_BACKEND"


class BackendChoice(NamedTuple):
    """The backend a ConvGRU will run with (``"torch"`` or ``"triton"``) and why.
    (A NamedTuple: torch.compile traces its creation; see _conv.ConvSpec.)"""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def check_backend_name(backend: str, argument: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {backend!r}")
    return backend


# Filled by the first call of triton_import_error(): "" when Triton works, else
# why not. A plain global rather than functools.lru_cache, which torch.compile
# warns about when it traces a module's forward into this function.
_triton_error: Optional[str] = None


# Run for real while torch.compile traces, its result taken as a constant: a
# traced read of the global would guard the graph on it, and the first call's
# write would then recompile the graph (TORCH_LOGS=recompiles:
# "_triton_error is None").
@torch.compiler.assume_constant_result
def triton_import_error() -> Optional[str]:
    """``None`` when Triton and the fused kernels import, else why not."""
    global _triton_error
    if _triton_error is None:
        try:
            import triton  # noqa: F401

            from .ops.gates import kernels  # noqa: F401

            _triton_error = ""
        except Exception as exc:  # ImportError, or a broken Triton install
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_error or None


def triton_available() -> bool:
    """True when the Triton kernels can be used on this machine."""
    return triton_import_error() is None


def _interpreter_enabled() -> bool:
    """``TRITON_INTERPRET`` was set when the package was imported (Triton reads
    it once, at its own import)."""
    return _settings.peek_settings().triton_interpret


def _requested(backend: str) -> tuple:
    check_backend_name(backend)
    if backend != "auto":
        return backend, f"backend={backend!r} was passed"
    settings = _settings.get_settings()  # raises for a bad CONVGRU_TRITON_BACKEND
    name = settings.backend
    if name != "auto":
        if settings.source("backend") == "override":
            return name, f"override_settings(backend={name!r}) is in force"
        return name, f"{ENV_VAR}={name} is set"
    return "auto", ""


def select_backend(device: torch.device, backend: str = "auto") -> BackendChoice:
    """The backend for tensors on ``device``; raises when a forced ``"triton"``
    cannot run there, rather than silently falling back."""
    device = torch.device(device)
    name, why = _requested(backend)
    if name == "torch":
        return BackendChoice("torch", f"forced: {why}")
    if name == "auto" and device.type != "cuda":
        return BackendChoice("torch", f"tensors are on {device.type}; the Triton kernels run only on CUDA")
    error = triton_import_error()
    if name == "triton":
        if error is not None:
            raise RuntimeError(f"the Triton backend was forced ({why}) but Triton cannot be used: {error}")
        if device.type != "cuda" and not _interpreter_enabled():
            raise RuntimeError(
                f"the Triton backend was forced ({why}) for tensors on {device}, but the Triton kernels "
                "need CUDA tensors; to run them on the CPU (slowly, for testing) set TRITON_INTERPRET=1 "
                "before triton is imported"
            )
        where = "on CUDA" if device.type == "cuda" else "on the CPU under the Triton interpreter"
        return BackendChoice("triton", f"forced: {why}; kernels run {where}")
    if error is not None:
        return BackendChoice("torch", f"Triton cannot be used ({error})")
    return BackendChoice("triton", "CUDA tensors and Triton is available")


def explain_backend(module: torch.nn.Module, device: Optional[torch.device] = None) -> BackendChoice:
    """Which backend ``module`` (a ConvGRU module of this package) will use, and why.

    Args:
        module: a ``ConvGRU*`` or ``ConvGRUCell*`` module.
        device: the device of the inputs; defaults to the device of the module's
            parameters.
    """
    if device is None:
        device = next(module.parameters()).device
    return select_backend(device, getattr(module, "backend", "auto"))
