"""The GPU check: one call of at most 9 minutes on a cold CUDA machine with no
network, compilation included.

    COMMIT=$(git rev-parse HEAD) bash bench/gpu_check.sh [OUT_DIR]   # OUT_DIR default: $OUT, else bench/results
    python -m bench.gpu_check --plan                                  # the time plan (any machine)
    python -m bench.gpu_check --smoke OUT_DIR                         # CPU: every part, tiny sizes, dry runs

Parts, in order, each with its own time limit (:data:`PLAN`):

1. ``env``: GPU, versions, installed test plugins; ``nvidia-smi``.
2. ``tests``: the whole test suite in parallel (pytest-xdist) with compiled
   kernels on CUDA tensors, but for the files of :data:`DESELECTED` (each with
   its reason). Beside it, on the cores the tests leave, ``torch.compile``
   fills its on-disk caches for every compiled benchmark (``prewarm``: the
   same benchmarks run once, not timed), and the roofline floors are computed.
3. ``eager``: the full-size benchmarks of the eager providers (ours-fused,
   seed, raft, ours), bfloat16 and float32, forward and training step.
4. ``bandwidth``: the gate kernels against a device-to-device copy, 1 MiB to 1
   GiB; then ``raft_bandwidth``: the same at RAFT's 46x62 map, both layouts.
5. ``cuda_graphs``: a 12-step RAFT loop eager, replayed from a CUDA graph, and
   under ``torch.compile(mode="reduce-overhead")``; the fused step's rows first.
6. ``profile``: where the time of the RAFT training step (bfloat16) goes, per
   provider (ours-fused, seed, raft, ours, compile, ours-compile).
7. ``compiled``: the benchmarks of the ``torch.compile`` providers (compile,
   ours-compile), bfloat16 training first; they get whatever time is left.
8. ``raft_model``, ``sequence``, ``registers``: run only when time is left
   (torchvision's RAFT whole, original against converted, eager first
   (``bench/raft_model.py``); sequence operator against per-step autograd;
   registers/spills of the GPU's kernels).
9. ``report``: table, chart and merged JSON of the benchmarks.

A part that runs out of time gets SIGINT (pytest still writes what it
measured), then SIGKILL :data:`GRACE_S` seconds later; the benchmark parts
rewrite their JSON after every benchmark (``--bench-json``), so even a killed
part keeps what it measured. Every part writes into the output directory: the
files of a finished part go straight into the archive ``gpu_check_raw.tar.gz``,
so that the output is never more than 8 files (the device machine brings back
at most 8):

=============================  ================================================
``gpu_check.md``               summary: environment, time plan, every part
``gpu_tests.log``              the test suite's log
``STEM.json``, ``.md``, .png   benchmarks: merged raw data, table, chart
``STEM-bandwidth.json``, .md   gate-kernel bandwidth
``gpu_check_raw.tar.gz``       every part's raw data and log (JUnit XML,
                               pytest-benchmark JSON per part, profile, ...)
=============================  ================================================

STEM is ``gpu-<gpu name>``. ``GPU_CHECK_BUDGET`` (seconds, default
:data:`BUDGET_S`) is the total; ``GPU_CHECK_BENCH_ARGS`` adds options to every
benchmark run (e.g. ``--bench-workloads=raft-convgru,dgmr``; see
bench/conftest.py). This module imports neither torch nor the package: the
parts run in their own processes.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# The time plan
# ----------------------------------------------------------------------------

# The device call is killed at 540 s (9 minutes). The plan ends by BUDGET_S: every
# part's limit and its grace are inside it; outside are only this script's own
# steps between parts (files, the archive: well under a second each), so the call
# ends by about 505 s, 35 s before it would be killed.
BUDGET_S = 500
DEVICE_CALL_LIMIT_S = 540
GRACE_S = 5  # SIGINT at the limit, SIGKILL this much later: pytest writes its reports in it


@dataclass(frozen=True)
class Part:
    """One part of the check: at most ``cap`` seconds (``None``: all that is left
    once the later parts' minimums are set aside), skipped when less than
    ``minimum`` is left. ``optional`` parts run only on time no other part needs
    (nothing is set aside for them). ``why``: where the cap comes from."""

    name: str
    cap: Optional[float]
    minimum: float
    why: str
    optional: bool = False


# Measurements quoted below are from the lent H200 (2026-12-04, torch 2.11, Triton 3.6,
# 16 cores; /work/shared/gpu-runs/2026-12-04-h200).
PLAN: Sequence[Part] = (
    Part("env", 15, 10, "import torch + CUDA start: 10 s on the H200 at 20a2c17"),
    Part("tests", 170, 60, "134 s measured with 12 xdist workers (load scheduling) for 617 tests, including a "
         "failing hypothesis test that shrank for 95 s; the suite has ~1000 tests since (autocast, compile, "
         "fused step: small tests but for ~30 that compile): 159 s on the H200 at 20a2c17, so 170 s; 12 workers with work stealing, and a "
         "120 s limit per test"),
    Part("eager", 80, 20, "52 s measured for 60 benchmarks (max-time 0.2 s, at least 10 rounds), 59 s at 20a2c17; "
         "+20 for ours-fused (20 more benchmarks and its Triton compiles); bfloat16 first, so a stop "
         "loses float32 rows"),
    Part("bandwidth", 30, 15, "25 s measured (72 rows: 6 kernels, 1 MiB..1 GiB, float32 and bfloat16), 24 s at 20a2c17"),
    Part("raft_bandwidth", 20, 10, "24 rows (2 sizes, 2 layouts, bfloat16) at ~0.2 s of do_bench each + ~8 s "
         "start: ~14 s"),
    Part("cuda_graphs", 40, 15, "each reduce-overhead compile took 3.4-3.6 s; the timed loops are ms; stopped at 25 s "
         "on the H200 at 20a2c17 (28 s needed); +5 for the fused step's replay (captured first)"),
    Part("profile", 35, 15, "6 providers, 13 steps each: 28 s for 5 at 20a2c17; +5 for ours-fused (profiled first); the "
         "compiled ones from the caches the prewarm filled"),
    Part("compiled", None, 45, "40 benchmarks, ~68 graphs from the prewarm's caches: 65 s at 20a2c17 (limit 142); "
         "minimum 45 (bfloat16 first), with all time the others leave"),
    Part("raft_model", 120, 40, "torchvision's raft_large/raft_small whole, original vs converted: 24 eager rows "
         "(~3-8 calls each, 0.05-0.5 s a call, estimated) then torch.compile rows (each compile ~30-90 s) until "
         "the cap; not measured yet; before sequence and registers, which were measured in the first run",
         optional=True),
    Part("sequence", 30, 20, "sequence operator vs per-step autograd: measured in the first run; again only "
         "on spare time", optional=True),
    Part("registers", 40, 25, "registers/spills of ~20 bfloat16 kernels: measured in the first run; again only "
         "on spare time", optional=True),
    # Its minimum is its cap: the part before it takes all the rest but this.
    Part("report", 20, 20, "imports matplotlib, torch and the roofline model: ~5-8 s"),
)

# Test files left out of the GPU run, with the reason (only slow or CPU-only files may
# be left out; CI runs them all on CPU).
DESELECTED: Dict[str, str] = {
    "tests/test_codegen.py": "CPU-only by design: compiles every kernel for a fake sm_90/sm_80 target in two "
                             "subprocesses (~95 s of CPU); on the GPU every other test runs the real kernels",
    "tests/test_example.py": "CPU-only: trains the example with --device cpu --backend torch",
    "tests/test_docs.py": "CPU-only and slow: the deployment recipes export to ONNX and run ONNX Runtime on CPU "
                          "tensors",
    "tests/test_deploy.py": "slow and mostly CPU: ONNX export (seconds per model), TorchScript and torch.export "
                            "on CPU tensors",
    "tests/test_ddp.py": "CPU-only: DDP/FSDP over 2 processes with gloo on CPU tensors",
    "tests/test_bench_cpu_interleaved.py": "CPU-only: times the CPU workloads",
    "tests/test_bench_host_overhead.py": "CPU-only: host overhead against a fake sm_90 target, CUDA-graph dry run",
    "tests/test_bench_sequence.py": "CPU-only: runs on torch.device('cpu')",
}
TEST_TIMEOUT_S = 120  # per test (pytest-timeout): the longest test took 95 s on the H200
PREWARM_WORKERS = 4  # of 16 cores: the tests take 12 (134 s measured with 12)
PREWARM_COMPILE_THREADS = 4  # Inductor's compile workers per prewarm process (default: one per core)
BENCH_TIMING = ["--benchmark-max-time=0.2", "--benchmark-min-rounds=10"]
# ours-fused first: --bench-order=target keeps the providers' order within a dtype and pass,
# and a part stopped at its cap then has the fused rows measured already.
EAGER_PROVIDERS = "ours-fused,seed,raft,ours"
COMPILED_PROVIDERS = "compile,ours-compile"
PROFILE_PROVIDERS = "ours-fused,seed,raft,ours,compile,ours-compile"
ARCHIVE = "gpu_check_raw.tar"


def limit_for(index: int, elapsed: float, budget: float, plan: Sequence[Part] = PLAN) -> float:
    """Seconds part ``plan[index]`` may run when it starts ``elapsed`` seconds into
    the check: its cap, but leaving every later non-optional part its minimum and
    each part its grace."""
    part = plan[index]
    reserve = sum(p.minimum + GRACE_S for p in plan[index + 1:] if not p.optional)
    left = budget - elapsed - GRACE_S - reserve
    return max(0.0, left if part.cap is None else min(part.cap, left))


def worst_case_s(plan: Sequence[Part] = PLAN) -> float:
    """Seconds the capped parts take when each uses its whole limit and grace,
    plus the minimum of the uncapped ones: the budget must hold this."""
    return sum((p.minimum if p.cap is None else p.cap) + GRACE_S for p in plan if not p.optional)


def plan_text(budget: float = BUDGET_S) -> str:
    lines = [f"budget {budget:.0f} s (the device call is killed at {DEVICE_CALL_LIMIT_S} s); "
             f"every part: SIGINT at its limit, SIGKILL {GRACE_S} s later", "",
             "| part | cap s | min s | why |", "|---|--:|--:|---|"]
    for p in PLAN:
        cap = "rest" if p.cap is None else f"{p.cap:.0f}"
        lines.append(f"| {p.name}{' (if time is left)' if p.optional else ''} | {cap} | {p.minimum:.0f} | {p.why} |")
    lines += ["", f"capped parts at their caps + the rest at its minimum, with grace: {worst_case_s():.0f} s"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Running commands with a deadline
# ----------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    proc: subprocess.Popen
    log: object
    start: float


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default action. A command
    started in the background by a non-interactive shell (a device tool, or
    CI's second pass) inherits SIGINT ignored, and so would every part: pytest
    would then never stop at its limit and write what it measured, only be
    killed 5 s later."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(name: str, cmd: Sequence[str], log_path: str, env: Dict[str, str]) -> Job:
    """Start ``cmd`` in a process group of its own (so that SIGINT reaches pytest's
    xdist workers and Inductor's compile workers too), with SIGINT's default
    action, output to ``log_path``."""
    log = open(log_path, "wb")
    log.write(("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
    log.flush()
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_sigint)
    return Job(name, proc, log, time.monotonic())


def _signal(job: Job, sig) -> None:
    try:
        os.killpg(job.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def finish(job: Job, deadline: float) -> int:
    """Wait for ``job`` until ``deadline`` (time.monotonic()); then SIGINT, then
    SIGKILL after :data:`GRACE_S`. Returns the exit status: 124 when it was
    stopped at its limit and exited on SIGINT, -9 when it had to be killed."""
    stopped = False
    try:
        job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stopped = True
        _signal(job, signal.SIGINT)
        try:
            job.proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            _signal(job, signal.SIGKILL)
            job.proc.wait()
    _signal(job, signal.SIGKILL)  # what it left behind in its group (e.g. compile workers)
    job.log.write(f"\n[gpu_check] exit {job.proc.returncode} after {time.monotonic() - job.start:.0f} s"
                  f"{' (stopped at its limit)' if stopped else ''}\n".encode())
    job.log.close()
    return 124 if stopped and job.proc.returncode != -signal.SIGKILL else job.proc.returncode


# ----------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # "ok", "failed (exit N)", "stopped at its limit", "killed at its limit", "skipped: ..."
    limit: float = 0.0
    took: float = 0.0
    code: Optional[int] = None


def describe(code: Optional[int]) -> str:
    if code == 0:
        return "ok"
    if code == 124:
        return "stopped at its limit"
    if code is not None and code < 0:
        return "killed at its limit" if code == -signal.SIGKILL else f"killed by signal {-code}"
    return f"failed (exit {code})"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "unknown"


_ENV_PROBE = r"""
import json, os, sys
from importlib import metadata
info = {"python": sys.version.split()[0], "commit": os.environ.get("COMMIT", "unknown"), "packages": {}}
for name in ("torch", "triton", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "hypothesis",
             "numpy", "matplotlib"):
    try:
        info["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info["packages"][name] = None
import torch
info["torch"] = torch.__version__
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"not importable ({type(exc).__name__})"
info["cuda_available"] = torch.cuda.is_available()
if info["cuda_available"]:
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version()
    free, total = torch.cuda.mem_get_info(0)
    info["memory_gib"] = [round(free / 2**30, 1), round(total / 2**30, 1)]
    info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
else:
    with open("/proc/cpuinfo") as f:
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "cpu")
print(json.dumps(info))
"""


class Check:
    """One run of the check: the plan's parts in order, into ``out``."""

    def __init__(self, out: str, budget: float = BUDGET_S, smoke: bool = False,
                 bench_args: Sequence[str] = (), commit: str = "unknown", echo=None, plan: Sequence[Part] = PLAN):
        self.out, self.budget, self.smoke, self.plan = os.path.abspath(out), budget, smoke, plan
        self.raw = os.path.join(self.out, "raw")
        # Flushed: the device tool returns what was printed, also when the call is stopped.
        self.bench_args, self.commit = list(bench_args), commit
        self.echo = echo or (lambda line: print(line, flush=True))
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
        self.outcomes: Dict[str, Outcome] = {}
        self.texts: Dict[str, str] = {}  # what the summary quotes, read before the files go into the archive
        self.info: Dict = {}
        self.stem = "gpu-unknown"
        self.env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CONVGRU_TRITON_BACKEND")}
        if smoke:  # on the CPU, ours-fused's kernels run under the interpreter (else it is skipped)
            self.env["TRITON_INTERPRET"] = "1"
        self.env.update(PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                           else ""), PYTHONUNBUFFERED="1", COMMIT=commit)
        self.has_xdist = importlib.util.find_spec("xdist") is not None
        self.has_timeout = importlib.util.find_spec("pytest_timeout") is not None
        self.preexisting: set = set()

    # Files ------------------------------------------------------------------

    def raw_path(self, name: str) -> str:
        return os.path.join(self.raw, name)

    def read(self, path: str, limit: int = 200_000) -> str:
        try:
            with open(path, errors="replace") as f:
                return f.read(limit)
        except OSError:
            return ""

    def stash(self, *names: str) -> None:
        """Move raw files into the archive (uncompressed until the end, so that it
        can grow part by part): a finished part's data is in the output at once."""
        with tarfile.open(os.path.join(self.out, ARCHIVE), "a") as tar:
            for name in names:
                path = self.raw_path(name)
                if os.path.isfile(path):
                    tar.add(path, arcname=name)
                    os.remove(path)

    def archived(self) -> List[str]:
        path = os.path.join(self.out, ARCHIVE)
        if not os.path.exists(path):
            return []
        with tarfile.open(path) as tar:
            return tar.getnames()

    def extract(self, names: Sequence[str], into: str) -> List[str]:
        """Copies of archived files (the report reads the benchmark JSON from here)."""
        got = []
        path = os.path.join(self.out, ARCHIVE)
        if not os.path.exists(path):
            return got
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in names:
                if name in members:
                    with tar.extractfile(members[name]) as src, open(os.path.join(into, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    got.append(os.path.join(into, name))
        return got

    def allowed_outputs(self) -> List[str]:
        s = self.stem
        return ["gpu_check.md", "gpu_tests.log", f"{s}.json", f"{s}.md", f"{s}.png", f"{s}-bandwidth.json",
                f"{s}-bandwidth.md", ARCHIVE + ".gz"]

    # Running ----------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def python(self, *args: str) -> List[str]:
        return [sys.executable, *args]

    def run(self, name: str, cmd: Sequence[str], log: str, limit: float) -> int:
        return finish(start(name, cmd, log, self.env), time.monotonic() + limit)

    def main(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        # Files already there (bench/results holds committed results) are never moved or archived.
        self.preexisting = set(os.listdir(self.out)) - set(self.allowed_outputs()) - {ARCHIVE, "raw"}
        os.makedirs(self.raw, exist_ok=True)
        for stale in [ARCHIVE, ARCHIVE + ".gz"]:
            if os.path.exists(os.path.join(self.out, stale)):
                os.remove(os.path.join(self.out, stale))
        self.echo(f"GPU check: budget {self.budget:.0f} s, output {self.out}")
        for index, part in enumerate(self.plan):
            limit = limit_for(index, self.elapsed(), self.budget, self.plan)
            if limit < part.minimum:
                self.outcomes[part.name] = Outcome(f"skipped: {limit:.0f} s left, needs {part.minimum:.0f}", limit)
            else:
                began = time.monotonic()
                code = getattr(self, "part_" + part.name)(limit)
                if isinstance(code, str):  # a reason not to run
                    self.outcomes[part.name] = Outcome(f"skipped: {code}", limit)
                else:
                    self.outcomes[part.name] = Outcome(describe(code), limit, time.monotonic() - began, code)
            o = self.outcomes[part.name]
            self.echo(f"[{self.elapsed():4.0f} s] {part.name}: {o.status}"
                      + (f" after {o.took:.0f} s (limit {o.limit:.0f} s)" if o.code is not None else ""))
            if part.name == "env" and o.code != 0:
                self.write_summary()
                self.finalize()
                return 2
            self.write_summary()
        self.finalize()
        failed = [n for n, o in self.outcomes.items() if o.code not in (0, None)]
        for line in (self.texts.get("report", "") + self.texts.get("bandwidth", "")).splitlines():
            if line.startswith(("Target", "- ")):
                self.echo(line)
        self.echo(f"[{self.elapsed():4.0f} s] done; summary: {os.path.join(self.out, 'gpu_check.md')}"
                  + (f"; not ok: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    # The parts ----------------------------------------------------------------

    def part_env(self, limit: float) -> int:
        deadline = time.monotonic() + limit
        if shutil.which("nvidia-smi"):
            finish(start("nvidia-smi", ["nvidia-smi"], self.raw_path("nvidia-smi.txt"), self.env),
                   min(deadline, time.monotonic() + 15))
        probe = self.raw_path("env.json")
        with open(probe, "w") as f:
            proc = subprocess.Popen(self.python("-c", _ENV_PROBE), cwd=ROOT, env=self.env, stdout=f,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                self.texts["env_error"] = "the environment probe ran past its limit"
                return 124
        if proc.returncode != 0:
            self.texts["env_error"] = err[-2000:]
            return proc.returncode
        self.info = json.loads(self.read(probe))
        self.info["commit"] = self.commit
        if self.info.get("cuda_available"):
            self.stem = f"gpu-{_slug(self.info['gpu'])}"
        elif self.smoke:
            self.stem = f"cpu-{_slug(self.info.get('cpu', 'cpu'))}"
        else:
            self.texts["env_error"] = "no CUDA device (torch.cuda.is_available() is False): this check is for a GPU"
            return 2
        self.texts["nvidia-smi"] = self.read(self.raw_path("nvidia-smi.txt"))
        self.stash("env.json", "nvidia-smi.txt")
        return 0

    def test_command(self) -> List[str]:
        if self.smoke:  # the plumbing only: a fast pure-Python file
            paths, ignores = ["tests/test_bench_roofline.py"], []
        else:
            paths, ignores = ["tests"], [f"--ignore={p}" for p in DESELECTED]
        # Every test: the slow tier too (pyproject.toml deselects it by default).
        cmd = self.python("-m", "pytest", *paths, "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "slow or not slow",
                          f"--junitxml={self.raw_path('gpu_tests.xml')}", *ignores)
        if self.has_xdist:
            workers = max(1, (os.cpu_count() or 1) - (PREWARM_WORKERS if self.prewarm_runs() else 0))
            cmd += ["-n", str(workers), "--dist", "worksteal"]
        if self.has_timeout:
            cmd += [f"--timeout={TEST_TIMEOUT_S}"]
        return cmd

    def prewarm_runs(self) -> bool:
        """The prewarm needs xdist (its point is compiling in parallel) and spare cores."""
        return self.has_xdist and not self.smoke and (os.cpu_count() or 1) >= 2 * PREWARM_WORKERS

    def bench_command(self, name: str, providers: str, *extra: str, timed: bool = True) -> List[str]:
        cmd = self.python("-m", "pytest", "bench", "-q", "-rfEs", "-p", "no:cacheprovider",
                          f"--bench-providers={providers}", "--bench-order=target", *extra)
        if timed:
            cmd += ["--benchmark-only", *BENCH_TIMING, f"--bench-json={self.raw_path(name + '.json')}"]
        if self.smoke:
            cmd += ["--bench-device=cpu", "--bench-size=tiny", "--bench-workloads=raft-convgru",
                    "--benchmark-max-time=0.001", "--benchmark-min-rounds=1"]
            if providers == COMPILED_PROVIDERS:  # one compile on two CPU cores takes 5-20 s: one benchmark
                cmd += ["--bench-providers=ours-compile", "--bench-passes=fwd", "--bench-dtypes=float32"]
        return cmd + self.bench_args

    def part_tests(self, limit: float) -> int:
        deadline = time.monotonic() + limit
        background = []
        if self.prewarm_runs():
            # torch.compile's caches (FX graph, AOTAutograd, Triton) are on disk and shared by
            # processes: each compiled benchmark run once here, 4 at a time, makes the timed
            # run load its graphs instead of compiling them. On CPU the same cache took a
            # 2-workload compiled run from 67 s to 6 s (this repo, torch 2.13).
            env = dict(self.env, TORCHINDUCTOR_COMPILE_THREADS=str(PREWARM_COMPILE_THREADS))
            cmd = self.bench_command("prewarm", COMPILED_PROVIDERS, "--benchmark-disable", "-n",
                                     str(PREWARM_WORKERS), "--dist", "worksteal", timed=False)
            background.append(("prewarm", start("prewarm", cmd, self.raw_path("prewarm.log"), env)))
        # The roofline floors of every workload: arithmetic on the CPU, beside the tests.
        background.append(("roofline", start(
            "roofline", self.python("-m", "bench.roofline", "--device", "h200,h100-sxm", "--dtype",
                                    "bfloat16,float32"), self.raw_path("roofline.md"), self.env)))
        code = finish(start("tests", self.test_command(), os.path.join(self.out, "gpu_tests.log"), self.env),
                      deadline)
        for name, job in background:
            self.texts[name + "_status"] = describe(finish(job, deadline))
        self.texts["roofline"] = self.read(self.raw_path("roofline.md"))
        self.texts["prewarm"] = self.read(self.raw_path("prewarm.log"))
        self.stash("gpu_tests.xml", "prewarm.log", "roofline.md")
        return code

    def _bench(self, name: str, providers: str, limit: float) -> int:
        code = self.run(name, self.bench_command(name, providers), self.raw_path(name + ".log"), limit)
        self.texts[name] = self.read(self.raw_path(name + ".log"))
        self.stash(name + ".log", name + ".json")
        return code

    def part_eager(self, limit: float) -> int:
        return self._bench("eager", EAGER_PROVIDERS, limit)

    def part_compiled(self, limit: float) -> int:
        return self._bench("compiled", COMPILED_PROVIDERS, limit)

    def part_bandwidth(self, limit: float) -> int:
        cmd = self.python("-m", "bench.bandwidth", "--out", self.out, "--name", f"{self.stem}-bandwidth")
        code = self.run("bandwidth", cmd + (["--dry-run"] if self.smoke else []), self.raw_path("bandwidth.log"),
                        limit)
        self.texts["bandwidth"] = self.read(os.path.join(self.out, f"{self.stem}-bandwidth.md"))
        self.texts["bandwidth_log"] = self.read(self.raw_path("bandwidth.log"))
        self.stash("bandwidth.log")
        return code

    def part_raft_bandwidth(self, limit: float) -> int:
        # RAFT's odd map (46x62 = 2852 pixels, a multiple of 4 only; hidden 128),
        # contiguous and channels_last, states of 64 and 256 MiB (the 80%-of-copy target's sizes).
        cmd = self.python("-m", "bench.bandwidth", "--out", self.raw, "--name", "raft-bandwidth", "--hidden", "128",
                          "--spatial", "46x62", "--layouts", "nchw,cl", "--sizes-mb", "64,256",
                          "--dtypes", "bfloat16")
        code = self.run("raft_bandwidth", cmd + (["--dry-run"] if self.smoke else []),
                        self.raw_path("raft-bandwidth.log"), limit)
        self.texts["raft_bandwidth"] = self.read(self.raw_path("raft-bandwidth.md"))
        self.texts["raft_bandwidth_log"] = self.read(self.raw_path("raft-bandwidth.log"))
        self.stash("raft-bandwidth.json", "raft-bandwidth.md", "raft-bandwidth.log")
        return code

    def part_cuda_graphs(self, limit: float) -> int:
        # The timed loops stop at --time-limit; the rest of the limit is for start and compiles.
        cmd = self.python("-m", "bench.cuda_graphs", "--out", self.raw, "--time-limit", f"{max(5, limit - 15):.0f}")
        code = self.run("cuda_graphs", cmd + (["--dry-run"] if self.smoke else []), self.raw_path("cuda_graphs.log"),
                        limit)
        kind = "cpu" if self.smoke else "cuda"
        self.texts["cuda_graphs"] = self.read(self.raw_path(f"cuda_graphs-{kind}.md"))
        self.texts["cuda_graphs_log"] = self.read(self.raw_path("cuda_graphs.log"))
        self.stash(f"cuda_graphs-{kind}.md", f"cuda_graphs-{kind}.json", "cuda_graphs.log")
        return code

    def part_profile(self, limit: float) -> int:
        cmd = self.python("-m", "bench.profile_workload", "--workload", "raft-convgru", "--pass", "fwd+bwd")
        if self.smoke:
            cmd += ["--device", "cpu", "--size", "tiny", "--dtype", "float32", "--providers", "ours-fused,raft,ours",
                    "--steps", "1"]
        else:
            cmd += ["--dtype", "bfloat16", "--providers", PROFILE_PROVIDERS]
        code = self.run("profile", cmd, self.raw_path("profile.md"), limit)
        self.texts["profile"] = self.read(self.raw_path("profile.md"))
        self.stash("profile.md")
        return code

    def part_raft_model(self, limit: float):
        if self.smoke:
            return "smoke run (tests/test_bench_raft_model.py runs the script's --smoke on CPU)"
        # No row starts in the last 25 s: the import, the models' construction, and a row
        # already started (SIGINT at the limit still leaves the JSON of the rows before it).
        cmd = self.python("-m", "bench.raft_model", "--out", self.raw, "--time-limit", f"{max(5, limit - 25):.0f}")
        code = self.run("raft_model", cmd, self.raw_path("raft_model.log"), limit)
        self.texts["raft_model"] = self.read(self.raw_path("raft_model-cuda.md"))
        self.texts["raft_model_log"] = self.read(self.raw_path("raft_model.log"))
        self.stash("raft_model-cuda.md", "raft_model-cuda.json", "raft_model.log")
        return code

    def part_sequence(self, limit: float):
        if self.smoke:
            return "smoke run (full workloads only; tests/test_bench_sequence.py runs the script on CPU)"
        code = self.run("sequence", self.python("-m", "bench.sequence_vs_steps", "--dtype", "bfloat16", "--out",
                                                self.raw), self.raw_path("sequence.md"), limit)
        self.texts["sequence"] = self.read(self.raw_path("sequence.md"))
        self.stash("sequence.md", "sequence_vs_steps-cuda.json")
        return code

    def part_registers(self, limit: float):
        if self.smoke:
            return "smoke run (tests/test_bench_gpu_check.py checks the comparison on CPU)"
        # bfloat16 only: each kernel compiles at its first launch (about 20 builds)
        code = self.run("registers", self.python("-m", "bench.gpu_kernels", "--dtypes", "bfloat16", "--json",
                                                 self.raw_path("gpu_kernels.json")),
                        self.raw_path("gpu_kernels.md"), limit)
        self.texts["registers"] = self.read(self.raw_path("gpu_kernels.md"))
        self.stash("gpu_kernels.md", "gpu_kernels.json")
        return code

    def part_report(self, limit: float) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            # cuda_graphs-cuda.json: the replay rows of the fused step's targets table (a smoke run's CPU
            # file is not a GPU result and is not passed).
            jsons = self.extract(["eager.json", "compiled.json", "cuda_graphs-cuda.json"], tmp)
            if not jsons:
                self.texts["report_log"] = "no benchmark results to report"
                return 3
            cmd = self.python("-m", "bench.report", *jsons, "--out", self.out, "--name", self.stem, "--save-json")
            code = self.run("report", cmd, self.raw_path("report.log"), limit)
        self.texts["report"] = self.read(os.path.join(self.out, f"{self.stem}.md"))
        self.texts["report_log"] = self.read(self.raw_path("report.log"))
        self.stash("report.log")
        return code

    # Output -------------------------------------------------------------------

    def finalize(self) -> None:
        """Everything not among the 8 output files into the archive, then compress it."""
        keep = set(self.allowed_outputs())
        if os.path.isdir(self.raw):
            self.stash(*sorted(os.listdir(self.raw)))
            shutil.rmtree(self.raw, ignore_errors=True)
        strays = [n for n in os.listdir(self.out) if n not in keep and n != ARCHIVE
                  and n not in self.preexisting and os.path.isfile(os.path.join(self.out, n))]
        if strays:
            os.makedirs(self.raw, exist_ok=True)
            for n in strays:
                shutil.move(os.path.join(self.out, n), self.raw_path(n))
            self.stash(*strays)
            shutil.rmtree(self.raw, ignore_errors=True)
        self.write_summary(final=True)  # lists the archive: written before it is compressed
        tar = os.path.join(self.out, ARCHIVE)
        if os.path.exists(tar):
            with open(tar, "rb") as src, gzip.open(tar + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(tar)

    def write_summary(self, final: bool = False) -> None:
        path = os.path.join(self.out, "gpu_check.md")
        with open(path + ".part", "w") as f:
            f.write(summary(self, final))
        os.replace(path + ".part", path)


# ----------------------------------------------------------------------------
# The summary (gpu_check.md)
# ----------------------------------------------------------------------------

# Lines of a part's output that say nothing about the GPU: the command and exit lines this
# script writes into every log, and warnings of other libraries.
_NOISE = re.compile(r"^(\$ |\[gpu_check\] |USDT|\[W|\s*warnings\.warn|\s*_warn_once|"
                    r".*UserWarning: Warning: Profiler clears)")


def _fence(text: str, lines: int = 20) -> List[str]:
    body = [l for l in text.rstrip().splitlines() if not _NOISE.match(l)][-lines:]
    return ["```", *body, "```"] if body else []


def _clean(text: str) -> List[str]:
    return [l for l in text.rstrip().splitlines() if not _NOISE.match(l)]


def pytest_digest(log: str, failures: int = 40) -> List[str]:
    """The counts line, and every FAILED/ERROR line (at most ``failures``) of a pytest log,
    with each failed benchmark's first ``E`` line (its assertion)."""
    lines = log.splitlines()
    counts = [l for l in lines if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", l)
              and re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)|no tests ran", l)
              and not l.startswith(("FAILED", "ERROR", "SKIPPED"))]
    bad = [l for l in lines if l.startswith(("FAILED", "ERROR"))]
    first_e = [l for l in lines if l.startswith("E  ")][:5]
    out = ["```"] + counts[-1:] + bad[:failures]
    if len(bad) > failures:
        out.append(f"... and {len(bad) - failures} more (see the log)")
    if first_e:
        out += ["", "first assertion lines:"] + [l[:300] for l in first_e]
    out += [l for l in lines if "KeyboardInterrupt" in l][-1:] + ["```"]
    return out


def summary(check: Check, final: bool = False) -> str:
    info, texts, out = check.info, check.texts, check.outcomes
    stem = check.stem
    lines = ["# GPU check", ""]
    if info:
        pk = info.get("packages", {})
        lines += [f"- gpu: {info.get('gpu', info.get('cpu', '?'))}"
                  + (f" (sm {info['capability']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
                     f"{info['memory_gib'][0]} of {info['memory_gib'][1]} GiB free, cuDNN TF32 "
                     f"{'on' if info.get('cudnn_allow_tf32') else 'off'})" if info.get("gpu") else ""),
                  f"- torch {info.get('torch')}, triton {info.get('triton')}, python {info.get('python')}",
                  "- " + ", ".join(f"{k} {v or 'missing'}" for k, v in pk.items() if k not in ("torch", "triton")),
                  f"- commit: {check.commit}"]
    lines += [f"- started {check.started}; {check.elapsed():.0f} s of a {check.budget:.0f} s budget"
              + ("" if final else " (still running)")]
    if check.smoke:
        lines += ["- **smoke run** (CPU, tiny sizes, dry runs): checks this script, the numbers mean nothing"]
    if "env_error" in texts:
        lines += ["", "**The check stopped:** " + texts["env_error"].strip()]
    lines += ["", "## Time plan", "", "| part | limit s | took s | outcome | cap s: why |", "|---|--:|--:|---|---|"]
    for p in check.plan:
        o = out.get(p.name)
        cap = "rest" if p.cap is None else f"{p.cap:.0f}"
        if o is None:
            lines.append(f"| {p.name} | | | not run yet | {cap}: {p.why} |")
        else:
            took = f"{o.took:.0f}" if o.code is not None else ""
            lines.append(f"| {p.name} | {o.limit:.0f} | {took} | {o.status} | {cap}: {p.why} |")
    for name in ("prewarm", "roofline"):
        if name + "_status" in texts:
            lines.append(f"\n`{name}` (beside the tests): {texts[name + '_status']}")

    def part(title: str, name: str, body: List[str]) -> None:
        o = out.get(name)
        if o is None:
            return
        lines.extend(["", f"## {title}", ""])
        if o.code is None:
            lines.extend([o.status, ""])
            return
        lines.extend([f"`{name}`: {o.status} after {o.took:.0f} s (limit {o.limit:.0f} s).", ""] + body)

    tests_log = check.read(os.path.join(check.out, "gpu_tests.log"))
    dropped = "".join(f"\n- `{p}`: {why}" for p, why in DESELECTED.items())
    how = ((f"{'xdist' if check.has_xdist else 'one process (pytest-xdist is missing)'}"
            + (f", {TEST_TIMEOUT_S} s per test" if check.has_timeout else "")))
    part("Test suite (compiled kernels, CUDA tensors)", "tests",
         [f"Run: {how}. Log: `gpu_tests.log`; JUnit XML: `gpu_tests.xml` in the archive. "
          f"Left out:{dropped if not check.smoke else ' (smoke run: one file)'}", ""] + pytest_digest(tests_log))

    bench_body = []
    for name in ("eager", "compiled"):
        if name in texts:
            bench_body += [f"`{name}` run:"] + pytest_digest(texts[name]) + [""]
    if texts.get("prewarm"):
        bench_body += ["`prewarm` (compile caches, beside the tests):"] + pytest_digest(texts["prewarm"], 10) + [""]
    report = texts.get("report", "")
    if report:
        body = [l for l in report.splitlines() if not l.startswith(("# ", "!["))]
        bench_body += [f"Report: `{stem}.md` (table), `{stem}.png` (chart), `{stem}.json` (raw, merged).", ""] + body
    elif "report_log" in texts:
        bench_body += ["No report:"] + _fence(texts["report_log"])
    if out.get("eager") or out.get("compiled"):
        lines.extend(["", "## Benchmarks (full size)", ""])
        for name in ("eager", "compiled"):
            o = out.get(name)
            if o is not None:
                lines.append(f"- `{name}`: {o.status}" + (f" after {o.took:.0f} s (limit {o.limit:.0f} s)"
                                                          if o.code is not None else ""))
        lines.extend([""] + bench_body)

    if texts.get("roofline"):
        lines.extend(["", "## Roofline floors per workload", "",
                      "The least time any implementation of this design can take (`python -m bench.roofline`); "
                      "measured / floor per provider is in the benchmark report above.", ""]
                     + _clean(texts["roofline"]))

    part("Profile of the RAFT step (fwd+bwd, bfloat16), per provider", "profile", _clean(texts.get("profile", "")))
    bw = texts.get("bandwidth", "")
    part("Gate-kernel bandwidth", "bandwidth",
         ([f"Table: `{stem}-bandwidth.md`, raw: `{stem}-bandwidth.json`.", ""] +
          [l for l in bw.splitlines() if l.startswith(("Target", "- "))]) if bw else
         _fence(texts.get("bandwidth_log", "")))
    rb = texts.get("raft_bandwidth", "")
    part("Gate-kernel bandwidth at RAFT's 46x62 map, hidden 128", "raft_bandwidth",
         (rb[rb.find("Achieved"):].splitlines() if "Achieved" in rb else rb.splitlines()) if rb else
         _fence(texts.get("raft_bandwidth_log", "")))
    cg = texts.get("cuda_graphs", "")
    part("CUDA graphs: 12-step RAFT update loop", "cuda_graphs",
         cg.splitlines()[2:] if cg else _fence(texts.get("cuda_graphs_log", "")))
    rm = texts.get("raft_model", "")
    part("Whole RAFT (torchvision): original vs converted", "raft_model",
         [l for l in rm.splitlines() if not l.startswith("# ")] if rm else _fence(texts.get("raft_model_log", "")))
    part("Sequence operator vs per-step autograd (bfloat16)", "sequence", _clean(texts.get("sequence", "")))
    part("Registers and spills: the GPU's kernels vs the CPU-side prediction", "registers",
         _clean(texts.get("registers", "")))
    if texts.get("nvidia-smi"):
        lines.extend(["", "<details><summary>nvidia-smi</summary>", "", "```", *_clean(texts["nvidia-smi"]), "```",
                      "", "</details>"])
    if final:
        here = [n for n in check.allowed_outputs() if n == "gpu_check.md"
                or os.path.exists(os.path.join(check.out, n[:-3] if n == ARCHIVE + ".gz" else n))]
        lines.extend(["", "## Files", "", "In this folder: " + ", ".join(f"`{n}`" for n in here), "",
                      f"In `{ARCHIVE}.gz`: " + ", ".join(f"`{n}`" for n in check.archived())])
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bash bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"),
                        help="output directory (default: $OUT, else bench/results)")
    parser.add_argument("--plan", action="store_true", help="print the time plan and exit")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of this script: every part on tiny sizes or as a dry run")
    args = parser.parse_args(argv)
    budget = float(os.environ.get("GPU_CHECK_BUDGET", BUDGET_S))
    if args.plan:
        print(plan_text(budget))
        return 0
    commit = os.environ.get("COMMIT") or _git_head()
    check = Check(args.out, budget, args.smoke, shlex.split(os.environ.get("GPU_CHECK_BENCH_ARGS", "")), commit)
    return check.main()


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
