"""The host-overhead and CUDA-graph benchmark scripts run end to end on CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_takes_the_triton_path(tmp_path):
    """In its own process (compiled-mode Triton, fake sm_90 target): the Triton
    path launches the kernels it should, per row, and the table is written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    subprocess.run([sys.executable, "-m", "bench.host_overhead", "--steps", "2", "--repeats", "1", "--rows", "cell",
                    "--out", str(tmp_path)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    data = json.loads((tmp_path / "host_overhead-cpu.json").read_text())["results"]
    launches = {row: values["ours"]["launches"] for row, values in data.items()}
    # reset_after=False: two kernels per step forward, two more backward; reset_after=True: one and one.
    assert launches == {
        "ConvGRUCell2d reset_after=False, no grad": 2, "ConvGRUCell2d reset_after=False, fwd+bwd": 4,
        "ConvGRUCell2d reset_after=True, no grad": 1, "ConvGRUCell2d reset_after=True, fwd+bwd": 2,
    }
    for values in data.values():
        assert values["ours (above launchers)"]["launches"] == 0  # the launchers' interface was stubbed
        assert values["ours (torch backend)"]["median_us"] > 0
        # Compiled, a cell step is Inductor's fusion of the step's math: no package kernel launches.
        assert values["ours (compiled)"]["launches"] == 0 and values["ours (compiled)"]["median_us"] > 0
    assert "| ConvGRUCell2d reset_after=False, no grad |" in (tmp_path / "host_overhead-cpu.md").read_text()


def test_cuda_graphs_dry_run(tmp_path):
    from bench import cuda_graphs

    assert cuda_graphs.main(["--dry-run", "--out", str(tmp_path), "--time-limit", "30"]) == 0
    rows = json.loads((tmp_path / "cuda_graphs-cpu.json").read_text())["rows"]
    # The dry run's one fused-step row first (issue 18's replay target), then today's path per cell.
    assert [r["cell"] for r in rows] == ["ConvGRUCell2d 3x3 · fused step", "ConvGRUCell2d 3x3",
                                         "SepConvGRUCell2d 1x5+5x1"]
    fused, today = rows[0], rows[1:]
    assert fused["fused_step"] == "1" and all(r["fused_step"] == "0" for r in today)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter runs the fused kernels: the row was timed and launched them.
        assert fused["eager_ms_per_step"] > 0 and fused["fused_launches"] > 0
        assert fused["graph"].startswith("skipped")
    else:
        # Nothing can run the Triton kernels on CPU tensors: the row says why instead of a number.
        assert fused["eager"].startswith("skipped: ours-fused") and "eager_ms_per_step" not in fused
    assert all(r["eager_ms_per_step"] > 0 and r["graph"].startswith("skipped") for r in today)
    assert all(r["fused_launches"] == 0 for r in today)
