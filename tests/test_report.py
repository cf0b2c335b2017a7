"""``python -m convgru_triton``: the setup report for bug reports."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import convgru_triton as cg
from convgru_triton import _plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(**env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVGRU_TRITON_")}
    env.update(env_changes)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "convgru_triton"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_report_names_versions_settings_and_choices():
    proc = _report(CONVGRU_TRITON_FUSED_STEP="0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in (f"convgru_triton  {cg.__version__}", f"torch           {torch.__version__}", "triton ",
                   "python ", "CUDA (torch)", "cuDNN", "GPU "):
        assert needle in out, needle
    # Every setting, with its source.
    for name in ("backend", "layout", "fused_step", "tuning_dir", "direct_launch"):
        assert f"  {name} " in out, name
    assert "fused_step      0              environment" in out
    assert "layout          auto           default" in out
    # Both RAFT cells, each choice with its reason.
    assert "SepConvGRUCell2d(256, 128), RAFT-large" in out and "ConvGRUCell2d(146, 96, 3), RAFT-small" in out
    assert out.count("backend: ") >= 2 and out.count("memory format: ") >= 2
    assert "step path, 1x5 kernel, fwd" in out and "step path, 3x3 kernel, bwd" in out


def test_report_with_a_bad_setting_says_so_and_exits_0():
    proc = _report(CONVGRU_TRITON_LAYOUT="sideways")
    assert proc.returncode == 0, proc.stderr
    assert "ERROR: environment variable CONVGRU_TRITON_LAYOUT must be one of" in proc.stdout
    assert "'sideways'" in proc.stdout and "cannot say" in proc.stdout


@pytest.mark.triton_kernels
@pytest.mark.parametrize("fused_step", ["0", "1", "auto"])
def test_explain_agrees_with_the_plan_that_runs(device, fused_step):
    """The report's step path is the one a cell's plan takes."""
    with cg.override_settings(backend="triton", fused_step=fused_step):
        facts = _plan.explain(device, torch.float32, (3, 3), 4, (5, 6))
        cell = cg.ConvGRUCell2d(3, 4, 3, device=device)
        with torch.no_grad():
            cell(torch.randn(1, 3, 5, 6, device=device), torch.randn(1, 4, 5, 6, device=device))
    (plan,) = cell.__dict__["_cell_plans"].values()
    assert facts["backend"][0] == "triton"
    want = {"fused": "fused", "gates": "cuDNN + gate kernels"}[plan.path]
    assert facts["step path"]["fwd"][0] == want
    assert (plan.path == "fused") == (fused_step == "1")
