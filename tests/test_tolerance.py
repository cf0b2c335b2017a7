"""The comparison of two algorithms through a float64 reference (_tolerance.py)."""

import pytest
import torch

from _tolerance import assert_all_close_to_reference, assert_close_to_reference


def _sums(device):
    """One quantity three ways: a float64 reference and two float32 sums in
    different orders, which round differently (as two convolution algorithms do)."""
    gen = torch.Generator().manual_seed(0)
    terms = torch.randn(64, 4096, generator=gen, dtype=torch.float64).to(device) * 100
    ref = terms.sum(1)
    forward = terms.float().sum(1)
    backward = terms.float().flip(1).cumsum(1)[:, -1]
    return forward, backward, ref


def test_two_roundings_pass_where_one_algorithms_tolerance_may_not(device):
    a, b, ref = _sums(device)
    err_a, err_b = assert_close_to_reference(a, b, ref)
    assert 0 < err_a and 0 < err_b
    assert (a - b).abs().max() > 0


def test_a_wrong_result_fails(device):
    a, b, ref = _sums(device)
    wrong = b.clone()
    wrong[3] += 1e-3 * ref.abs().max().item()  # a mistake at the scale of the values
    with pytest.raises(AssertionError, match="wrong is .* from the float64 reference"):
        assert_close_to_reference(a, wrong, ref, names=("a", "wrong"))


def test_nan_fails(device):
    a, b, ref = _sums(device)
    b[0] = float("nan")
    with pytest.raises(AssertionError):
        assert_close_to_reference(a, b, ref)


def test_sequences_name_the_failing_entry(device):
    a, b, ref = _sums(device)
    with pytest.raises(AssertionError, match="d_w: "):
        assert_all_close_to_reference([a, a], [b, b * 1.01], [ref, ref], labels=["d_x", "d_w"])


def test_reference_must_be_float64(device):
    a, b, ref = _sums(device)
    with pytest.raises(AssertionError, match="must be float64"):
        assert_close_to_reference(a, b, ref.float())
