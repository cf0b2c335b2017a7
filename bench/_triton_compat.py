"""Every private Triton API the codegen tools use, in one place.

:mod:`bench.codegen` compiles the package's kernels for a GPU on a machine
without one; :mod:`bench.gpu_kernels` reads what the GPU's own compiled
kernels report. Both need Triton internals that are not public and that move
between releases (this project meets Triton 3.6 on the GPU machine and 3.9 on
the CPU machines). Each is reached here, with a :class:`TritonInternalsError`
that names what moved, and nowhere else:

* ``triton.runtime.driver.set_active`` (and its ``_active``, to restore): a fake CUDA driver
  whose current target is ``GPUTarget("cuda", arch, 32)``;
* ``triton.runtime.jit.JITFunction._do_compile(self, key, signature, device,
  constexprs, options, attrs, warmup)`` and ``JITFunction.device_caches
  [device][0]`` (the kernel cache): compile exactly the specialization
  Triton computed at launch, keep the result and put a do-nothing kernel in
  the cache so that nothing is ever launched;
* ``CompiledKernel.asm["ptx"|"cubin"]``, ``.metadata`` (``shared``,
  ``num_warps``), ``.n_regs`` / ``.n_spills`` (set only once the kernel is
  loaded on a GPU);
* the ``cuobjdump`` Triton ships (``triton.knobs.nvidia.cuobjdump`` on 3.4+,
  else ``triton/backends/nvidia/bin``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional


class TritonInternalsError(RuntimeError):
    """A Triton internal these tools rely on is missing or changed."""


def _triton():
    import triton

    if getattr(getattr(triton, "knobs", None), "runtime", None) is not None:
        if getattr(triton.knobs.runtime, "interpret", False):
            raise TritonInternalsError(
                "Triton was imported with TRITON_INTERPRET=1 (the interpreter has no compiler): run the codegen "
                "tools in a process where TRITON_INTERPRET is unset before triton is imported")
    return triton


def triton_version() -> str:
    return _triton().__version__


def nvidia_tool(name: str) -> Optional[str]:
    """Path of ``ptxas`` or ``cuobjdump`` as Triton would use it, ``None`` if absent."""
    triton = _triton()
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    tool = getattr(knobs, name, None) if knobs is not None else None
    path = getattr(tool, "path", None) if tool is not None else None
    if path and os.path.exists(path):
        return path
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    return shutil.which(name)


def nvidia_backend_error() -> Optional[str]:
    """``None`` when Triton's NVIDIA backend can compile here (ptxas and cuobjdump
    present, backend importable), else why not (the reason the CI tests skip with)."""
    try:
        _triton()
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except TritonInternalsError as exc:
        return str(exc)
    except Exception as exc:  # no NVIDIA backend in this Triton build (e.g. macOS wheels)
        return f"Triton's NVIDIA backend does not import: {type(exc).__name__}: {exc}"
    for tool in ("ptxas", "cuobjdump"):
        if nvidia_tool(tool) is None:
            return f"Triton's NVIDIA backend has no {tool} (not shipped with this Triton, not on PATH)"
    return None


# ----------------------------------------------------------------------------
# Fake target and compile-without-launch
# ----------------------------------------------------------------------------


class FakeCudaDriver:
    """The three questions JITFunction.run asks the active driver."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):  # asked by some Triton versions' autotuner/benchmarks
        import torch

        return torch.device("cpu")


class _NoLaunch:
    """Stands in the kernel cache for a compiled kernel: ``run`` does nothing."""

    function = None
    packed_metadata = None

    def __init__(self, compiled):
        self.compiled = compiled

    def launch_metadata(self, *args, **kwargs):
        return None

    def run(self, *args, **kwargs):
        return None


@dataclass
class Compiled:
    """One kernel compiled at a launch: its name, Triton's signature (argument
    name -> type, ``"constexpr"`` for compile-time ones), the constexpr values,
    the specialization attributes (e.g. divisibility by 16), the options and the
    ``CompiledKernel``."""

    name: str
    signature: Dict[str, Any]
    constexprs: Dict[str, Any]
    attrs: Dict[Any, Any]
    num_warps: int
    kernel: Any
    launches: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


def _check_do_compile(jit_cls) -> None:
    fn = getattr(jit_cls, "_do_compile", None)
    if fn is None:
        raise TritonInternalsError(
            f"triton.runtime.jit.JITFunction has no _do_compile (Triton {triton_version()}): adapt "
            "bench/_triton_compat.compile_without_launch")
    params = list(inspect.signature(fn).parameters)
    needed = ["self", "key", "signature", "device", "constexprs", "options", "attrs"]
    if params[: len(needed)] != needed:
        raise TritonInternalsError(
            f"JITFunction._do_compile takes {params} in Triton {triton_version()}, expected {needed} first: "
            "adapt bench/_triton_compat.compile_without_launch")


