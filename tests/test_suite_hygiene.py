"""One suite for every device: tests take their device from the ``device``
fixture of conftest.py, never one of their own.

A test written and run only on a CPU can fail on a GPU: a tensor built on a
hard-coded CPU and handed to the CUDA path, a test that assumes the Triton
interpreter (33 such tests failed on an H200). Two checks catch these without
a GPU:

* CI's second pass runs the suite with the interpreter off (``.ci/run``,
  ``TRITON_INTERPRET=0``), where a test that runs the Triton kernels without
  saying so fails as it would on a GPU (conftest.py);
* this file reads every test module and fails on a device written into a test
  (``"cpu"``, ``"cuda"``, ``"cuda:0"`` as a device: ``torch.device("cpu")``,
  ``device="cuda"``, ``.to("cpu")``, ``.cuda()``) outside ``ALLOWED``, where
  each exception says why the test is about that device.

``"meta"`` is not flagged: meta tensors hold no data, a test uses them on
every machine alike. Comparisons (``device.type == "cuda"``) and bringing a
result back for a comparison (``.cpu()``) are not flagged either.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Dict, List, NamedTuple, Tuple

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
DEVICE_LITERAL = re.compile(r"^(cpu|cuda(:\d+)?)$")

# (file, top-level function or class, or "<module>") -> why it names a device.
ALLOWED: Dict[Tuple[str, str], str] = {
    ("conftest.py", "<module>"): "the one place the suite's device is chosen",
    ("test_tuning.py", "<module>"): "registry keys (GPU, NOT_CUDA): no tensor is made on them",
    ("test_plans.py", "test_forced_triton_rechecks_the_interpreter"):
        "a plan for Triton on CPU tensors, which only the interpreter can run: by definition on the CPU",
    ("test_plans.py", "test_autocast_check_sees_every_device_type"): "about autocast's device types",
    ("test_backend.py", "test_auto_uses_torch_on_cpu"): "the backend rule for CPU tensors (no tensor is made)",
    ("test_backend.py", "test_auto_uses_triton_on_cuda"): "the backend rule for CUDA tensors (no tensor is made)",
    ("test_backend.py", "test_backend_setting_forces_backend"):
        "a bad CONVGRU_TRITON_BACKEND raises before the device matters",
    ("test_backend.py", "test_bad_backend_name"): "a bad backend name raises before the device matters",
    ("test_bench_baselines.py", "test_providers_compute_the_same_function"):
        "the benchmark's eager providers compared on the CPU, as CI runs the harness",
    ("test_bench_baselines.py", "test_report_gpu_memory_and_targets"): "a synthetic report of a GPU run (strings)",
    ("test_bench_baselines.py", "test_report_never_mixes_cpu_and_gpu"): "synthetic reports of both kinds (strings)",
    ("test_bench_gpu_check.py", "test_uses_tf32_follows_the_device_and_the_settings"):
        "the TF32 rule per device type (no tensor is made)",
    ("test_bench_fused.py", "test_ours_fused_says_why_it_cannot_run"):
        "why ours-fused cannot run on CPU tensors (the reason for the CPU; no tensor is made)",
    ("test_internal_layout.py", "test_policy_default_and_override"):
        "the layout policy's rule per device type (no tensor is made)",
    ("test_bench_sequence.py", "test_sequence_vs_steps_tiny"): "a smoke run of bench/sequence.py on the CPU",
    ("test_cuda_graph_safety.py", "test_the_mode_catches_host_reads"):
        "the host-read detector's own test: a copy to the CPU is one of the reads it must catch",
    ("test_deploy.py", "test_meta_under_autocast_context"): "a CPU autocast region around meta tensors",
    ("test_numerics.py", "<module>"): "also a script (the offset checks run it in a subprocess), without fixtures",
}

# Tests outside this change that still pick a device of their own, each with
# what to do; listed (rather than failing CI) until their owners take the
# fixture's device, and checked like ALLOWED for staleness. Not exceptions.
KNOWN_VIOLATIONS: Dict[Tuple[str, str], str] = {}


class Finding(NamedTuple):
    file: str
    scope: str
    line: int
    what: str


def _is_device_literal(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and bool(DEVICE_LITERAL.match(node.value))


def _names_device(node: ast.AST) -> bool:
    """A device literal anywhere in the expression (``"cuda" if ... else "cpu"``)."""
    return any(_is_device_literal(n) for n in ast.walk(node))


def _is_torch_device(func: ast.AST) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "device" and isinstance(func.value, ast.Name)
            and func.value.id == "torch")


def _findings_in_call(call: ast.Call) -> List[str]:
    found = []
    func = call.func
    if _is_torch_device(func) and any(_names_device(a) for a in call.args):
        found.append("torch.device(...) of a literal")
    for kw in call.keywords:
        if kw.arg in ("device", "device_type") and _names_device(kw.value):
            found.append("device=<literal>")
    if isinstance(func, ast.Attribute) and func.attr == "to" and any(_names_device(a) for a in call.args):
        found.append(".to(<literal>)")
    elif not _is_torch_device(func) and any(_is_device_literal(a) for a in call.args):
        # A device handed to a helper (workloads.make_inputs(w, "cpu")) or a
        # device type (torch.autocast("cpu"), which does nothing for CUDA tensors).
        found.append("a device literal as an argument")
    if isinstance(func, ast.Attribute) and func.attr == "cuda" and not (
            isinstance(func.value, ast.Name) and func.value.id == "torch"):
        found.append(".cuda()")
    return found


def _assigned_device(node: ast.AST) -> bool:
    """``DEVICE = "cuda" if ... else "cpu"``, ``device = "cpu"``: a device of the test's own."""
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        return node.value is not None and any(n.lower() in ("device", "dev") for n in names) and \
            _names_device(node.value)
    return False


