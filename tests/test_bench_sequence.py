"""The sequence-vs-steps benchmark measures what it says: both sides compute
the same function, and the sequence operator keeps no more for the backward."""

import torch

from bench.sequence_vs_steps import SequenceWorkload, run


def test_sequence_vs_steps_tiny():
    tiny = SequenceWorkload("tiny", steps=4, batch=2, input_channels=3, hidden_channels=4, size=6,
                            kernel_size=3, num_layers=2)
    row = run(tiny, torch.device("cpu"), torch.float32, repeats=1)
    assert row["relative_error"] < 1e-5
    for side in ("sequence", "steps"):
        assert row[side]["fwd_bwd_ms"] > 0 and row[side]["saved_bytes"] > 0
    assert row["sequence"]["saved_bytes"] <= row["steps"]["saved_bytes"]
