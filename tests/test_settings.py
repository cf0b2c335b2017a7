"""The package's settings (``convgru_triton/_settings.py``): read from the
environment once, at import, by that one module; changed at run time only by
``convgru_triton.override_settings``; a bad environment value breaks no import
and raises at the first call, naming the variable, the values it takes and
the value given."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import convgru_triton
from convgru_triton import _settings, _tuning

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO_ROOT, "convgru_triton")
ENVIRONMENT_READ = re.compile(r"\benviron\b|\bgetenv\b|\bputenv\b|\bunsetenv\b")


def test_only_the_settings_module_reads_the_environment():
    """Every other module asks _settings: the environment is read once, at
    import, in one place (a read elsewhere would bypass override_settings)."""
    readers = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, REPO_ROOT)
            if rel == os.path.join("convgru_triton", "_settings.py"):
                continue
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if ENVIRONMENT_READ.search(line):
                        readers.append(f"{rel}:{number}: {line.strip()}")
    assert not readers, "only convgru_triton/_settings.py may read the environment:\n" + "\n".join(readers)


def test_the_check_finds_what_it_looks_for():
    for line in ('x = os.environ.get("A")', "os.getenv('A')", "from os import environ", "os.putenv('A', '1')"):
        assert ENVIRONMENT_READ.search(line), line
    for line in ("the environment is read once", "environment_error()"):
        assert not ENVIRONMENT_READ.search(line), line


# --- a bad value in the environment: the import works, the first call raises --

_FIRST_CALL = """
import torch
import convgru_triton
print("IMPORTED")
try:
    convgru_triton.ConvGRU2d(2, 3, 3, backend="torch")(torch.randn(2, 1, 2, 4, 5))
except ValueError as e:
    print("ERROR:", e)
else:
    print("NO ERROR")
with convgru_triton.override_settings(**{setting!r: {good!r}}):  # an override of the setting lifts the error
    convgru_triton.ConvGRU2d(2, 3, 3, backend="torch")(torch.randn(2, 1, 2, 4, 5))
