"""The GPU check (bench/gpu_check.sh, bench/gpu_check.py) and what it runs,
checked on a CPU: its time plan fits one device call, a slow or stuck part costs
only its own numbers, every part writes into the output folder and the output
is at most 8 files, the report is made from what the parts left (also when a
part left nothing or something else), the benchmark JSON survives a killed
run, the accuracy check allows for TF32, and the bandwidth script's layouts and
the registers/spills comparison."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from bench import bandwidth, gpu_check, gpu_kernels, report, roofline
from bench.test_bench_conv_gru import (
    FLOAT32_TOLERANCE,
    LOW_PRECISION_SLACK,
    TF32_SLACK,
    _exact_float32,
    accuracy_failures,
    allowed_error,
    uses_tf32,
)
from bench.workloads import FULL_WORKLOADS, TINY_WORKLOADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200_BANDWIDTH = os.path.join(ROOT, "bench", "results", "gpu-nvidia-h200-bandwidth-2026-12-04.json")
# What the device machine brings back: at most 8 files, named in letters, digits, '.', '_' and '-'.
DEVICE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env():
    # Not xdist's variables either: a benchmark run started from an xdist worker
    # (the GPU check runs the suite with -n) inherits PYTEST_XDIST_WORKER, and
    # pytest-benchmark then refuses --benchmark-only (seen on the H200 run of 2026-12-04).
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "OUT") and not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ----------------------------------------------------------------------------
# The time plan
# ----------------------------------------------------------------------------


def test_plan_fits_one_device_call():
    """Every capped part at its whole cap plus grace, the uncapped one at its minimum:
    inside the budget, and the budget leaves the device call (killed at 540 s) half a
    minute for this script's own steps."""
    assert gpu_check.DEVICE_CALL_LIMIT_S == 9 * 60
    assert gpu_check.worst_case_s() <= gpu_check.BUDGET_S <= gpu_check.DEVICE_CALL_LIMIT_S - 30
    assert gpu_check.BUDGET_S <= 510  # ~8.5 minutes of wall time at most, everything included


def test_every_part_keeps_its_cap_when_all_before_use_theirs():
    """The worst case, part by part: each earlier part runs to its limit and its grace;
    every capped part still gets its whole cap, the uncapped one (compiled) at least
    its minimum, and the last part ends inside the budget."""
    elapsed = 0.0
    for i, part in enumerate(gpu_check.PLAN):
        limit = gpu_check.limit_for(i, elapsed, gpu_check.BUDGET_S)
        if part.optional:
            assert limit <= (part.cap or limit)
            continue  # runs only on time nobody else needs: here none is left for it
        if part.cap is None:
            assert limit >= part.minimum, part.name
        else:
            assert limit == part.cap, part.name
        elapsed += limit + gpu_check.GRACE_S
    assert elapsed <= gpu_check.BUDGET_S


def test_parts_and_their_order():
    names = [p.name for p in gpu_check.PLAN]
    # The tests first, then the benchmarks and measurements, the compiled providers last
    # (they take what the others leave), the report at the very end.
    assert names[:3] == ["env", "tests", "eager"]
    for name in ("bandwidth", "raft_bandwidth", "cuda_graphs", "profile", "compiled", "report"):
        assert name in names
    assert names[-1] == "report"
    uncapped = [p for p in gpu_check.PLAN if p.cap is None]
    assert [p.name for p in uncapped] == ["compiled"]
    assert all(p.optional for p in gpu_check.PLAN[names.index("compiled") + 1:-1])
    for p in gpu_check.PLAN:
        assert p.why and p.minimum > 0 and (p.cap is None or p.cap >= p.minimum), p.name
        assert hasattr(gpu_check.Check, "part_" + p.name), p.name


