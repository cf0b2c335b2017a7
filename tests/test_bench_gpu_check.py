"""The Python parts the GPU check added for issue 10, checked on a CPU: the
bandwidth script's layouts and map sizes, and the registers/spills comparison."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from bench import bandwidth, gpu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path; the GPU check runs the real one")
def test_bandwidth_dry_run_both_layouts(tmp_path):
    assert bandwidth.main(["--dry-run", "--layouts", "nchw,cl", "--name", "cpu-bw", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu-bw.json").read_text())
    assert {r["layout"] for r in result["rows"]} == {"nchw", "cl"}
    assert len(result["rows"]) == 12  # six kernels, checked against the equations, in each layout
    text = (tmp_path / "cpu-bw.md").read_text()
    assert "**float32, channels_last**" in text and "**float32, contiguous**" in text


def test_bandwidth_refuses_unknown_layout(capsys):
    with pytest.raises(SystemExit):
        bandwidth.main(["--dry-run", "--layouts", "nhwc"])


def _pred(kernel, dtype, regs, stack, **constexprs):
    return {"kernel": kernel, "dtype": dtype, "regs": regs, "stack": stack, "local": 0,
            "constexprs": {"g_ss": "1", **{k: str(v) for k, v in constexprs.items()}}}


def test_predictions_matched_by_kernel_dtype_and_declared_constexprs():
    prediction = {"meta": {"triton": "3.9.0", "commit": "abc"}, "kernels": [
        _pred("_k_fwd_kernel", "bf16", 40, 0, SAVE=True, BLOCK=1024),
        _pred("_k_fwd_kernel", "bf16", 44, 8, SAVE=True, BLOCK=1024),   # another specialization
        _pred("_k_fwd_kernel", "bf16", 30, 0, SAVE=False, BLOCK=1024),
        _pred("_k_fwd_kernel", "fp32", 50, 0, SAVE=True, BLOCK=1024),
    ]}
    rows = [
        dict(kernel="_k_fwd_kernel", dtype="bf16", constexprs={"SAVE": "True", "BLOCK": "1024", "h_ss": "1"},
             num_warps=4, gpu_regs=42, gpu_spills=0, cubin_regs=42, cubin_stack=0),
        dict(kernel="_k_fwd_kernel", dtype="fp16", constexprs={"SAVE": "True", "BLOCK": "1024"},
             num_warps=4, gpu_regs=42, gpu_spills=0, cubin_regs=None, cubin_stack=None),
    ]
    gpu_kernels.attach_predictions(rows, prediction)
    assert (rows[0]["pred_regs"], rows[0]["pred_spills"], rows[0]["pred_n"]) == ("40-44", "0-8", 2)
    assert (rows[1]["pred_regs"], rows[1]["pred_n"]) == ("—", 0)
    text = gpu_kernels.markdown(rows, prediction, dry_run=False)
    assert "the GPU loaded them" in text and "Triton 3.9.0" in text
    assert "| k_fwd | SAVE=True BLOCK=1024 | bf16 | 4 | 42 | 0 | 42 | 0 | 40-44 | 0-8 |" in text


def test_gpu_kernels_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_kernels.main(["--prediction", os.devnull]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses_and_runs_the_new_steps():
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    assert "--spatial 46x62 --layouts nchw,cl" in text and "bench.gpu_kernels" in text
