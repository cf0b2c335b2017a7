"""Backend selection: the rules, the forcing argument and variable, the report,
and a package that works without Triton."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import convgru_triton
from convgru_triton import ConvGRU, ConvGRUCell1d, explain_backend
from convgru_triton._backend import select_backend

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def test_auto_uses_torch_on_cpu(package_settings):
    package_settings(backend="auto")
    choice = select_backend(torch.device("cpu"))
    assert choice.name == "torch"
    assert "cpu" in choice.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the CPU rule is tested above")
def test_auto_uses_triton_on_cuda(package_settings):
    package_settings(backend="auto")
    assert select_backend(torch.device("cuda")).name == "triton"


@pytest.mark.triton_kernels
def test_argument_forces_backend(package_settings, device):
    package_settings(backend="auto")
    assert select_backend(device, "torch").name == "torch"
    choice = select_backend(device, "triton")  # CUDA, or the interpreter on CPU
    assert choice.name == "triton" and "backend='triton'" in choice.reason


@pytest.mark.triton_kernels
def test_backend_setting_forces_backend(package_settings, environment_at_import, device):
    package_settings(backend="triton")
    assert select_backend(device).name == "triton"
    assert "override_settings(backend='triton')" in select_backend(device).reason
    # The argument wins over the setting.
    assert select_backend(device, "torch").name == "torch"
    with convgru_triton.override_settings(backend="auto"):
        assert select_backend("cpu").name == "torch"
    assert select_backend(device).name == "triton"  # restored at the block's end
    # From the environment: read at import, named in the reason.
    environment_at_import(CONVGRU_TRITON_BACKEND="triton")
    assert "CONVGRU_TRITON_BACKEND=triton" in select_backend(device).reason
    environment_at_import(CONVGRU_TRITON_BACKEND="cuda")
    with pytest.raises(ValueError, match="CONVGRU_TRITON_BACKEND.*'cuda'"):
        select_backend("cpu")


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of .*got 'fast'"):
        ConvGRU(2, 3, 3, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        select_backend("cpu", "gpu")


@pytest.mark.triton_kernels
def test_explain_backend_reports_module_choice(package_settings, device):
    package_settings(backend="auto")
    assert explain_backend(ConvGRU(2, 3, 3)).name == "torch"  # parameters on the CPU
    assert explain_backend(ConvGRU(2, 3, 3, backend="torch"), device).name == "torch"
    forced = explain_backend(ConvGRUCell1d(2, 3, 3, backend="triton", device=device))
    assert forced.name == "triton"
    assert "triton" in str(forced)


@pytest.mark.triton_kernels
def test_backend_setting_switches_module_to_kernels(monkeypatch, device):
    """The backend setting "triton" makes an 'auto' module run the kernels from
    its next call on (the setting's generation is in the plans' keys)."""
    from convgru_triton.ops.gates import kernels as kernels

    calls = []
    original = kernels._launch

    def counting(kernel, name, *args):
        if name == "gru_reset_gate_fwd":
            calls.append(1)
        return original(kernel, name, *args)

    monkeypatch.setattr(kernels, "_launch", counting)
    # Compiled kernels on a GPU replay through the operator's bound launches,
    # not through _launch: off here, so that every launch is counted.
    monkeypatch.setattr(kernels, "_bind", lambda *args: None)
    model = ConvGRU(2, 3, 3, device=device)
    x = torch.randn(2, 1, 2, 4, 4, device=device)
    with convgru_triton.override_settings(backend="torch"):
        model(x)
    assert calls == []
    with convgru_triton.override_settings(backend="triton"):
        model(x)
    assert len(calls) == 2


def test_forced_triton_on_cpu_without_interpreter_raises():
    result = _run_python(
        """
        import torch
        from convgru_triton import ConvGRUCell
        cell = ConvGRUCell(2, 3, 3, backend="triton")
        try:
            cell(torch.randn(1, 2, 4, 4))
        except RuntimeError as e:
            print("ERROR:", e)
        """,
        TRITON_INTERPRET=None,
        CONVGRU_TRITON_BACKEND=None,
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout and "need CUDA tensors" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def test_package_works_without_triton():
    """With ``import triton`` failing (as on macOS), the package imports, reports
    why, runs on the eager path, and a forced Triton backend fails clearly."""
    result = _run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import convgru_triton
        from convgru_triton import ConvGRU, explain_backend
        assert not convgru_triton.triton_available()
        model = ConvGRU(2, 3, 3)
        out, h = model(torch.randn(2, 1, 2, 5, 5))
        out.sum().backward()
        print("REASON:", explain_backend(model, torch.device("cuda")))
        try:
            ConvGRU(2, 3, 3, backend="triton")(torch.randn(2, 1, 2, 5, 5))
        except RuntimeError as e:
            print("ERROR:", e)
        """,
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0, result.stderr
    assert "REASON: torch: Triton cannot be used (ModuleNotFoundError" in result.stdout
    assert "ERROR: the Triton backend was forced" in result.stdout


def test_public_api_is_small():
    assert set(convgru_triton.__all__) == {
        "BackendChoice", "ConvGRU", "ConvGRU1d", "ConvGRU2d", "ConvGRU3d", "ConvGRUCell", "ConvGRUCell1d",
        "ConvGRUCell2d", "ConvGRUCell3d", "SepConvGRUCell2d", "Settings", "conv_gru", "conv_gru_cell",
        "explain_backend", "get_settings", "override_settings", "triton_available",
    }
    for name in convgru_triton.__all__:
        assert getattr(convgru_triton, name).__doc__, name
