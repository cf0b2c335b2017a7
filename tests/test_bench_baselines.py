"""The benchmark harness (bench/): the baselines compute the package's function with
converted weights, all providers agree on every workload, the report turns
pytest-benchmark JSON into a table and a chart, and the bandwidth script runs."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench import baselines, report, workloads  # noqa: E402
from convgru_triton import ConvGRUCell2d  # noqa: E402

DTYPE = torch.float64


def _cell(c_in, hidden, kernel):
    torch.manual_seed(0)
    return ConvGRUCell2d(c_in, hidden, kernel, backend="torch", dtype=DTYPE)


def _inputs(n, c_in, hidden, size):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c_in, *size, generator=gen, dtype=DTYPE, requires_grad=True)
    h = torch.tanh(torch.randn(n, hidden, *size, generator=gen, dtype=DTYPE)).requires_grad_(True)
    return x, h


def _assert_same_step(run_a, run_b, x, h):
    out_a = run_a(x, h)
    grads_a = torch.autograd.grad(out_a.square().sum(), (x, h))
    out_b = run_b(x, h)
    grads_b = torch.autograd.grad(out_b.square().sum(), (x, h))
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kernel", [3, (3, 5), 5])
def test_seed_matches_cell(kernel):
    cell = _cell(5, 4, kernel)
    seed = baselines.SeedConvGRUCell(5, 4, kernel, dtype=DTYPE).load_from_cell(cell)
    x, h = _inputs(2, 5, 4, (6, 7))
    _assert_same_step(cell, seed, x, h)


@pytest.mark.parametrize("kernel", [3, 5])
def test_raft_convgru_matches_cell(kernel):
    cell = _cell(5, 4, kernel)
    raft = baselines.RaftConvGRU(hidden_dim=4, input_dim=5, kernel_size=kernel, dtype=DTYPE).load_from_cell(cell)
    assert raft.convz.weight.shape == (4, 9, kernel, kernel) and raft.convz.padding == (kernel // 2,) * 2
    x, h = _inputs(2, 5, 4, (6, 7))
    _assert_same_step(cell, lambda x, h: raft(h, x), x, h)


def test_raft_sepconvgru_matches_two_cells():
    horizontal, vertical = _cell(5, 4, (1, 5)), _cell(5, 4, (5, 1))
    sep = baselines.RaftSepConvGRU(hidden_dim=4, input_dim=5, dtype=DTYPE).load_from_cells(horizontal, vertical)
    assert sep.convz1.padding == (0, 2) and sep.convz2.padding == (2, 0)
    x, h = _inputs(2, 5, 4, (6, 7))
    _assert_same_step(lambda x, h: vertical(x, horizontal(x, h)), lambda x, h: sep(h, x), x, h)
    # The seed provider's separable step (two seed cells) is the same function too.
    seed = baselines.seed_from_cells([horizontal, vertical])
    _assert_same_step(lambda x, h: vertical(x, horizontal(x, h)), seed, x, h)


def test_baselines_refuse_cells_they_cannot_represent():
    with pytest.raises(ValueError, match="reset_after"):
        baselines.RaftConvGRU(4, 5, dtype=DTYPE).load_from_cell(
            ConvGRUCell2d(5, 4, 3, reset_after=True, dtype=DTYPE))
    with pytest.raises(ValueError, match="odd"):
        baselines.SeedConvGRUCell(5, 4, 4)


@pytest.mark.parametrize("workload", workloads.TINY_WORKLOADS, ids=lambda w: w.name)
def test_providers_compute_the_same_function(workload):
    """Every eager provider of every workload: same outputs and input gradients."""
    master = workloads.make_master(workload, "cpu", dtype=DTYPE)
    results = {}
    for provider in ("seed", "raft", "ours"):
        model = workloads.build_model(workload, provider, master, DTYPE)
        inputs = workloads.make_inputs(workload, "cpu", DTYPE, requires_grad=True)
        outputs = model(inputs.xs, inputs.hs)
        torch.autograd.backward(outputs, inputs.grads)
        results[provider] = [o.detach() for o in outputs] + [t.grad for t in inputs.leaves()]
    for provider in ("seed", "raft"):
        for a, b in zip(results[provider], results["ours"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def _record(workload, provider, pass_, median, device="cpu", dtype="float32", peak=None):
    extra = {"workload": workload, "provider": provider, "pass": pass_, "dtype": dtype, "device": device,
             "op": "conv_gru", "shape": f"shape of {workload}"}
    if peak is not None:
        extra["peak_mem_bytes"] = peak
    name = f"test_conv_gru[{workload}-{provider}-{pass_}-{dtype}]"
    return {"group": f"conv_gru {workload} {pass_} {dtype}", "name": name, "fullname": "bench/x.py::" + name,
            "params": None, "extra_info": extra,
            "stats": {"median": median, "min": median, "max": median, "rounds": 3}}


def _synthetic(device="cpu"):
    benchmarks = []
    times = {"seed": 0.030, "raft": 0.020, "compile": 0.012, "ours": 0.010}
    for workload in ("raft-convgru", "dgmr"):
        for pass_ in ("fwd", "fwd+bwd"):
            for provider, t in times.items():
                slow = 3.0 if (workload, pass_, provider) == ("dgmr", "fwd", "ours") else 1.0
                benchmarks.append(_record(workload, provider, pass_, t * slow, device=device,
                                          peak=2**20 * 100 if device == "cuda" else None))
    machine = {"device": device, "cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "torch": "2.x",
               "triton": "3.x", "commit": "0123456789abcdef", "dirty": False}
    if device == "cuda":
        machine["gpu"] = "Test GPU"
    return {"machine_info": {"convgru": machine}, "commit_info": {"id": "0123456789abcdef"},
            "datetime": "2026-01-01T00:00:00", "benchmarks": benchmarks}


def test_report_writes_table_and_chart(tmp_path):
    path = tmp_path / "cpu-test.json"
    path.write_text(json.dumps(_synthetic()))
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "cpu-test.md").read_text()
    assert "CPU: Test CPU" in text and "torch 2.x" in text and "commit 0123456789ab" in text
    assert "| workload | pass | seed | raft | compile | ours | ours vs seed | ours vs raft | ours vs compile |" in text
    assert "| raft-convgru | fwd+bwd | 30.0 | 20.0 | 12.0 | 10.0 | 3.00× | 2.00× | 1.20× |" in text
    # The CPU target: ours (30 ms) is slower than raft (20 ms) on dgmr fwd, by 50%.
    assert "missed on 1 of 4" in text and "`dgmr` fwd float32: ours 30.0 ms vs raft 20.0 ms (50% slower)" in text
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError:  # the report still writes the table, and says why there is no chart
        assert "matplotlib is not installed" in text
    else:
        png = tmp_path / "out" / "cpu-test.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_gpu_memory_and_targets(tmp_path):
    data = _synthetic("cuda")
    for b in data["benchmarks"]:
        b["extra_info"]["dtype"] = "bfloat16"
    path = tmp_path / "gpu-test.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-test.md").read_text()
    assert "GPU: Test GPU" in text and "Peak memory" in text and "| 100 |" in text
    # raft/ours = 2.0 (>= 1.5), compile/ours = 1.2 (>= 1.2): met on fwd+bwd.
    assert "Target (GPU, bfloat16, fwd+bwd)" in text and ": met." in text


def test_report_never_mixes_cpu_and_gpu(tmp_path):
    cpu, gpu = tmp_path / "cpu-a.json", tmp_path / "gpu-b.json"
    cpu.write_text(json.dumps(_synthetic("cpu")))
    gpu.write_text(json.dumps(_synthetic("cuda")))
    assert report.main([str(cpu), str(gpu), "--out", str(tmp_path), "--name", "cpu-mixed"]) == 2
    assert report.main([str(cpu), "--out", str(tmp_path), "--name", "gpu-wrong"]) == 2
    assert not (tmp_path / "cpu-mixed.md").exists() and not (tmp_path / "gpu-wrong.md").exists()


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_benchmark_suite_runs_and_reports(tmp_path):
    """``pytest bench --benchmark-only`` end to end on tiny shapes, then the report."""
    out = tmp_path / "cpu-tiny.json"
    # One thread: tiny ops with two OpenMP threads stall badly when the CPU is shared.
    # Without xdist's variables: started from an xdist worker (the GPU check's
    # run), pytest-benchmark would take itself for parallel and refuse --benchmark-only.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--bench-device", "cpu", "--bench-size", "tiny", "--bench-providers", "seed,raft,ours",
         "--bench-workloads", "raft-sepconvgru,mmnist", "--benchmark-max-time", "0.001",
         "--benchmark-min-rounds", "1", f"--benchmark-json={out}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 passed" in proc.stdout
    assert "ConvGRU comparison" in proc.stdout and "| mmnist | fwd+bwd |" in proc.stdout
    data = json.loads(out.read_text())
    assert {b["extra_info"]["provider"] for b in data["benchmarks"]} == {"seed", "raft", "ours"}
    assert data["machine_info"]["convgru"]["device"] == "cpu"
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    assert "| raft-sepconvgru | fwd |" in (tmp_path / "cpu-tiny.md").read_text()


# ----------------------------------------------------------------------------
# Bandwidth script
# ----------------------------------------------------------------------------


@pytest.mark.triton_kernels
def test_bandwidth_script(tmp_path):
    """On CPU: the dry run (tiny sizes, kernels checked under the interpreter); on a GPU a
    small real run. Either way the JSON and markdown come out."""
    from bench import bandwidth

    if torch.cuda.is_available():
        args = ["--sizes-mb", "1", "--dtypes", "float32", "--name", "gpu-test-bandwidth"]
        stem = "gpu-test-bandwidth"
    else:
        assert bandwidth.main(["--out", str(tmp_path)]) == 2  # no GPU: a clear refusal
        args = ["--dry-run", "--name", "cpu-test-bandwidth"]
        stem = "cpu-test-bandwidth"
    assert bandwidth.main(args + ["--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    assert {r["kernel"] for r in result["rows"]} == {
        "gru_reset_gate_fwd", "gru_update_fwd", "gru_update_bwd", "gru_reset_gate_bwd",
        "gru_reset_after_fwd", "gru_reset_after_bwd"}
    assert all(r["gb_per_s"] > 0 and r["copy_gb_per_s"] > 0 for r in result["rows"])
    assert "| state MiB |" in (tmp_path / f"{stem}.md").read_text()


@pytest.mark.triton_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_bandwidth_launches_copy_nothing(device, channels_last):
    """Every launch the bandwidth script times runs on its tensors as given: a
    launcher handed a view (gru_reset_gate_fwd given gh[:, :2H]) copies it first,
    and the copy is then timed with the kernel (45-58% of copy bandwidth on an
    H200). A launch that copies is refused, naming the kernel."""
    from bench import bandwidth

    case = bandwidth.Case(2, torch.float32, device, grad2=True, hidden=8, spatial=(5, 7),
                          channels_last=channels_last)
    case.check()
    for name, _, launch in case.kernels():
        bandwidth._launch_checked(name, launch)  # raises if the launch copied
    case.gh_rz = case.gh[:, : 2 * case.hidden]  # sample stride 3H planes: the launcher copies it
    with pytest.raises(AssertionError, match="gru_reset_gate_fwd: the launch copied"):
        bandwidth._launch_checked("gru_reset_gate_fwd", case.reset_gate_fwd)


def test_profile_script(capsys):
    """The profiler breakdown the GPU check prints (here on CPU, tiny shapes)."""
    from bench import profile_workload

    assert profile_workload.main(["--device", "cpu", "--size", "tiny", "--providers", "raft,ours",
                                  "--steps", "1", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "**raft**" in out and "**ours**" in out and "| operator / kernel |" in out
