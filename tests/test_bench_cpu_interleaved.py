"""bench.cpu_interleaved runs a workload end to end and reports paired ratios."""

from bench import cpu_interleaved


def test_cpu_interleaved_one_workload(tmp_path):
    assert cpu_interleaved.main(["--rounds", "2", "--workloads", "raft-convgru", "--label", "t",
                                 "--out", str(tmp_path)]) == 0
    text = (tmp_path / "cpu_interleaved-t.md").read_text()
    assert "| raft-convgru | fwd |" in text and "| raft-convgru | fwd+bwd |" in text and "paired" in text
    import json

    rows = json.loads((tmp_path / "cpu_interleaved-t.json").read_text())["results"]
    for row in rows.values():
        assert len(row["ours"]["runs_ms"]) == 2
        assert row["ours_vs_best_paired"] > 0 and row["ours_vs_best"] > 0