print("OVERRIDDEN")
"""


@pytest.mark.parametrize("variable, setting, bad, good, values", [
    ("CONVGRU_TRITON_LAYOUT", "layout", "nhwc", "keep", "'auto', 'channels_last', 'keep'"),
    ("CONVGRU_TRITON_FUSED_STEP", "fused_step", "yes", "0", "'auto', '1', '0'"),
    ("CONVGRU_TRITON_BACKEND", "backend", "gpu", "torch", "'auto', 'torch', 'triton'"),
    ("CONVGRU_TRITON_DIRECT_LAUNCH", "direct_launch", "off", "1", "'1', '0'"),
])
def test_bad_environment_value_raises_at_the_first_call(variable, setting, bad, good, values):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env[variable] = bad
    code = textwrap.dedent(_FIRST_CALL).replace("{setting!r: {good!r}}", repr({setting: good}))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "IMPORTED"
    error = next((line for line in lines if line.startswith("ERROR: ")), None)
    assert error is not None, proc.stdout
    assert f"environment variable {variable} must be one of {values}" in error
    assert error.endswith(f"got {bad!r}"), error
    assert lines[-1] == "OVERRIDDEN"


def test_environment_is_read_at_import(environment_at_import):
    settings = environment_at_import(CONVGRU_TRITON_FUSED_STEP=" 1 ", CONVGRU_TRITON_LAYOUT="",
                                     CONVGRU_TRITON_TUNING_DIR="/tmp/tuning")
    assert (settings.fused_step, settings.layout, settings.tuning_dir) == ("1", "auto", "/tmp/tuning")
    assert settings.source("fused_step") == "environment" and settings.source("layout") == "default"
    assert convgru_triton.get_settings() is settings


# --- override_settings ---------------------------------------------------------


def test_override_changes_and_restores():
    before = convgru_triton.get_settings()
    with convgru_triton.override_settings(fused_step="1", layout="KEEP ") as inside:
        assert convgru_triton.get_settings() is inside
        assert (inside.fused_step, inside.layout, inside.backend) == ("1", "keep", before.backend)
        assert inside.source("fused_step") == "override"
        with convgru_triton.override_settings(fused_step="0"):
            assert convgru_triton.get_settings().fused_step == "0"
            assert convgru_triton.get_settings().layout == "keep"
        assert convgru_triton.get_settings() is inside
    assert convgru_triton.get_settings() is before


def test_override_restores_when_the_block_raises():
    before = convgru_triton.get_settings()
    with pytest.raises(RuntimeError, match="inside"):
        with convgru_triton.override_settings(backend="torch"):
            raise RuntimeError("inside")
    assert convgru_triton.get_settings() is before


def test_override_bad_value_names_the_setting_and_changes_nothing():
    before, generation = convgru_triton.get_settings(), _settings.generation
    with pytest.raises(ValueError, match=r"^layout \(CONVGRU_TRITON_LAYOUT\) must be one of 'auto', 'channels_last', "
                                         r"'keep' \(.*\), got 'nhwc'$"):
        with convgru_triton.override_settings(fused_step="1", layout="nhwc"):
            pass
    with pytest.raises(TypeError, match="fused_step must be a str, got int"):
        with convgru_triton.override_settings(fused_step=1):
            pass
    assert convgru_triton.get_settings() is before and _settings.generation == generation


def test_override_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match=r"unknown settings \['fused'\]; the settings are \['backend', "):
        with convgru_triton.override_settings(fused="1"):
            pass


def test_override_lifts_the_error_of_its_variable_only(environment_at_import):
    environment_at_import(CONVGRU_TRITON_LAYOUT="nhwc")
    with pytest.raises(ValueError, match="environment variable CONVGRU_TRITON_LAYOUT"):
        convgru_triton.get_settings()
    assert _settings.peek_settings().layout == "auto"  # the default, for reports
    with convgru_triton.override_settings(fused_step="0"):
        with pytest.raises(ValueError, match="CONVGRU_TRITON_LAYOUT"):
            convgru_triton.get_settings()
    with convgru_triton.override_settings(layout="keep"):
        assert convgru_triton.get_settings().layout == "keep"
    with pytest.raises(ValueError, match="CONVGRU_TRITON_LAYOUT"):
        convgru_triton.get_settings()


# --- the generation the plan caches key on -------------------------------------


def test_generation_moves_with_every_change_and_comes_back():
    start = _settings.generation
    with convgru_triton.override_settings(fused_step="0"):
        zero = _settings.generation
        assert zero != start
        with convgru_triton.override_settings(fused_step="1"):
            assert _settings.generation not in (start, zero)
        assert _settings.generation == zero
    assert _settings.generation == start
    # The same settings again: the same number (the plans made for them are found again).
    with convgru_triton.override_settings(fused_step="0"):
        assert _settings.generation == zero


def test_tuning_changes_move_the_one_generation():
    start, tuning = _settings.generation, _tuning.generation
    _tuning.clear_cache()
    assert _settings.generation != start and _tuning.generation == tuning + 1
    after_clear = _settings.generation
    with _tuning.forced_step_path("fused"):
        assert _settings.generation not in (start, after_clear)
    # A bump gives numbers never given out before: no plan of before it answers.
    assert _settings.generation not in (start, after_clear)


def test_tuning_dir_override_is_searched_first(tmp_path):
    with convgru_triton.override_settings(tuning_dir=str(tmp_path)):
        origin, path = _tuning.source_paths("fake_gpu")[0]
        assert (origin, path) == (_tuning.ENV_DIR, str(tmp_path / "fake_gpu.json"))
        assert _tuning.user_tuning_dir() == str(tmp_path)
    if convgru_triton.get_settings().tuning_dir is None:
        assert all(origin != _tuning.ENV_DIR for origin, _ in _tuning.source_paths("fake_gpu"))


def test_direct_launch_setting_switches_replay(monkeypatch):
    pytest.importorskip("triton")
    from convgru_triton.ops.gates import kernels as op

    monkeypatch.setattr(op, "_REPLAY_POSSIBLE", True)  # as with compiled kernels (off under the interpreter)
    monkeypatch.setattr(op, "_DIRECT_LAUNCH", True)
    with convgru_triton.override_settings(direct_launch="0"):
        assert op._DIRECT_LAUNCH is False
        with convgru_triton.override_settings(fused_step="1"):  # another setting: replay stays off
            assert op._DIRECT_LAUNCH is False
    assert op._DIRECT_LAUNCH is True


def test_plans_follow_an_override(monkeypatch, device):
    """A setting changed between calls takes effect at the next call (the
    layout policy forced on CPU tensors, where its default is off), and
    settings in force before find their plan again."""
    from convgru_triton import functional

    x, h = torch.randn(2, 3, 5, 7, device=device), torch.randn(2, 4, 5, 7, device=device)
    w_ih, w_hh = torch.randn(12, 3, 3, 3, device=device), torch.randn(12, 4, 3, 3, device=device)
    real, seen = functional._internal_format, []
    monkeypatch.setattr(functional, "_internal_format", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    monkeypatch.setattr(functional, "_CELL_PLANS", {})
    # Planned under each setting; "keep" again finds the plan made for it.
    for layout, planned in (("keep", [None]), ("channels_last", [torch.channels_last]), ("keep", [])):
        seen.clear()
        with convgru_triton.override_settings(layout=layout):
            functional.conv_gru_cell(x, h, w_ih, w_hh)
        assert seen == planned, layout