def _constexpr_names(signature: Dict[str, Any], constexprs: Dict[Any, Any]) -> Dict[str, Any]:
    """Constexpr values by argument name (Triton keys them by argument path, a tuple of indices)."""
    names = list(signature)
    out = {}
    for path, value in constexprs.items():
        index = path[0] if isinstance(path, tuple) else path
        name = names[index] if isinstance(index, int) and index < len(names) else str(path)
        out[name] = getattr(value, "value", value)
    return out


@contextlib.contextmanager
def compile_without_launch(arch: int, records: List[Compiled],
                           launches: Optional[List[Compiled]] = None) -> Iterator[List[Compiled]]:
    """Within the block, every ``@triton.jit`` kernel launch (through the real
    binder and specialization, from CPU tensors) compiles for ``sm_<arch>``,
    appends a :class:`Compiled` to ``records`` and launches nothing; a repeated
    specialization counts a launch; ``launches``, if given, gets the record of
    every launch in order. Restores Triton on exit (the kernels'
    caches are cleared, so that no do-nothing kernel outlives the block)."""
    triton = _triton()
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if not hasattr(driver, "set_active") or not hasattr(driver, "_active"):
        raise TritonInternalsError(f"triton.runtime.driver has no set_active/_active (Triton "
                                   f"{triton.__version__}): adapt bench/_triton_compat.compile_without_launch")
    _check_do_compile(JITFunction)
    original = JITFunction._do_compile
    touched: List[Any] = []

    def _do_compile(self, key, signature, device, constexprs, options, attrs, *args, **kwargs):
        kernel = original(self, key, signature, device, constexprs, options, attrs, *args, **kwargs)
        if kernel is None:
            return None
        record = Compiled(self._fn_name.split(".")[-1], dict(signature), _constexpr_names(signature, constexprs),
                          dict(attrs), options.num_warps, kernel)
        records.append(record)
        stub = _NoLaunch(kernel)
        stub.record = record
        self.device_caches[device][0][key] = stub
        touched.append(self)
        return stub

    original_run = JITFunction.run

    def run(self, *args, **kwargs):
        result = original_run(self, *args, **kwargs)
        if isinstance(result, _NoLaunch):
            result.record.launches += 1
            if launches is not None:
                launches.append(result.record)
        return result

    # reset_active() would build the default driver, which fails without a GPU:
    # put back whatever was active (usually nothing yet) instead.
    previous = getattr(driver, "_active", None)
    driver.set_active(FakeCudaDriver(arch))
    JITFunction._do_compile = _do_compile
    JITFunction.run = run
    try:
        yield records
    finally:
        JITFunction._do_compile = original
        JITFunction.run = original_run
        driver._active = previous
        for fn in touched:
            fn.device_caches.clear()


# ----------------------------------------------------------------------------
# Reading a compiled kernel
# ----------------------------------------------------------------------------


def ptx(kernel) -> str:
    return kernel.asm["ptx"]


def shared_bytes(kernel) -> int:
    return int(getattr(kernel.metadata, "shared", 0) or 0)


def resource_usage(kernel) -> Dict[str, int]:
    """Registers per thread, stack frame, shared and local memory (bytes) of a
    compiled kernel, read by ``cuobjdump --dump-resource-usage`` from its cubin."""
    tool = nvidia_tool("cuobjdump")
    if tool is None:
        raise TritonInternalsError("no cuobjdump: Triton's NVIDIA backend is incomplete here")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out.stdout)
    if m is None:
        raise TritonInternalsError(f"cuobjdump --dump-resource-usage printed no REG/STACK/SHARED/LOCAL line: "
                                   f"{(out.stdout + out.stderr)[-400:]!r}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))


def loaded_kernels(jit_function) -> List[Any]:
    """The CompiledKernels a ``@triton.jit`` function holds in its caches after
    launches on a real GPU (``device_caches`` on Triton 3.x, ``cache`` on 2.x)."""
    fn = jit_function
    caches = getattr(fn, "device_caches", None)
    kernels: List[Any] = []
    if caches is not None:
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, (tuple, list)) else entry
            kernels += [k for k in cache.values() if hasattr(k, "asm")]
    else:
        for cache in getattr(fn, "cache", {}).values():
            kernels += [k for k in cache.values() if hasattr(k, "asm")]
    return kernels


def gpu_registers(kernel) -> Dict[str, Optional[int]]:
    """``n_regs`` and ``n_spills`` the driver reported when it loaded the kernel
    (Triton fills them at the first launch; ``None`` if never loaded)."""
    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
        kernel._init_handles()
    return {"regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None)}
