"""bench/raft_model.py, the whole-model RAFT benchmark (torchvision's raft_large
and raft_small, original against converted): its smoke mode runs every code
path at tiny sizes (torchvision's models where torchvision imports, the
stand-ins of bench/torchvision_raft_standin.py where it does not), it says why
when torchvision is missing, and its loss and row order are RAFT's; the GPU
check runs it as an optional part with its own cap."""

import json
import os

import pytest
import torch

from bench import gpu_check, raft_model
from bench import torchvision_raft_standin as standin


def _result(out):
    (name,) = [n for n in os.listdir(out) if n.endswith(".json")]
    with open(os.path.join(out, name)) as f:
        return name, json.load(f)


def test_smoke_run_eager_every_precision_and_pass(tmp_path, device):
    """Training steps (bf16 autocast, fp16 autocast with a GradScaler, fp32) and
    inference of both models, original and converted: every row measured, each
    pair with the same first loss up to the precision's rounding."""
    code = raft_model.main(["--smoke", "--device", device.type, "--modes", "eager", "--out", str(tmp_path)])
    assert code == 0
    name, result = _result(tmp_path)
    assert name == f"raft_model-{device.type}.json"
    assert result["source"] in ("torchvision", "stand-in") and result["smoke"]
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3 * 2 and all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    tolerance = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
    for original, converted in zip(rows[::2], rows[1::2]):
        assert (original["variant"], converted["variant"]) == ("original", "converted")
        assert raft_model._key(original) == raft_model._key(converted)
        scale = max(abs(original["first_value"]), 1.0)  # a loss, or a mean flow in pixels
        assert abs(converted["first_value"] - original["first_value"]) <= tolerance[original["precision"]] * scale
    table = (tmp_path / f"raft_model-{device.type}.md").read_text()
    assert "| raft_large | train | bf16 | eager |" in table and "| raft_small | infer | fp32 | eager |" in table
    assert "smoke run" in table


def test_smoke_run_compiled_training_step_with_grad_scaler(tmp_path, device):
    code = raft_model.main(["--smoke", "--device", device.type, "--modes", "compile", "--models", "raft_small",
                            "--passes", "train", "--precisions", "fp16", "--out", str(tmp_path)])
    assert code == 0
    _, result = _result(tmp_path)
    assert result["compile_backend"] == "eager"  # Dynamo traces the model, no kernels are compiled
    assert [(r["variant"], r["status"]) for r in result["rows"]] == [("original", "ok"), ("converted", "ok")]
    assert "First call under torch.compile" in (tmp_path / f"raft_model-{device.type}.md").read_text()


def test_without_torchvision_the_full_run_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(standin, "torchvision_unavailable", lambda: "torchvision does not import (test)")
    assert raft_model.main(["--out", str(tmp_path)]) == 0
    _, result = _result(tmp_path)
    assert result["skipped"] == "torchvision does not import (test)" and result["rows"] == []
    (md,) = [n for n in os.listdir(tmp_path) if n.endswith(".md")]
    assert "Skipped: torchvision does not import (test)" in (tmp_path / md).read_text()
    # The smoke run goes on with the stand-ins.
    assert raft_model.model_source(smoke=True)[0] == "stand-in"


def test_sequence_loss_is_raft_s():
    gt = torch.zeros(1, 2, 2, 2)
    predictions = [torch.full((1, 2, 2, 2), 1.0), torch.full((1, 2, 2, 2), -2.0), torch.full((1, 2, 2, 2), 0.5)]
    want = 0.8 ** 2 * 1.0 + 0.8 * 2.0 + 0.5
    assert raft_model.sequence_loss(predictions, gt).item() == pytest.approx(want)
    assert raft_model.sequence_loss([p.bfloat16() for p in predictions], gt).dtype == torch.float32


def test_rows_run_in_priority_order_in_pairs():
    rows = raft_model.plan_rows(raft_model.MODELS, raft_model.MODES, raft_model.PRECISIONS, raft_model.PASSES)
    assert len(rows) == 2 * 2 * 2 * 3 * 2
    assert [r["mode"] for r in rows] == ["eager"] * 24 + ["compile"] * 24  # compiles cost the most: last
    assert (rows[0]["pass"], rows[0]["precision"]) == ("train", "bf16")
    assert [r["variant"] for r in rows[:4]] == ["original", "converted"] * 2
    assert [r["model"] for r in rows[:4]] == ["raft_large", "raft_large", "raft_small", "raft_small"]
    assert raft_model.FULL["train"] == raft_model.Shape(6, 368, 496, 12)
    assert raft_model.FULL["infer"] == raft_model.Shape(1, 440, 1024, 32)
    with pytest.raises(SystemExit, match="--modes: expected a comma-separated subset of eager,compile"):
        raft_model.main(["--smoke", "--modes", "jit"])


def test_gpu_check_part(tmp_path, monkeypatch):
    """An optional part with its own cap, before the other spare-time parts; the
    budget's worst case is unchanged; its files go into the archive."""
    names = [p.name for p in gpu_check.PLAN]
    part = gpu_check.PLAN[names.index("raft_model")]
    assert part.optional and part.cap is not None and part.minimum <= part.cap
    assert names.index("compiled") < names.index("raft_model") < names.index("sequence")
    assert gpu_check.worst_case_s() <= gpu_check.BUDGET_S
    check = gpu_check.Check(str(tmp_path), echo=lambda *a: None)
    os.makedirs(check.raw, exist_ok=True)
    commands = []

    def run(name, cmd, log, limit):
        commands.append((list(cmd), limit))
        with open(check.raw_path("raft_model-cuda.md"), "w") as f:
            f.write("# Whole-model RAFT\n\n| model |\n")
        return 0

    monkeypatch.setattr(check, "run", run)
    assert check.part_raft_model(100) == 0
    ((cmd, limit),) = commands
    assert cmd[1:4] == ["-m", "bench.raft_model", "--out"] and limit == 100
    assert float(cmd[cmd.index("--time-limit") + 1]) < 100
    assert "raft_model-cuda.md" in check.archived() and "| model |" in check.texts["raft_model"]
    smoke = gpu_check.Check(str(tmp_path / "smoke"), smoke=True, echo=lambda *a: None)
    assert smoke.part_raft_model(100).startswith("smoke run")
