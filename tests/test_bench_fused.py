"""The ``ours-fused`` benchmark provider: it runs the fused
step's kernels (forward and backward with the ``fused_step`` setting held at
1), computes what ``ours`` computes, ``ours`` runs none of them, the setting is
restored after each call; and the report's fused-step targets from numbers chosen
here: the benchmark rows, and the CUDA-graph replay (bench/cuda_graphs.py's JSON)
over the roofline floor of the inference step, or what is missing for it."""

import json
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench import gpu_check, report, workloads  # noqa: E402

switch = workloads.switch  # the fused_step setting in force


@pytest.fixture
def caller(package_settings):
    """``caller(value)``: the caller's fused_step setting (``None``: the
    default, no override), which each provider must give back."""
    def set_to(value):
        if value is not None:
            package_settings(fused_step=value)
        return switch()

    return set_to


def _run(workload, provider, device, seen):
    master = workloads.make_master(workload, device)
    model = workloads.build_model(workload, provider, master, torch.float32)
    inputs = workloads.make_inputs(workload, device, torch.float32, requires_grad=True)
    # A hook on an input's gradient runs inside the backward pass: the switch then.
    inputs.xs[0].register_hook(lambda g: seen.append(switch()))
    with workloads.count_fused_launches() as launches:
        outputs = model(inputs.xs, inputs.hs)
        after_forward = switch()
        torch.autograd.backward(outputs, inputs.grads)
    grads = [t.grad for t in inputs.leaves()] + [p.grad for p in model.parameters()]
    return [o.detach() for o in outputs] + grads, launches[0], after_forward


