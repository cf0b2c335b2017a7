"""The host-overhead and CUDA-graph benchmark scripts run end to end on CPU."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_host_overhead(tmp_path, *args):
    """``python -m bench.host_overhead`` in its own process (compiled-mode Triton,
    fake sm_90 target); returns the results file."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    subprocess.run([sys.executable, "-m", "bench.host_overhead", *args, "--out", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)
    return json.loads((tmp_path / "host_overhead-cpu.json").read_text())


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_host_overhead_takes_the_triton_path(tmp_path):
    """In its own process (compiled-mode Triton, fake sm_90 target): the Triton
    path launches the kernels it should, per row, and the table is written."""
    data = _run_host_overhead(tmp_path, "--steps", "2", "--repeats", "1", "--rows", "cell")["results"]
    launches = {row: values["ours"]["launches"] for row, values in data.items()}
    # reset_after=False: two kernels per step forward, two more backward; reset_after=True: one and one.
    assert launches == {
        "ConvGRUCell2d reset_after=False, no grad": 2, "ConvGRUCell2d reset_after=False, fwd+bwd": 4,
        "ConvGRUCell2d reset_after=True, no grad": 1, "ConvGRUCell2d reset_after=True, fwd+bwd": 2,
    }
    for values in data.values():
        # A cell's plan calls its kernels directly, never the launchers' interface: no "above launchers" row.
        assert "ours (above launchers)" not in values
        assert values["ours (torch backend)"]["median_us"] > 0
        # Compiled, a cell step is Inductor's fusion of the step's math: no package kernel launches.
        assert values["ours (compiled)"]["launches"] == 0 and values["ours (compiled)"]["median_us"] > 0
    assert "| ConvGRUCell2d reset_after=False, no grad |" in (tmp_path / "host_overhead-cpu.md").read_text()


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_host_overhead_raft_loops(tmp_path):
    """RAFT's 12-step update loop, four modes, both step paths, both cells: the
    fused rows ran the fused kernels (and the default rows none), every count
    is positive, and the table shows the targets and says the fused kernels ran."""
    from bench import host_overhead as ho

    data = _run_host_overhead(tmp_path, "--steps", "12", "--repeats", "1", "--rows", "raft-sep,raft-cell")
    loops = data["raft_loops"]
    assert list(loops) == [r.label for r in ho.LOOP_ROWS]
    for row in ho.LOOP_ROWS:
        r = loops[row.label]
        halves = 2 if row.cell == "sep" else 1  # a separable step is two cell updates
        default, fused = r["ours (default path)"], r["ours (fused path)"]
        for v in (r["raft"], default, fused):
            assert v["median_us"] > 0 and v["python_calls"] > 0 and v["aten_ops"] > 0
        assert r["raft"]["fused_launches"] == r["raft"]["gate_launches"] == 0
        # Per cell update: two kernels forward (reset_after=False), on either path.
        assert default["fused_launches"] == 0 and default["gate_launches"] >= 2 * halves
        assert fused["fused_launches"] >= 2 * halves
        if not row.training:
            assert fused["fused_launches"] == default["gate_launches"] == 2 * halves and fused["gate_launches"] == 0
        assert set(fused["kernels"]) & ho.fused_kernel_names()
        # Work per step, which the machine's load does not move: fewer aten ops than RAFT's eager
        # cell on both paths, and Python calls within 15% of its (at most 1.11x measured, the 3x3
        # cell's bfloat16 training; fewer than RAFT's in every other mode).
        for ours in (default, fused):
            assert ours["aten_ops"] < r["raft"]["aten_ops"], row.label
            assert ours["python_calls"] <= 1.15 * r["raft"]["python_calls"], row.label
    text = (tmp_path / "host_overhead-cpu.md").read_text()
    assert text.count("(fused kernels ran)") == len(ho.LOOP_ROWS)
    assert "≤ 0.80×" in text and "≤ 0.50×" in text


def test_host_overhead_fails_loudly_without_the_fused_kernels():
    """A fused row that launched no fused kernel, or a default row that did, is an error, not a figure."""
    from bench import host_overhead as ho

    with pytest.raises(RuntimeError, match="ran no fused kernel"):
        ho._check_launches("row", "ours (fused path)", 0, 4)
    with pytest.raises(RuntimeError, match="default path launched"):
        ho._check_launches("row", "ours (default path)", 2, 0)
    ho._check_launches("row", "ours (fused path)", 4, 0)
    ho._check_launches("row", "ours (default path)", 0, 4)


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_cuda_graphs_dry_run(tmp_path):
    from bench import cuda_graphs

    assert cuda_graphs.main(["--dry-run", "--out", str(tmp_path), "--time-limit", "30"]) == 0
    rows = json.loads((tmp_path / "cuda_graphs-cpu.json").read_text())["rows"]
    # The dry run's one fused-step row first (the replay target's), then cuDNN + the gate kernels per cell.
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