@pytest.mark.parametrize("budget", [300, 400, gpu_check.BUDGET_S])
def test_a_shorter_budget_still_gives_every_part_its_minimum(budget):
    """GPU_CHECK_BUDGET below the default: the parts shrink, none is skipped, the budget holds."""
    assert budget >= sum(p.minimum + gpu_check.GRACE_S for p in gpu_check.PLAN if not p.optional)
    elapsed = 0.0
    for i, part in enumerate(gpu_check.PLAN):
        if part.optional:
            continue
        limit = gpu_check.limit_for(i, elapsed, budget)
        assert limit >= part.minimum, (part.name, limit)
        elapsed += limit + gpu_check.GRACE_S
    assert elapsed <= budget + 1e-9


def test_plan_command_and_shell_entry_point():
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    assert "python3 -m bench.gpu_check" in open(script).read()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plan"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"budget {gpu_check.BUDGET_S} s" in proc.stdout
    for p in gpu_check.PLAN:
        assert f"| {p.name}" in proc.stdout


def test_test_suite_command(tmp_path, monkeypatch):
    """The whole suite in parallel (xdist, work stealing, a limit per test) but for the
    deselected files, each of which exists and has its reason; the prewarm takes the
    cores the tests leave."""
    for path, why in gpu_check.DESELECTED.items():
        assert os.path.isfile(os.path.join(ROOT, path)), path
        assert len(why) > 20, path
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    check = gpu_check.Check(str(tmp_path), echo=lambda *a: None)
    check.has_xdist = check.has_timeout = True
    cmd = check.test_command()
    assert cmd[1:4] == ["-m", "pytest", "tests"]
    assert cmd[cmd.index("-m", 2) + 1] == "slow or not slow", "the GPU runs the slow tier too"
    assert cmd[cmd.index("-n") + 1] == str(16 - gpu_check.PREWARM_WORKERS) and "worksteal" in cmd
    assert f"--timeout={gpu_check.TEST_TIMEOUT_S}" in cmd
    assert {c.split("=", 1)[1] for c in cmd if c.startswith("--ignore=")} == set(gpu_check.DESELECTED)
    assert any(c.startswith("--junitxml=" + str(tmp_path)) for c in cmd)
    check.has_xdist = check.has_timeout = False  # one process, no per-test limit: still the whole suite
    cmd = check.test_command()
    assert "-n" not in cmd and not any(c.startswith("--timeout") for c in cmd)
    assert not check.prewarm_runs()


def test_benchmark_commands(tmp_path):
    check = gpu_check.Check(str(tmp_path), bench_args=["--bench-workloads=dgmr"], echo=lambda *a: None)
    eager = check.bench_command("eager", gpu_check.EAGER_PROVIDERS)
    assert "--bench-providers=ours-fused,seed,raft,ours" in eager and "--bench-order=target" in eager
    assert f"--bench-json={os.path.join(str(tmp_path), 'raw', 'eager.json')}" in eager  # in the output, no temp dir
    assert "--benchmark-only" in eager and eager[-1] == "--bench-workloads=dgmr"
    # The prewarm runs the same compiled benchmarks once, untimed, in parallel: the same graphs.
    warm = check.bench_command("prewarm", gpu_check.COMPILED_PROVIDERS, "--benchmark-disable", "-n", "4",
                               timed=False)
    assert "--benchmark-only" not in warm and "--benchmark-disable" in warm
    compiled = check.bench_command("compiled", gpu_check.COMPILED_PROVIDERS)
    assert [c for c in warm if c.startswith("--bench-") and "json" not in c] == \
           [c for c in compiled if c.startswith("--bench-") and "json" not in c]
    # No dtype or pass filter: bfloat16 and float32, forward and training step.
    assert not any(c.startswith(("--bench-dtypes", "--bench-passes")) for c in eager + compiled)


# ----------------------------------------------------------------------------
# Running the parts
# ----------------------------------------------------------------------------


