"""The roofline model (bench/roofline.py) and its column in the benchmark report."""

import json

import pytest

from bench import report, roofline
from bench.workloads import FULL_WORKLOADS, Stage, Workload

RAFT = next(w for w in FULL_WORKLOADS if w.name == "raft-convgru")


def test_gate_bytes_per_state_element():
    e, b = 1000, 2
    # reset_after forward: reads gx 3, gh 3, h 1, writes h' 1 (+ gates 3, aux 1 when saving)
    assert roofline.gate_bytes("gru_reset_after_fwd", e, b, save=True) == 12 * e * b
    assert roofline.gate_bytes("gru_reset_after_fwd", e, b, save=False) == 8 * e * b
    assert roofline.gate_bytes("gru_update_bwd", e, b, grad2=True) == 8 * e * b
    assert roofline.gate_bytes("gru_reset_gate_bwd", e, b, grad2=True) == 6 * e * b
    with pytest.raises(ValueError, match="unknown gate kernel"):
        roofline.gate_bytes("gru_nothing", e, b)


def test_raft_step_pieces_by_hand():
    """RAFT's step, bfloat16, fwd: convolution FLOPs and gate bytes counted by hand."""
    n, h, s, c_in = 6, 128, 46 * 62, 256
    ps = roofline.pieces(RAFT, "bfloat16", "fwd")
    conv_flops = sum(p.flops * p.count for p in ps if p.kind == "conv")
    assert conv_flops == pytest.approx(2 * n * s * 3 * h * (c_in + h) * 9)
    gate = sum(p.bytes * p.count for p in ps if p.kind == "gate")
    assert gate == (8 + 5) * n * h * s * 2  # reset_gate_fwd 8E, update_fwd 5E (nothing saved)
    # fwd+bwd: the backward convolutions do twice the forward's FLOPs
    ps2 = roofline.pieces(RAFT, "bfloat16", "fwd+bwd")
    assert sum(p.flops * p.count for p in ps2 if p.kind == "conv") == pytest.approx(3 * conv_flops)


def test_floor_is_the_larger_of_bytes_and_flops():
    dev = roofline.Device("test", copy_gb_s=1000.0, matmul_tflops={"bfloat16": 100.0}, source="test")
    p = roofline.Piece("x", "conv", bytes=1e9, flops=1e12)
    assert p.floor_ms(dev, "bfloat16") == pytest.approx(max(1e9 / 1e12, 1e12 / 1e14) * 1e3)
    p = roofline.Piece("y", "conv", bytes=1e6, flops=1e12)
    assert p.floor_ms(dev, "bfloat16") == pytest.approx(10.0)


def test_floor_scales_with_steps_and_devices():
    w1 = Workload("t", "conv_gru", 2, 1, (Stage(8, 16, (32, 32), 3),))
    w4 = Workload("t", "conv_gru", 2, 4, (Stage(8, 16, (32, 32), 3),))
    assert roofline.floor_ms(w4, "h200", pass_="fwd") == pytest.approx(4 * roofline.floor_ms(w1, "h200", pass_="fwd"))
    # The H200 moves bytes faster than an H100: memory-bound gate kernels have a lower floor.
    assert roofline.floor_ms(RAFT, "h200", kind="gate") < roofline.floor_ms(RAFT, "h100-sxm", kind="gate")
    assert roofline.floor_ms(RAFT, "h200", pass_="fwd+bwd") > roofline.floor_ms(RAFT, "h200", pass_="fwd")


@pytest.mark.parametrize("name,key", [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
                                      ("NVIDIA H100 PCIe", None), ("NVIDIA A100-SXM4-80GB", None)])
def test_device_for_gpu_name(name, key):
    assert roofline.device_for_gpu_name(name) == key


def test_cli_prints_a_table(capsys):
    assert roofline.main(["--device", "h200", "--pieces", "raft-convgru"]) == 0
    out = capsys.readouterr().out
    assert "| raft-convgru | bfloat16 | fwd+bwd |" in out and "gru_update_fwd" in out


