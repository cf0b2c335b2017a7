"""Test set-up shared by every test module.

One suite for every machine. Tests take their device from the ``device``
fixture, never a device of their own:

* with a GPU, ``device`` is CUDA and the Triton kernels run compiled;
* without one, ``device`` is the CPU and the kernels run under the Triton
  interpreter, which this file switches on (``TRITON_INTERPRET=1``) before
  ``triton`` is first imported;
* without one and with ``TRITON_INTERPRET=0`` set by the caller (CI's second
  pass, ``.ci/run``), nothing can run the kernels: tests that need them are
  skipped with the reason, everything else runs. That pass catches tests that
  run the kernels without saying so, the way a GPU machine does (where CPU
  tensors cannot reach the compiled kernels either).

A test that needs the kernels says so with ``@pytest.mark.triton_kernels``; a
test parametrized with the Triton backend needs them by definition and is
treated the same way: by the suite's convention its parameter id is
``triton`` (``backend``, ``use_triton``, autocast's ``mode``; see
``needs_triton_kernels``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from convgru_triton import _backend  # noqa: E402  (after TRITON_INTERPRET: it may import triton)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _why_no_triton_kernels() -> Optional[str]:
    """``None`` when the Triton kernels can run on ``DEVICE`` in this session,
    else why not: the package's rule for a forced Triton backend
    (``_backend.select_backend``; test_suite_hygiene.py checks they agree)."""
    error = _backend.triton_import_error()
    if error is not None:
        return f"needs the Triton kernels; Triton cannot be used here: {error}"
    if DEVICE.type != "cuda" and not _backend._interpreter_enabled():
        return "needs the Triton kernels: no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET=0)"
    return None


#: Why the Triton kernels cannot run here, or ``None`` when they can.
NO_TRITON_KERNELS = _why_no_triton_kernels()

def needs_triton_kernels(item: pytest.Item) -> bool:
    """Whether a collected test runs the Triton kernels: it is marked
    ``triton_kernels``, or one of its parameters has the id ``triton`` (the id
    of the Triton backend wherever the suite parametrizes over backends)."""
    if item.get_closest_marker("triton_kernels") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "triton" in callspec.id.split("-")


def pytest_collection_modifyitems(config, items):
    if NO_TRITON_KERNELS is None:
        return
    skip = pytest.mark.skip(reason=NO_TRITON_KERNELS)
    for item in items:
        if needs_triton_kernels(item):
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device every test builds its tensors on (see the module docstring)."""
    return DEVICE


@pytest.fixture
def _settings_changes():
    """One stack for a test's changes of the settings (package_settings,
    environment_at_import), undone in reverse order however they interleave."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def package_settings(_settings_changes):
    """``package_settings(**changes)`` changes the package's settings until the
    test ends (``convgru_triton.override_settings``; calls stack, the last wins),
    and returns the settings in force. Tests change settings this way, never
    through ``os.environ``: the package reads the environment once, at import."""
    import convgru_triton

    return lambda **changes: _settings_changes.enter_context(convgru_triton.override_settings(**changes))


@contextlib.contextmanager
def simulated_environment(**environ):
    """The package's settings inside the block as if the environment had held
    these variables (and no other ``CONVGRU_TRITON_*`` one; ``TRITON_INTERPRET``
    and ``XDG_CACHE_HOME`` as they were unless given) when the package was
    imported, a bad value raising at the first call. For in-process tests of
    what the environment does; tests in a subprocess check the real import."""
    from convgru_triton import _settings

    saved = (_settings._current, _settings._environment_error)
    facts = {"TRITON_INTERPRET": "1" if saved[0].triton_interpret else "0"}
    if saved[0].xdg_cache_home is not None:
        facts["XDG_CACHE_HOME"] = saved[0].xdg_cache_home
    _settings._current, _settings._environment_error = _settings._from_environment({**facts, **environ})
    _settings._changed(saved[0])
    try:
        yield _settings._current
    finally:
        inner = _settings._current
        _settings._current, _settings._environment_error = saved
        _settings._changed(inner)


@pytest.fixture
def environment_at_import(_settings_changes):
    """``environment_at_import(NAME=value, ...)``: :func:`simulated_environment`
    until the test ends (a later call replaces an earlier one's variables)."""
    return lambda **environ: _settings_changes.enter_context(simulated_environment(**environ))


@pytest.fixture
def deterministic(monkeypatch):
    """The settings docs/errors.md names for a bitwise deterministic layer
    (cuDNN picks deterministic algorithms, e.g. for the weight gradient of a
    convolution, whose default algorithms add with atomics), restored after.
    CUBLAS_WORKSPACE_CONFIG: PyTorch raises for a cuBLAS call (gradcheck's dot
    products) under deterministic mode without it; it is read at each call."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _one_thread_no_tf32():
    """Tiny CPU convolutions that need autograd run ~100x slower with several
    OpenMP threads than with one on a small machine: run the tests on one
    thread. On CUDA keep TF32 off, so float32 results can be compared at 1e-5.
    (Saved and restored by hand: pytest's monkeypatch fails to restore
    torch.backends.cuda.matmul.allow_tf32, a property, with pytest 9.2.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Fill every buffer the fused kernels and the sequence operator write with
    NaN before they write it, so an element left unwritten fails the comparison."""
    from convgru_triton.ops.gates import kernels as conv_gru_cell
    from convgru_triton.ops.sequence import op as conv_gru

    for module, allocator in ((conv_gru_cell, "_empty"), (conv_gru, "_empty_frames"), (conv_gru, "_empty_frame")):
        allocate = getattr(module, allocator)

        def poisoned(*args, _allocate=allocate, **kwargs):
            return _allocate(*args, **kwargs).fill_(float("nan"))

        monkeypatch.setattr(module, allocator, poisoned)


def compile_for_sm90(script: str, what: str) -> list:
    """Run ``script`` (Python source; argv[1] is the repository root) in a
    subprocess without the Triton interpreter, where it compiles kernels for a
    fake sm_90 target and prints a JSON line: ``{"kernels": [...]}``, or
    ``{"skip": reason}`` where this Triton cannot. Returns the kernels' list;
    fails naming ``what`` when the script does, skips with its reason. One
    runner for the fused step's codegen tests (forward, backward, with input)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script, root], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"compiling {what} for sm_90 failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["kernels"]