def scan(source: str, file: str) -> List[Finding]:
    """Every place ``source`` names a device, with its top-level scope."""
    tree = ast.parse(source, filename=file)
    findings = []
    for top in tree.body:
        scope = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else "<module>"
        for node in ast.walk(top):
            if isinstance(node, ast.Call):
                findings += [Finding(file, scope, node.lineno, what) for what in _findings_in_call(node)]
            elif _assigned_device(node):
                findings.append(Finding(file, scope, node.lineno, "a device variable set from a literal"))
    return findings


def _test_files() -> List[str]:
    return sorted(name for name in os.listdir(TESTS)
                  if name.endswith(".py") and (name.startswith("test_") or name == "conftest.py"))


def _scan_suite() -> List[Finding]:
    findings = []
    for name in _test_files():
        with open(os.path.join(TESTS, name), encoding="utf-8") as f:
            findings += scan(f.read(), name)
    return findings


def test_no_test_names_its_own_device():
    bad = [f for f in _scan_suite() if (f.file, f.scope) not in ALLOWED and (f.file, f.scope) not in KNOWN_VIOLATIONS]
    assert not bad, (
        "tests that name a device instead of taking the `device` fixture (conftest.py); use the fixture, or, "
        "for a test about one device, add it to ALLOWED with the reason:\n"
        + "\n".join(f"  {f.file}:{f.line} in {f.scope}: {f.what}" for f in bad)
    )


def test_every_allowed_exception_is_still_needed():
    """An exception whose test names no device (or does not exist) is removed
    from ALLOWED (a fixed violation from KNOWN_VIOLATIONS), so that the lists
    stay the lists of device-specific tests and of work left."""
    used = {(f.file, f.scope) for f in _scan_suite()}
    stale = sorted((set(ALLOWED) | set(KNOWN_VIOLATIONS)) - used)
    assert not stale, f"ALLOWED / KNOWN_VIOLATIONS entries that match nothing: {stale}"


@pytest.mark.parametrize("snippet, expected", [
    ('x = torch.randn(3, device="cpu")', ["device=<literal>"]),
    ('x = torch.zeros(3, device="cuda:0")', ["device=<literal>"]),
    ('d = torch.device("cuda" if torch.cuda.is_available() else "cpu")', ["torch.device(...) of a literal"]),
    ('DEVICE = "cuda" if torch.cuda.is_available() else "cpu"', ["a device variable set from a literal"]),
    ('y = x.to("cpu")', [".to(<literal>)"]),
    ('y = x.to("cuda", torch.float16)', [".to(<literal>)"]),
    ('y = x.cuda()', [".cuda()"]),
    ('def test_a(device):\n    x = torch.randn(3, device=device).to(device, torch.float64)', []),
    ('x = torch.empty(3, device="meta")', []),
    ('ok = torch.cuda.is_available() and device.type == "cuda"', []),
    ('z = out.cpu()', []),
    ('m = Model(backend="cuda")  # an invalid backend name, not a device', []),
    ('m = workloads.make_inputs(w, "cpu", torch.float32)', ["a device literal as an argument"]),
    ('with torch.autocast("cuda", dtype=torch.float16):\n    pass', ["a device literal as an argument"]),
    ('with torch.autocast(device_type="cpu"):\n    pass', ["device=<literal>"]),
    ('with torch.autocast(device.type):\n    pass', []),
])
def test_scanner_finds_named_devices(snippet, expected):
    """The scanner itself: each way of naming a device is found, the fixture's
    device, meta tensors, comparisons and results brought back are not."""
    assert [f.what for f in scan(snippet, "snippet.py")] == expected


def test_scanner_reports_the_top_level_scope():
    source = 'def test_a():\n    def inner():\n        return torch.ones(1, device="cpu")\n    return inner()\n'
    assert scan(source, "t.py") == [Finding("t.py", "test_a", 3, "device=<literal>")]


# ----------------------------------------------------------------------------
# conftest.py's rule for tests that need the Triton kernels
# ----------------------------------------------------------------------------


def test_conftest_agrees_with_the_package_on_where_the_kernels_run():
    """The skip rule (NO_TRITON_KERNELS) is the package's: a forced Triton
    backend raises on the session's device exactly when the rule skips."""
    import conftest
    from convgru_triton._backend import select_backend

    try:
        select_backend(conftest.DEVICE, "triton")
        runs = True
    except RuntimeError:
        runs = False
    assert runs == (conftest.NO_TRITON_KERNELS is None), conftest.NO_TRITON_KERNELS


class _Item:
    """What ``needs_triton_kernels`` reads of a collected test."""

    def __init__(self, nodeid, marked=False):
        self.nodeid, self._marked = nodeid, marked
        if "[" in nodeid:
            self.callspec = type("CallSpec", (), {"id": nodeid.split("[", 1)[1].rstrip("]")})()

    def get_closest_marker(self, name):
        return object() if self._marked and name == "triton_kernels" else None


def test_needs_triton_kernels():
    from conftest import needs_triton_kernels

    assert needs_triton_kernels(_Item("tests/test_x.py::test_a", marked=True))
    assert needs_triton_kernels(_Item("tests/test_x.py::test_a[2-triton-True]"))
    assert needs_triton_kernels(_Item("tests/test_x.py::test_a[triton-float16-1d]"))
    assert not needs_triton_kernels(_Item("tests/test_x.py::test_a[2-torch-True]"))
    assert not needs_triton_kernels(_Item("tests/test_x.py::test_a[gru_reset_gate_fwd]"))
    assert not needs_triton_kernels(_Item("tests/test_x.py::test_a"))