def _gpu_json(gpu: str, shape: str):
    recs = []
    for provider, t in (("raft", 0.004), ("ours", 0.002)):
        extra = {"workload": "raft-convgru", "provider": provider, "pass": "fwd+bwd", "dtype": "bfloat16",
                 "device": "cuda", "op": "conv_gru_cell", "shape": shape}
        recs.append({"name": provider, "fullname": provider, "params": None, "extra_info": extra,
                     "stats": {"median": t, "min": t, "max": t, "rounds": 3}})
    return {"machine_info": {"convgru": {"device": "cuda", "gpu": gpu, "commit": "0" * 40}},
            "datetime": "2026-01-01T00:00:00", "benchmarks": recs}


def test_report_prints_ours_over_floor(tmp_path):
    path = tmp_path / "gpu-h200.json"
    path.write_text(json.dumps(_gpu_json("NVIDIA H200", RAFT.describe())))
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-h200.md").read_text()
    floor = roofline.floor_ms(RAFT, "h200", "bfloat16", "fwd+bwd")
    assert "| floor | ours / floor |" in text
    assert f"| {2.0 / floor:.1f} |" in text


@pytest.mark.parametrize("gpu,shape", [("Some GPU", RAFT.describe()), ("NVIDIA H200", "another shape")])
def test_report_without_a_floor_still_works(tmp_path, gpu, shape):
    path = tmp_path / "gpu-x.json"
    path.write_text(json.dumps(_gpu_json(gpu, shape)))
    assert report.main([str(path), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu-x.md").read_text()
    if gpu == "Some GPU":
        assert "ours / floor" not in text
    else:  # a known GPU, an unknown shape: the columns are there, the row has no floor
        assert "| — | — |" in text


def test_fused_step_pieces_by_hand():
    """The fused step's floor (ours-fused): the forward's hidden convolution and gate
    kernels replaced by two kernels moving only h, gx, the weights, the gates, r*h and
    h' (RAFT's step, bfloat16, counted by hand); the same FLOPs; the rest unchanged."""
    n, h, s, c_in, taps = 6, 128, 46 * 62, 256, 9
    e, w = n * h * s, h * h * taps
    for pass_, n_kernel in (("fwd", 5), ("fwd+bwd", 6)):  # n is saved only for the backward
        ps = roofline.pieces(RAFT, "bfloat16", pass_, fused=True)
        fused = {p.name.split()[2]: p for p in ps if p.kind == "fused"}
        assert fused["conv_rz_fwd"].bytes == (6 * e + 2 * w) * 2
        assert fused["conv_n_fwd"].bytes == (n_kernel * e + w) * 2
        assert fused["conv_rz_fwd"].flops + fused["conv_n_fwd"].flops == pytest.approx(2 * n * s * 3 * h * h * taps)
        unfused = roofline.pieces(RAFT, "bfloat16", pass_)
        assert not any("hidden conv 3x3" in p.name for p in ps)
        assert not any(p.name.endswith(("gru_reset_gate_fwd", "gru_update_fwd")) for p in ps)
        kept = {p.name for p in unfused} - {p.name for p in ps}
        assert kept == {"raft-convgru hidden conv 3x3", "raft-convgru gru_reset_gate_fwd",
                        "raft-convgru gru_update_fwd"}
        assert roofline.floor_ms(RAFT, "h200", "bfloat16", pass_, fused=True) < \
            roofline.floor_ms(RAFT, "h200", "bfloat16", pass_)
    with pytest.raises(ValueError, match="reset_after=False"):
        roofline.pieces(RAFT, "bfloat16", "fwd", reset_after=True, fused=True)


def test_report_measures_ours_fused_against_its_own_floor(tmp_path):
    data = _gpu_json("NVIDIA H200", RAFT.describe())
    extra = dict(data["benchmarks"][1]["extra_info"], provider="ours-fused")
    data["benchmarks"].append({"name": "f", "fullname": "f", "params": None, "extra_info": extra,
                               "stats": {"median": 0.0015, "min": 0.0015, "max": 0.0015, "rounds": 3}})
    text = report.markdown(data)
    floor = roofline.floor_ms(RAFT, "h200", "bfloat16", "fwd+bwd")
    fused_floor = roofline.floor_ms(RAFT, "h200", "bfloat16", "fwd+bwd", fused=True)
    assert "| workload | pass | floor ms (gates + convs) | fused floor ms | raft / floor | ours / floor | " \
           "ours-fused / floor |" in text
    assert f"| {fused_floor:.3f} | {4.0 / floor:.1f} | {2.0 / floor:.1f} | {1.5 / fused_floor:.1f} |" in text