class _FakeCheck(gpu_check.Check):
    """The check's loop, limits and output with stand-in parts (shell commands)."""

    def sh(self, name, script, limit):
        return self.run(name, ["bash", "-c", script], self.raw_path(name + ".log"), limit)

    def part_env(self, limit):
        self.info, self.stem = {"gpu": "Fake GPU", "capability": "9.0", "memory_gib": [1, 1]}, "gpu-fake"
        return 0

    def part_tests(self, limit):
        with open(os.path.join(self.out, "gpu_tests.log"), "w") as f:
            f.write("3 passed in 0.1s\n")
        return 0

    def part_eager(self, limit):  # slow: stopped at its limit, exits on SIGINT
        return self.sh("eager", f"echo '1 passed' > {self.raw_path('eager.json')}; sleep 60", limit)

    def part_bandwidth(self, limit):  # stuck: ignores SIGINT, so it is killed
        return self.sh("bandwidth", "trap '' INT; sleep 60", limit)

    def part_compiled(self, limit):
        return self.sh("compiled", "echo done", limit)

    def part_report(self, limit):
        return self.sh("report", f"cd {self.out} && echo table > {self.stem}.md && echo extra > stray.txt", limit)


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_a_slow_or_stuck_part_costs_only_its_own_numbers(tmp_path, monkeypatch):
    # 2 s of grace: a part that exits on SIGINT must be seen to stop within it
    # also on a loaded 2-core machine (1 s flaked once there, with CI running).
    monkeypatch.setattr(gpu_check, "GRACE_S", 2)
    P = gpu_check.Part
    plan = (P("env", 2, 1, "x"), P("tests", 2, 1, "x"), P("eager", 2, 1, "x"), P("bandwidth", 2, 1, "x"),
            P("compiled", None, 2, "x"), P("report", 2, 1, "x"))
    lines = []
    (tmp_path / "committed-result.json").write_text("{}")  # e.g. bench/results: left where it is
    check = _FakeCheck(str(tmp_path), budget=20, plan=plan, echo=lines.append)
    start = time.monotonic()
    status = check.main()
    took = time.monotonic() - start
    assert took <= 20 + 2.5  # the budget holds with a slow and a stuck part
    o = check.outcomes
    assert o["eager"].status == "stopped at its limit" and 1.9 <= o["eager"].took <= 3.5
    assert o["bandwidth"].status == "killed at its limit" and o["bandwidth"].took <= 2 + 2 + 1.5
    assert o["compiled"].status == "ok" and o["report"].status == "ok"  # later parts still ran
    assert o["compiled"].limit >= 2  # and had their time
    assert status == 1
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| eager | 2 |" in text and "stopped at its limit" in text and "killed at its limit" in text
    # Output: the allowed files and the archive; the stray file went into the archive.
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["gpu_check.md", "gpu_tests.log", "gpu-fake.md", "gpu_check_raw.tar.gz",
                            "committed-result.json"])
    with tarfile.open(tmp_path / "gpu_check_raw.tar.gz") as tar:
        members = set(tar.getnames())
    assert {"eager.log", "eager.json", "bandwidth.log", "compiled.log", "report.log", "stray.txt"} <= members
    assert any("eager: stopped at its limit" in line for line in lines)


