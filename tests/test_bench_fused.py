"""The ``ours-fused`` benchmark provider (issue 18, item 5): it runs the fused
step's kernels (forward and backward with ``CONVGRU_TRITON_FUSED_STEP=1`` held),
computes what ``ours`` computes, ``ours`` runs none of them, the variable is
restored after each call; and the report's issue-18 targets from numbers chosen here."""

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from bench import gpu_check, report, workloads  # noqa: E402

VAR = workloads.FUSED_ENV_VAR


@pytest.fixture
def restore_switch():
    old = os.environ.get(VAR)
    yield
    workloads._set_switch(old)


def _run(workload, provider, device, seen):
    master = workloads.make_master(workload, device)
    model = workloads.build_model(workload, provider, master, torch.float32)
    inputs = workloads.make_inputs(workload, device, torch.float32, requires_grad=True)
    # A hook on an input's gradient runs inside the backward pass: the switch then.
    inputs.xs[0].register_hook(lambda g: seen.append(os.environ.get(VAR)))
    with workloads.count_fused_launches() as launches:
        outputs = model(inputs.xs, inputs.hs)
        after_forward = os.environ.get(VAR)
        torch.autograd.backward(outputs, inputs.grads)
    grads = [t.grad for t in inputs.leaves()] + [p.grad for p in model.parameters()]
    return [o.detach() for o in outputs] + grads, launches[0], after_forward


@pytest.mark.triton_kernels
@pytest.mark.parametrize("name", ["raft-sepconvgru", "mmnist"])
def test_ours_fused_runs_the_fused_step_and_computes_what_ours_does(name, device, restore_switch):
    workload = next(w for w in workloads.TINY_WORKLOADS if w.name == name)
    os.environ[VAR] = "auto"  # the caller's value: each provider forces its own and gives this back
    fused_seen, ours_seen = [], []
    fused, fused_launches, fused_after = _run(workload, "ours-fused", device, fused_seen)
    assert os.environ.get(VAR) == "auto" and fused_after == "auto"
    ours, ours_launches, _ = _run(workload, "ours", device, ours_seen)
    assert os.environ.get(VAR) == "auto"
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


def test_ours_fused_says_why_it_cannot_run(restore_switch):
    assert workloads.unavailable("ours", "cpu", torch.bfloat16) is None
    reason = workloads.unavailable("ours-fused", "cpu", torch.bfloat16)
    assert reason and reason.startswith("ours-fused")  # no kernels (interpreter off) or no bfloat16 in it
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        assert "bfloat16" in reason and workloads.unavailable("ours-fused", "cpu", torch.float32) is None


def test_switch_restores_an_unset_variable(restore_switch):
    os.environ.pop(VAR, None)
    with workloads.fused_switch("1"):
        assert os.environ[VAR] == "1"
    assert VAR not in os.environ


def _record(workload, provider, pass_, ms):
    extra = {"workload": workload, "provider": provider, "pass": pass_, "dtype": "bfloat16", "device": "cuda",
             "op": "conv_gru_cell"}
    name = f"test_conv_gru_cell[{workload}-{provider}-{pass_}-bfloat16]"
    return {"group": name, "name": name, "fullname": name, "params": None, "extra_info": extra,
            "stats": {"median": ms / 1e3, "min": ms / 1e3, "max": ms / 1e3, "rounds": 3}}


def test_issue18_targets_from_chosen_numbers():
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
    rows = {(m, p): (measured, goal, met) for m, p, measured, goal, met in report.issue18_targets(data)}
    train = "`raft-convgru` training (fwd+bwd)"
    assert rows[(f"{train} vs raft", "ours-fused")][2] is True
    assert rows[(f"{train} vs raft", "ours-fused")][0] == pytest.approx(2.0)
    assert rows[(f"{train} vs compile", "ours-fused")][2] is True
    assert rows[(f"{train} vs raft", "ours")][2] is False
    assert rows[(f"{train} vs compile", "ours")][0] == pytest.approx(2.5 / 2.2)
    assert rows[(f"{train} vs compile", "ours")][2] is False
    assert rows[("`raft-convgru` inference (fwd) vs raft", "ours-fused")][2] is None
    assert rows[("`raft-convgru` inference (fwd) vs raft", "ours")][2] is True  # 2.0x
    dgmr = rows[("`dgmr` training (fwd+bwd): no slower than today's path (ours / fused)", "ours-fused")]
    assert dgmr[0] == pytest.approx(0.8) and dgmr[2] is False
    assert rows[("`mmnist` inference (fwd): no slower than today's path (ours / fused)", "ours-fused")][2] is True
    text = report.markdown(data)
    assert "**Issue 18 targets**" in text
    assert "| `raft-convgru` training (fwd+bwd) vs raft | ours-fused | 2.00× | ≥ 1.5× | met |" in text
    assert "| `raft-convgru` training (fwd+bwd) vs compile | ours | 1.14× | ≥ 1.2× | missed |" in text
    assert "| `raft-convgru` inference (fwd) vs raft | ours-fused | — | ≥ 1.5× | not measured |" in text
    assert "fused vs ours" in text and "1.47×" in text  # 2.2 / 1.5


def test_gpu_check_runs_the_fused_provider_first_within_budget():
    assert gpu_check.EAGER_PROVIDERS.split(",")[0] == "ours-fused"
    assert gpu_check.PROFILE_PROVIDERS.split(",")[0] == "ours-fused"
    assert gpu_check.worst_case_s() <= gpu_check.BUDGET_S