@pytest.mark.triton_kernels
@pytest.mark.parametrize("name", ["raft-sepconvgru", pytest.param("mmnist", marks=pytest.mark.slow)])
def test_ours_fused_runs_the_fused_step_and_computes_what_ours_does(name, device, caller):
    workload = next(w for w in workloads.TINY_WORKLOADS if w.name == name)
    caller("auto")  # the caller's value: each provider forces its own and gives this back
    fused_seen, ours_seen = [], []
    fused, fused_launches, fused_after = _run(workload, "ours-fused", device, fused_seen)
    assert switch() == "auto" and fused_after == "auto"
    ours, ours_launches, _ = _run(workload, "ours", device, ours_seen)
    assert switch() == "auto"
    assert fused_launches > 0 and ours_launches == 0
    assert fused_seen == ["1"] and ours_seen == ["0"]  # held through the backward, then restored
    workloads.check_path("ours-fused", fused_launches)
    with pytest.raises(AssertionError, match="launched no fused-step kernel"):
        workloads.check_path("ours-fused", 0)
    with pytest.raises(AssertionError, match="CONVGRU_TRITON_FUSED_STEP=0"):
        workloads.check_path("ours", 3)
    assert len(fused) == len(ours)
    for a, b in zip(fused, ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ours_fused_says_why_it_cannot_run():
    assert workloads.unavailable("ours", "cpu", torch.bfloat16) is None
    reason = workloads.unavailable("ours-fused", "cpu", torch.bfloat16)
    assert reason and reason.startswith("ours-fused")  # no kernels (interpreter off) or no bfloat16 in it
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        assert "bfloat16" in reason and workloads.unavailable("ours-fused", "cpu", torch.float32) is None


def test_switch_restores_the_setting(caller):
    before = caller(None)
    with workloads.fused_switch("1"):
        assert switch() == "1"
    assert switch() == before
    with pytest.raises(RuntimeError, match="inside"):
        with workloads.fused_switch("0"):
            raise RuntimeError("inside")
    assert switch() == before


def _record(workload, provider, pass_, ms):
    extra = {"workload": workload, "provider": provider, "pass": pass_, "dtype": "bfloat16", "device": "cuda",
             "op": "conv_gru_cell"}
    name = f"test_conv_gru_cell[{workload}-{provider}-{pass_}-bfloat16]"
    return {"group": name, "name": name, "fullname": name, "params": None, "extra_info": extra,
            "stats": {"median": ms / 1e3, "min": ms / 1e3, "max": ms / 1e3, "rounds": 3}}


def test_fused_step_targets_from_chosen_numbers():
    # raft-convgru fwd+bwd: raft 3.0, compile 2.5, ours 2.2, fused 1.5 ms:
    #   fused 2.0x raft (met), 1.67x compile (met); ours 1.36x raft (missed), 1.14x compile (missed).
    # raft-convgru fwd: fused not run: its rows are "not measured".
    # dgmr fwd+bwd: ours 4.0, fused 5.0 ms: 0.8 (missed); mmnist fwd: ours 2.0, fused 1.0: 2.0 (met).
    times = {("raft-convgru", "fwd+bwd"): {"raft": 3.0, "compile": 2.5, "ours": 2.2, "ours-fused": 1.5},
             ("raft-convgru", "fwd"): {"raft": 1.0, "compile": 0.8, "ours": 0.5},
             ("dgmr", "fwd+bwd"): {"ours": 4.0, "ours-fused": 5.0},
             ("mmnist", "fwd"): {"ours": 2.0, "ours-fused": 1.0}}
    data = {"machine_info": {"convgru": {"device": "cuda", "gpu": "NVIDIA H200"}},
            "benchmarks": [_record(w, p, pass_, ms) for (w, pass_), row in times.items() for p, ms in row.items()]}
    rows = {(m, p): (measured, goal, met) for m, p, measured, goal, met in report.fused_step_targets(data)}
    train = "`raft-convgru` training (fwd+bwd)"
    assert rows[(f"{train} vs raft", "ours-fused")][2] is True
    assert rows[(f"{train} vs raft", "ours-fused")][0] == pytest.approx(2.0)
    assert rows[(f"{train} vs compile", "ours-fused")][2] is True
    assert rows[(f"{train} vs raft", "ours")][2] is False
    assert rows[(f"{train} vs compile", "ours")][0] == pytest.approx(2.5 / 2.2)
    assert rows[(f"{train} vs compile", "ours")][2] is False
    assert rows[("`raft-convgru` inference (fwd) vs raft", "ours-fused")][2] is None
    assert rows[("`raft-convgru` inference (fwd) vs raft", "ours")][2] is True  # 2.0x
    dgmr = rows[("`dgmr` training (fwd+bwd): no slower than the default path (ours / fused)", "ours-fused")]
    assert dgmr[0] == pytest.approx(0.8) and dgmr[2] is False
    assert rows[("`mmnist` inference (fwd): no slower than the default path (ours / fused)", "ours-fused")][2] is True
    text = report.markdown(data)
    assert "**Fused-step targets**" in text
    assert "| `raft-convgru` training (fwd+bwd) vs raft | ours-fused | 2.00× | ≥ 1.5× | met |" in text
    assert "| `raft-convgru` training (fwd+bwd) vs compile | ours | 1.14× | ≥ 1.2× | missed |" in text
    assert "| `raft-convgru` inference (fwd) vs raft | ours-fused | — | ≥ 1.5× | not measured |" in text
    assert "fused vs ours" in text and "1.47×" in text  # 2.2 / 1.5


def test_gpu_check_runs_the_fused_provider_first_within_budget():
    assert gpu_check.EAGER_PROVIDERS.split(",")[0] == "ours-fused"
    assert gpu_check.PROFILE_PROVIDERS.split(",")[0] == "ours-fused"
    assert gpu_check.worst_case_s() <= gpu_check.BUDGET_S


# ----------------------------------------------------------------------------
# The CUDA-graph target: bench/cuda_graphs.py's replay over the roofline floor
# ----------------------------------------------------------------------------

H200 = "NVIDIA H200"


def _graph_json(rows, gpu=H200, **over):
    """bench/cuda_graphs.py's JSON of a GPU run (the keys of its result_json), RAFT's full size."""
    data = {"device": gpu, "device_type": "cuda", "dtype": "torch.bfloat16", "batch": 6, "steps": 12,
            "input_channels": 256, "hidden_channels": 128, "size": [46, 62], "rows": rows}
    data.update(over)
    return data


def _graph_row(cell, fused, graph_ms=None, **extra):
    from bench import cuda_graphs

    row = {"cell": cell + (report.FUSED_SUFFIX if fused else ""), "fused_step": "1" if fused else "0",
           "workload": cuda_graphs.CELL_WORKLOADS[cell], "eager_ms_per_step": 1.0}
    if graph_ms is not None:
        row["graph_ms_per_step"] = graph_ms
    row.update(extra)
    return row


def _bench_data(gpu=H200):
    return {"machine_info": {"convgru": {"device": "cuda", "gpu": gpu}},
            "benchmarks": [_record("raft-convgru", p, "fwd", ms) for p, ms in (("raft", 1.0), ("ours", 0.5))]}


def _floor(workload, fused, batch=6):
    import dataclasses

    from bench import roofline

    w = next(w for w in workloads.FULL_WORKLOADS if w.name == workload)
    return roofline.floor_ms(dataclasses.replace(w, batch=batch), "h200", "bfloat16", "fwd", fused=fused)


def test_cuda_graphs_json_is_what_the_report_reads():
    """The synthetic JSON here has the keys bench/cuda_graphs.py writes, and its
    cells map to the report's workloads."""
    from bench import cuda_graphs

    x, h = torch.empty(6, 256, 46, 62, device="meta"), torch.empty(6, 128, 46, 62, device="meta")
    written = cuda_graphs.result_json([], H200, "gpu-type", torch.bfloat16, 6, x, h)
    assert set(written) == set(_graph_json([]))
    assert (written["input_channels"], written["hidden_channels"], written["size"]) == (256, 128, [46, 62])
    assert cuda_graphs.CELL_WORKLOADS == report.CUDA_GRAPH_CELLS


def test_fused_step_replay_against_the_floor(tmp_path):
    """ConvGRU: fused replay 1.5x its floor (met), cuDNN + gate kernels 2.5x
    its floor (missed); SepConvGRU: the fused replay failed, the cuDNN + gate
    kernel row absent: each row says what is missing, with no number."""
    conv, sep = "ConvGRUCell2d 3x3", "SepConvGRUCell2d 1x5+5x1"
    fused_floor, floor = _floor("raft-convgru", True), _floor("raft-convgru", False)
    rows = [_graph_row(conv, True, 1.5 * fused_floor), _graph_row(conv, False, 2.5 * floor),
            _graph_row(sep, True, graph="failed: RuntimeError: operation not permitted when stream is capturing")]
    bench, graphs = tmp_path / "eager.json", tmp_path / "cuda_graphs-cuda.json"
    bench.write_text(json.dumps(_bench_data()))
    graphs.write_text(json.dumps(_graph_json(rows)))
    data = report.load([str(graphs), str(bench)])
    got = {(r.workload, r.provider): r for r in report.replay_targets(data)}
    assert len(got) == 4
    r = got[("raft-convgru", "ours-fused")]
    assert r.ratio == pytest.approx(1.5) and r.met is True and r.missing == ""
    assert r.floor_ms == pytest.approx(fused_floor) and fused_floor < floor  # the fused step's own floor
    r = got[("raft-convgru", "ours")]
    assert r.ratio == pytest.approx(2.5) and r.met is False and r.floor_ms == pytest.approx(floor)
    r = got[("raft-sepconvgru", "ours-fused")]
    assert r.met is None and r.ratio is None and r.graph_ms is None
    assert "CUDA-graph replay (graph: failed: RuntimeError" in r.missing and "floor" not in r.missing
    assert r.floor_ms == pytest.approx(_floor("raft-sepconvgru", True))  # the known input is still shown
    r = got[("raft-sepconvgru", "ours")]
    assert r.met is None and "no row of `raft-sepconvgru` with the fused step off" in r.missing

    out = tmp_path / "out"
    assert report.main([str(bench), str(graphs), "--out", str(out), "--name", "gpu-h200"]) == 0
    text = (out / "gpu-h200.md").read_text()
    assert (f"| `raft-convgru` inference (fwd): CUDA-graph replay / fused-step floor | ours-fused | 1.50× "
            f"({1.5 * fused_floor:.3f} / {fused_floor:.3f} ms) | ≤ 2× | met |") in text
    assert (f"| `raft-convgru` inference (fwd): CUDA-graph replay / floor | ours | 2.50× "
            f"({2.5 * floor:.3f} / {floor:.3f} ms) | ≤ 2× | missed |") in text
    line = next(x for x in text.splitlines() if x.startswith("| `raft-sepconvgru` inference (fwd): CUDA-graph "
                                                              "replay / fused-step floor"))
    assert "| — (— / " in line and "| missing: CUDA-graph replay (graph: failed: RuntimeError" in line


def test_fused_step_replay_says_which_input_is_missing(tmp_path):
    """No CUDA-graph result: every replay row says so, with the floor it would be
    held to; a GPU the roofline has no numbers for: the floor is what is
    missing; neither: both are named."""
    data = _bench_data()
    rows = report.replay_targets(data)
    assert len(rows) == 4 and all(r.met is None and r.ratio is None for r in rows)
    assert all(r.missing.startswith("CUDA-graph result (give bench/cuda_graphs.py") for r in rows)
    assert all(r.floor_ms and "floor" not in r.missing for r in rows)
    assert "missing: CUDA-graph result" in report.markdown(data)

    a100 = "NVIDIA A100-SXM4-80GB"
    data = dict(_bench_data(a100), cuda_graphs=_graph_json([_graph_row("ConvGRUCell2d 3x3", True, 0.1)], gpu=a100))
    r = next(r for r in report.replay_targets(data) if (r.workload, r.provider) == ("raft-convgru",
                                                                                              "ours-fused"))
    assert r.graph_ms == 0.1 and r.floor_ms is None and r.met is None
    assert r.missing == f"roofline floor (bench/roofline.py has no numbers for {a100})"
    r = report.replay_targets(_bench_data(a100))[0]
    assert "CUDA-graph result" in r.missing and "roofline floor" in r.missing

    data = dict(_bench_data(), cuda_graphs=_graph_json([_graph_row("ConvGRUCell2d 3x3", True, 0.1)],
                                                       dtype="torch.float32"))
    r = report.replay_targets(data)[0]
    assert r.met is None and r.missing.startswith("CUDA-graph result in bfloat16 (it ran float32)")
    assert report.replay_targets({"benchmarks": [], "machine_info": {"convgru": {"device": "cpu"}}}) == []


def test_fused_step_replay_reads_the_first_runs_format(tmp_path):
    """bench/cuda_graphs.py's JSON whose rows name no workload and no shape
    (the H200 results in bench/results): rows found by cell name, the floor at
    the recorded batch."""
    old = {"device": H200, "dtype": "torch.bfloat16", "batch": 2, "steps": 12,
           "rows": [{"cell": "SepConvGRUCell2d 1x5+5x1", "fused_step": "0", "graph_ms_per_step": 0.3}]}
    data = dict(_bench_data(), cuda_graphs=old)
    r = next(r for r in report.replay_targets(data) if (r.workload, r.provider) == ("raft-sepconvgru",
                                                                                              "ours"))
    floor = _floor("raft-sepconvgru", False, batch=2)
    assert r.floor_ms == pytest.approx(floor) and r.ratio == pytest.approx(0.3 / floor)
    assert floor < _floor("raft-sepconvgru", False)  # N=2, not the workload's 6


def test_cuda_graph_results_of_another_machine_are_refused(tmp_path, capsys):
    bench, graphs, empty = tmp_path / "eager.json", tmp_path / "cuda_graphs-cuda.json", tmp_path / "cg.json"
    bench.write_text(json.dumps(_bench_data()))
    graphs.write_text(json.dumps(_graph_json([_graph_row("ConvGRUCell2d 3x3", True, 0.1)],
                                             gpu="NVIDIA H100 80GB HBM3")))
    assert report.main([str(bench), str(graphs), "--out", str(tmp_path), "--name", "gpu-x"]) == 2
    assert "cannot be mixed" in capsys.readouterr().err
    dry = _graph_json([_graph_row("ConvGRUCell2d 3x3", False, None, graph="skipped: no CUDA device")])
    dry.update({"device": "CPU (dry run)", "device_type": "cpu"})  # what --dry-run writes
    graphs.write_text(json.dumps(dry))
    with pytest.raises(ValueError, match="cpu CUDA-graph results cannot be mixed with gpu"):
        report.load([str(bench), str(graphs)])
    empty.write_text(json.dumps(_graph_json([])))  # no rows: skipped, with a warning
    warnings = []
    assert "cuda_graphs" not in report.load([str(bench), str(empty)], warn=warnings.append)
    assert warnings == [f"skipped {empty}: CUDA-graph results without rows"]


# ----------------------------------------------------------------------------
# The switch is given back when the forward or the backward raises
# ----------------------------------------------------------------------------
# Fake steps, no Triton: the runners' switch is the subject. Tensors on the CPU,
# the autograd engine's calling thread: there a failed pass is released before its
# exception reaches the caller (on CUDA the device's worker thread may release it
# a moment later, which is why make_step gives the switch back itself).


class _RaisingBackward(torch.autograd.Function):
    """Identity; its backward records the switch, then raises when ``raises``."""

    @staticmethod
    def forward(ctx, x, seen, raises, keep):
        ctx.seen, ctx.raises, ctx.keep = seen, raises, keep
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.seen.append(switch())
        if ctx.keep is not None:  # a reference to the pass's held switch, outliving the pass
            ctx.keep.append(workloads._held())
        if ctx.raises:
            raise RuntimeError("backward failed")
        return grad, None, None, None


class _FakeStep(torch.nn.Module):
    def __init__(self, seen, forward_raises=False, backward_raises=False, keep=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen, self.forward_raises, self.backward_raises = seen, forward_raises, backward_raises
        self.keep = keep

    def forward(self, x, h):
        self.seen.append(switch())
        if self.forward_raises:
            raise RuntimeError("forward failed")
        return _RaisingBackward.apply(x * self.weight + h, self.seen, self.backward_raises, self.keep)


def _fake_inputs(stages):
    xs = [torch.randn(2, 3, requires_grad=True) for _ in range(stages)]
    return workloads.Inputs(xs, [torch.zeros(2, 3) for _ in range(stages)], [torch.ones(2, 3) for _ in range(stages)])


@pytest.mark.parametrize("before", [None, "auto"], ids=["unset", "auto"])
def test_switch_given_back_when_the_forward_raises(caller, before):
    before = caller(before)
    seen = []
    runner = workloads.StepRunner([_FakeStep(seen, forward_raises=True)], state_first=False, fused="1")
    inputs = _fake_inputs(1)
    with pytest.raises(RuntimeError, match="forward failed"):
        runner(inputs.xs, inputs.hs)
    assert seen == ["1"] and switch() == before
    with pytest.raises(RuntimeError, match="forward failed"):
        workloads.make_step(runner, inputs, backward=True)()
    assert switch() == before


@pytest.mark.parametrize("stages", [1, 2], ids=["one output", "two outputs"])
@pytest.mark.parametrize("before", [None, "auto"], ids=["unset", "auto"])
def test_switch_given_back_when_the_backward_raises(caller, before, stages):
    """Held at 1 through the failed backward, the caller's value back after
    it, and the next pass holds and gives back again (the pass that raised
    must leave nothing behind: a switch left at 1 would stay at 1 for good,
    as every later pass would see it taken and neither set nor restore it)."""
    before = caller(before)
    seen = []
    steps = [_FakeStep(seen, backward_raises=i == 0) for i in range(stages)]
    runner = workloads.StepRunner(steps, state_first=False, fused="1")
    inputs = _fake_inputs(stages)
    outputs = runner(inputs.xs, inputs.hs)
    assert switch() == before
    seen.clear()
    with pytest.raises(RuntimeError, match="backward failed"):
        torch.autograd.backward(outputs, inputs.grads)
    assert seen and set(seen) == {"1"}
    assert switch() == before and workloads._held() is None

    # Through the harness's step: given back by make_step too.
    seen.clear()
    with pytest.raises(RuntimeError, match="backward failed"):
        workloads.make_step(runner, inputs, backward=True)()
    assert set(seen) == {"1"} and switch() == before

    # The next pass, without a failure, holds the switch again and gives it back.
    steps[0].backward_raises = False
    seen.clear()
    workloads.make_step(runner, inputs, backward=True)()
    assert seen.count("1") == 2 * stages and set(seen) == {"1"}  # forward and backward of each stage
    assert switch() == before and workloads._held() is None
    assert inputs.xs[0].grad is not None


def test_give_back_switch_restores_a_pass_not_yet_released(caller):
    """What make_step does when the engine has not let go of a failed pass yet
    (CUDA's worker thread may hold it a moment longer; here the test holds it):
    the switch comes back at once, and the later release changes nothing."""
    caller("0")
    keep = []
    runner = workloads.StepRunner([_FakeStep([], backward_raises=True, keep=keep)], state_first=False, fused="1")
    with pytest.raises(RuntimeError, match="backward failed"):
        workloads.make_step(runner, _fake_inputs(1), backward=True)()
    assert len(keep) == 1 and keep[0] is not None and keep[0].given_back  # alive, and given back
    assert switch() == "0" and workloads._held() is None
    caller("auto")  # someone's value since: the late release must not undo it
    keep.clear()
    assert switch() == "auto"
    workloads.give_back_switch()  # nothing held: nothing changes
    assert switch() == "auto"