def test_no_gpu_stops_after_env_with_a_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in (tmp_path / "gpu_check.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.md", "gpu_check_raw.tar.gz"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in of the GPU check; on a GPU the check is real")
def test_smoke_run_every_part_writes_into_the_output(tmp_path):
    """The check end to end on a CPU (tiny sizes, dry runs, through bench/gpu_check.sh):
    every part runs and leaves its data in the output folder, the report is made from
    the eager and compiled JSON, and the output is at most 8 files the device machine
    brings back (plain names, no folders)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--smoke", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = os.listdir(out)
    assert len(names) <= 8 and all(DEVICE_NAME.match(n) and os.path.isfile(out / n) for n in names), names
    stem = next(n[:-len("-bandwidth.md")] for n in names if n.endswith("-bandwidth.md"))
    assert stem.startswith("cpu-")
    for name in ("gpu_check.md", "gpu_tests.log", f"{stem}.md", f"{stem}.json", f"{stem}-bandwidth.json",
                 "gpu_check_raw.tar.gz"):
        assert name in names, name
    with tarfile.open(out / "gpu_check_raw.tar.gz") as tar:
        members = set(tar.getnames())
        eager = json.load(tar.extractfile("eager.json"))
        compiled = json.load(tar.extractfile("compiled.json"))
    for part_files in (["env.json"], ["gpu_tests.xml", "roofline.md"], ["eager.json", "eager.log"],
                       ["bandwidth.log"], ["raft-bandwidth.json", "raft-bandwidth.md"],
                       ["cuda_graphs-cpu.json", "cuda_graphs-cpu.md"], ["profile.md"],
                       ["compiled.json", "compiled.log"], ["report.log"]):
        assert set(part_files) <= members, part_files
    # ours-fused under the interpreter: run, not skipped (never cuDNN + the gate kernels under its name)
    assert {b["extra_info"]["provider"] for b in eager["benchmarks"]} == {"ours-fused", "seed", "raft", "ours"}
    assert {b["extra_info"]["provider"] for b in compiled["benchmarks"]} == {"ours-compile"}
    assert "data" in eager["benchmarks"][0]["stats"]  # the final write has every round
    merged = json.loads((out / f"{stem}.json").read_text())
    assert len(merged["benchmarks"]) == len(eager["benchmarks"]) + len(compiled["benchmarks"])
    table = (out / f"{stem}.md").read_text()
    assert "ours-compile" in table and "| raft-convgru | fwd |" in table
    summary = (out / "gpu_check.md").read_text()
    for p in gpu_check.PLAN:
        assert re.search(rf"^\| {p.name} \| \d+ \| \d* \| (ok|skipped: smoke run)", summary, re.M), p.name
    for heading in ("## Test suite", "## Benchmarks", "## Roofline floors per workload", "## Profile",
                    "## Gate-kernel bandwidth", "## CUDA graphs", "## Files"):
        assert heading in summary, heading
    assert "| raft-convgru | bfloat16 | fwd+bwd |" in summary  # the roofline floors of every workload
    assert "**raft**" in summary and "**ours**" in summary  # the profile, per provider
    assert "**ours-fused**" in summary and "fused-step launches per call" in summary
    assert "ConvGRUCell2d 3x3 · fused step |" in summary  # the CUDA-graphs part's fused row


# ----------------------------------------------------------------------------
# Benchmark JSON and the report
# ----------------------------------------------------------------------------


def _bench_cmd(device, json_path, *extra):
    return [sys.executable, "-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider",
            f"--bench-device={device.type}", "--bench-size=tiny", "--bench-providers=seed,raft,ours",
            "--benchmark-max-time=0.001", "--benchmark-min-rounds=1", f"--bench-json={json_path}", *extra]


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_bench_json_keeps_what_a_killed_run_measured(tmp_path, device):
    """--bench-json is rewritten after every benchmark: SIGKILL mid-run (what the GPU
    check's grace ends in) leaves valid JSON with the benchmarks done so far."""
    path = tmp_path / "run.json"
    env = dict(_env(), OMP_NUM_THREADS="1")
    # 0.1 s per benchmark at least: the kill lands seconds before the end, not a race with it
    cmd = _bench_cmd(device, path, "--bench-dtypes=float32", "--benchmark-max-time=0.1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(json.loads(path.read_text())["benchmarks"]) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    data = json.loads(path.read_text())  # whole, never half written
    total = len(TINY_WORKLOADS) * 3 * 2  # workloads x providers x passes
    assert 2 <= len(data["benchmarks"]) < total
    assert data["machine_info"]["convgru"]["device"] == device.type


# The slow tier: a smoke run of a benchmark harness (seconds each on two cores).
@pytest.mark.slow
def test_bench_order_target_puts_the_bfloat16_training_step_first(tmp_path, device):
    proc = subprocess.run(_bench_cmd(device, tmp_path / "x.json", "--bench-dtypes=float32,bfloat16", "--bench-order=target",
                                     "--bench-workloads=raft-convgru,mmnist", "--collect-only"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    ids = [i for i in re.findall(r"\[([\w+-]+)\]", proc.stdout) if i.endswith(("float32", "bfloat16"))]
    keys = [(i.rsplit("-", 2)[-1], i.rsplit("-", 2)[-2]) for i in ids]  # (dtype, pass)
    order = [("bfloat16", "fwd+bwd"), ("bfloat16", "fwd"), ("float32", "fwd+bwd"), ("float32", "fwd")]
    assert len(ids) == 2 * 3 * 2 * 2 and keys == sorted(keys, key=order.index), ids


def _h200_record(workload, provider, pass_, dtype, ms):
    extra = {"workload": workload.name, "provider": provider, "pass": pass_, "dtype": dtype, "device": "cuda",
             "op": workload.op, "shape": workload.describe(), "peak_mem_bytes": 2**30}
    name = f"test_{workload.op}[{workload.name}-{provider}-{pass_}-{dtype}]"
    return {"group": "g", "name": name, "fullname": "bench/test_bench_conv_gru.py::" + name, "params": None,
            "extra_info": extra, "stats": {"median": ms / 1e3, "iqr": 0.0, "rounds": 10}}


def _h200_data(providers):
    """Benchmark JSON as the GPU check's parts write it, on the H200, with the RAFT
    step's wall times the H200's profile measured (raft 1.945, compile 2.578,
    ours 1.987 ms, bfloat16 fwd+bwd)."""
    raft = FULL_WORKLOADS[0]
    ms = {"seed": 2.5, "raft": 1.945, "compile": 2.578, "ours": 1.987, "ours-compile": 2.1}
    machine = {"device": "cuda", "gpu": "NVIDIA H200", "capability": "9.0", "torch": "2.11.0+cu130",
               "triton": "3.6.0", "commit": "3046799" + "0" * 33, "dirty": False}
    return {"machine_info": {"convgru": machine}, "datetime": "2026-12-04T15:20:00",
            "benchmarks": [_h200_record(raft, p, "fwd+bwd", "bfloat16", ms[p]) for p in providers]}


def test_report_from_what_the_parts_left(tmp_path, capsys):
    """The report part is handed every JSON of its temporary folder, the CUDA-graph
    and bandwidth results among them: what is not pytest-benchmark JSON, or is empty
    (a part killed before pytest-benchmark wrote), is skipped with a warning rather
    than failing the report (exit 2), and eager + compiled results merge into one report."""
    eager, compiled = tmp_path / "eager.json", tmp_path / "compiled.json"
    eager.write_text(json.dumps(_h200_data(["seed", "raft", "ours"])))
    compiled.write_text(json.dumps(_h200_data(["compile", "ours-compile"])))
    empty, foreign = tmp_path / "killed.json", tmp_path / "cuda_graphs-cuda.json"
    empty.write_text("")
    foreign.write_text(json.dumps({"device": "NVIDIA H200", "rows": []}))
    out = tmp_path / "out"
    args = [str(p) for p in (foreign, eager, empty, compiled)] + ["--out", str(out), "--name", "gpu-nvidia-h200",
                                                                  "--save-json"]
    assert report.main(args) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and str(empty) in err and str(foreign) in err
    text = (out / "gpu-nvidia-h200.md").read_text()
    times = [2.5, 1.945, 2.578, 1.987, 2.1]  # seed, raft, compile, ours, ours-compile
    assert "| raft-convgru | fwd+bwd | " + " | ".join(report._ms(t / 1e3) for t in times) + " |" in text
    # The targets, missed as the profile's times say: raft/ours = 0.98, compile/ours = 1.30.
    assert "`raft-convgru` vs raft: 0.98× (target 1.5×" in text and "missed in 1 of 2" in text
    # The roofline per workload: every provider's time over the floor.
    floor = roofline.floor_ms(FULL_WORKLOADS[0], "h200", "bfloat16", "fwd+bwd")
    row = next(l for l in text.splitlines() if l.startswith("| raft-convgru | fwd+bwd | 0."))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:] == [f"{t / floor:.1f}" for t in times]
    assert len(json.loads((out / "gpu-nvidia-h200.json").read_text())["benchmarks"]) == 5
    assert report.main([str(empty), str(foreign), "--out", str(out), "--name", "gpu-x"]) == 2  # nothing to report


def test_report_part_hands_the_cuda_graph_result_to_the_report(tmp_path, monkeypatch):
    """The CUDA-graph replay target needs bench/cuda_graphs.py's JSON in the report:
    the part passes the archived cuda_graphs-cuda.json with the benchmark JSON."""
    check = gpu_check.Check(str(tmp_path), echo=lambda *a: None)
    os.makedirs(check.raw, exist_ok=True)
    for name in ("eager.json", "cuda_graphs-cuda.json", "cuda_graphs.log"):
        with open(check.raw_path(name), "w") as f:
            f.write("{}")
    check.stash("eager.json", "cuda_graphs-cuda.json", "cuda_graphs.log")
    commands = []
    monkeypatch.setattr(check, "run", lambda name, cmd, log, limit: commands.append(list(cmd)) or 0)
    assert check.part_report(20) == 0
    (cmd,) = commands
    handed = [os.path.basename(a) for a in cmd if a.endswith(".json") or a.endswith(".log")]
    assert handed == ["eager.json", "cuda_graphs-cuda.json"]


def test_bandwidth_report_from_the_h200_run():
    """The first H200 run's raw bandwidth data (bench/results) through the markdown the
    check's summary quotes: the misses it found, and time over the roofline floor."""
    result = json.loads(open(H200_BANDWIDTH).read())
    text = bandwidth.markdown(result)
    assert "GPU: NVIDIA H200" in text and "commit 30467997c5ad" in text
    assert "missed in 6 of 36" in text
    assert "- gru_reset_gate_fwd bfloat16 nchw at 256 MiB: 45% (35 points short)" in text
    assert "roofline floor (bytes over 4300 GB/s" in text
    assert "| 256 | 1916 (45%, 2.2×) |" in text  # reset_gate_fwd, bfloat16, 256 MiB: twice its floor


# ----------------------------------------------------------------------------
# The accuracy check: TF32 where the baselines use it
# ----------------------------------------------------------------------------


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10 mantissa bits (round to nearest even), as tensor
    cores read float32 inputs when TF32 is on."""
    bits = t.float().contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def test_tf32_rounding_of_one_weight_gradient_is_well_inside_the_slack():
    """A 5x5 weight gradient at mmnist's channels and map (128, 16x16) from TF32-rounded
    inputs, against float64: one convolution's TF32 error is of TF32's unit roundoff
    (2**-11), a fifth of TF32_SLACK or less; a training step chains many of them (the
    H200's 1.37e-3 came after ten steps through two layers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, 16, 16, generator=g)
    dy = torch.randn(8, 128, 16, 16, generator=g)
    shape = (128, 128, 5, 5)
    exact = torch.nn.grad.conv2d_weight(x.double(), shape, dy.double(), padding=2)
    tf32 = torch.nn.grad.conv2d_weight(_tf32(x), shape, _tf32(dy), padding=2)
    error = float((tf32.double() - exact).norm() / exact.norm())
    assert 2**-11 / 10 < error < TF32_SLACK / 5
    assert float(_tf32(torch.tensor([1 + 2**-11 + 2**-12]))) == 1 + 2**-10  # to nearest
    assert float(_tf32(torch.tensor([1 + 2**-11]))) == 1.0  # a tie: to even
    assert float(_tf32(torch.tensor([-(1 + 3 * 2**-11)]))) == -(1 + 2**-9)


def test_allowed_error():
    assert allowed_error(torch.float32, False, 0.0) == FLOAT32_TOLERANCE  # no TF32: the float32 tolerance alone
    assert allowed_error(torch.float32, True, 0.0) == TF32_SLACK
    assert allowed_error(torch.bfloat16, False, 0.01) == 2 * 0.01 + LOW_PRECISION_SLACK
    assert allowed_error(torch.float32, True, 1e-3) == 2e-3 + TF32_SLACK


def _perturbed(exact, relative, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in exact.items():
        noise = torch.randn(v.shape, generator=g)
        out[k] = v + noise * (relative * v.norm() / noise.norm())
    return out


def test_the_h200_failure_passes_with_tf32_and_a_wrong_gradient_still_fails():
    """The H200's mmnist fwd+bwd float32: a weight gradient 1.37e-3 from the eager
    reference. With TF32 (as the baselines are timed) that is rounding; a gradient
    off by 5% is still caught, and without TF32 the float32 tolerance stands."""
    g = torch.Generator().manual_seed(1)
    exact = {"output[0]": torch.randn(4, 128, 16, 16, generator=g),
             "grad layers.0.weight": torch.randn(384, 144, 5, 5, generator=g)}
    ours = _perturbed(exact, 1.37e-3, 2)
    same = _perturbed(exact, 1.0e-3, 3)  # the eager reference, also with TF32
    assert accuracy_failures(ours, exact, same, torch.float32, tf32=True) == []
    # Also when the eager reference's own TF32 error is nil: the slack alone covers it.
    assert accuracy_failures(ours, exact, exact, torch.float32, tf32=True) == []
    failures = accuracy_failures(ours, exact, None, torch.float32, tf32=False)
    assert {k for k, _, _ in failures} == set(exact)  # without TF32, 1.37e-3 is too much
    wrong = dict(ours, **{"grad layers.0.weight": exact["grad layers.0.weight"] * 1.05})
    failures = accuracy_failures(wrong, exact, same, torch.float32, tf32=True)
    assert [k for k, _, _ in failures] == ["grad layers.0.weight"]
    (_, error, allowed), = failures
    assert error == pytest.approx(0.05, rel=1e-3) and allowed < 0.01


def test_uses_tf32_follows_the_device_and_the_settings(monkeypatch):
    assert not uses_tf32(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    # PyTorch's default, which the benchmarks keep (the test suite's conftest turns it off
    # on a GPU); set and restored by hand, as conftest.py does.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        assert uses_tf32(torch.device("cuda"), torch.float32)
        assert not uses_tf32(torch.device("cuda"), torch.bfloat16)
        with _exact_float32():
            assert not uses_tf32(torch.device("cuda"), torch.float32)
        assert uses_tf32(torch.device("cuda"), torch.float32)  # restored
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # no TF32 before sm_80
        assert not uses_tf32(torch.device("cuda"), torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------
# The kernel parts: bandwidth layouts, registers and spills
# ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path; the GPU check runs the real one")
@pytest.mark.triton_kernels
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


def test_raft_map_bandwidth_in_the_check(tmp_path):
    """The GPU check measures the kernels at RAFT's odd 46x62 map, hidden 128, both
    layouts, at the target's state sizes."""
    check = gpu_check.Check(str(tmp_path), echo=lambda *a: None)
    seen = []
    check.run = lambda name, cmd, log, limit: seen.append(cmd) or 0
    check.part_raft_bandwidth(20)
    cmd = " ".join(seen[0])
    assert "-m bench.bandwidth" in cmd and "--spatial 46x62 --layouts nchw,cl --sizes-mb 64,256" in cmd
    assert "--hidden 128" in cmd and "--dry-run" not in cmd
    check.part_registers(40)
    assert "-m bench.gpu_kernels" in " ".join(seen[1])


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
