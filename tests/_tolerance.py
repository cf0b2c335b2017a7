"""Comparing the results of two algorithms for the same quantity.

Two algorithms that compute the same float32 quantity (two memory layouts,
whose convolutions run different kernels; two step paths; two backends) each
round in their own way, and their difference is the sum of two rounding
errors. A tolerance meant for one algorithm against its exact value
(``torch.testing.assert_close``'s float32 defaults, 1.3e-6 relative and 1e-5
absolute per element) does not bound that sum: a gradient accumulated over
many products, near zero by cancellation, differs between two convolution
algorithms by more than 1e-5 on some machines' kernels and not on others.

So each result is measured against the same quantity computed in float64 (the
"reference"), and the two are held to what those measured errors allow:

* each result's largest error against the reference is at most ``rtol`` times
  the reference's largest magnitude (plus a tiny floor): accuracy relative to
  the tensor's scale, as rounding in sums of products is; the default ``rtol``
  of a dtype (``RTOL``) is tens to hundreds of its rounding units, far below
  any mistake in the math, which shows at the scale of the values themselves;
* their difference, element by element, is at most ``k`` times the sum of the
  two measured errors (plus the floor): the disagreement is explained by the
  rounding each has, not by a tolerance picked for one of them.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch

#: Largest error against the float64 reference, relative to the reference's
#: largest magnitude, that a result of each dtype may have. float32: 2e-5 is
#: 170 rounding units (1.2e-7 each); the layouts' gradients through a 12-step
#: loop measured at most 7e-7 (tests/test_internal_layout.py). float16 and
#: bfloat16 store every intermediate rounded: 20 and 10 of their units.
RTOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-2,
    torch.bfloat16: 8e-2,
}
#: Absolute floor of every bound: two results that are exactly the reference
#: (both zero, say) pass where the reference is all zeros.
TINY = 1e-30


def reference_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference of ``x`` from the float64 reference (NaN if
    either has a NaN, so that every comparison with it fails)."""
    diff = (x.detach().double() - ref.detach().double()).abs()
    if diff.numel() == 0:
        return 0.0
    if torch.isnan(diff).any():
        return float("nan")
    return diff.max().item()


def assert_close_to_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    ref: torch.Tensor,
    *,
    rtol: Optional[float] = None,
    k: float = 1.0,
    names: Tuple[str, str] = ("a", "b"),
    what: str = "",
) -> Tuple[float, float]:
    """``a`` and ``b``, the same quantity from two algorithms in one dtype, are
    each within ``rtol`` (relative to the reference's largest magnitude) of
    ``ref``, the quantity computed in float64, and within ``k`` times the sum
    of their measured errors of each other. Returns the two errors."""
    assert a.shape == b.shape == ref.shape, f"{what}: shapes {a.shape}, {b.shape}, reference {ref.shape}"
    assert a.dtype == b.dtype, f"{what}: dtypes {a.dtype} and {b.dtype}"
    assert ref.dtype == torch.float64, f"{what}: the reference must be float64, got {ref.dtype}"
    rtol = RTOL[a.dtype] if rtol is None else rtol
    scale = ref.detach().abs().max().item() if ref.numel() else 0.0
    tiny = TINY
    bound = rtol * scale + tiny
    err_a, err_b = reference_error(a, ref), reference_error(b, ref)
    label = f"{what}: " if what else ""
    for name, err in zip(names, (err_a, err_b)):
        assert err <= bound, (
            f"{label}{name} is {err:.3g} from the float64 reference, over {bound:.3g} "
            f"(rtol {rtol:g} of the reference's largest magnitude {scale:.3g})")
    diff = reference_error(a, b.double())
    allowed = k * (err_a + err_b) + tiny
    assert diff <= allowed, (
        f"{label}{names[0]} and {names[1]} differ by {diff:.3g}, more than {k:g} x their errors against "
        f"the float64 reference ({err_a:.3g} + {err_b:.3g})")
    return err_a, err_b


def assert_all_close_to_reference(
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    ref: Sequence[torch.Tensor],
    *,
    labels: Optional[Sequence[str]] = None,
    **kwargs,
) -> None:
    """:func:`assert_close_to_reference` for matching sequences (outputs, or
    the gradients of several tensors)."""
    a, b, ref = list(a), list(b), list(ref)
    assert len(a) == len(b) == len(ref), (len(a), len(b), len(ref))
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(len(a))]
    for x, y, r, label in zip(a, b, ref, labels):
        assert_close_to_reference(x, y, r, what=label, **kwargs)


def float64_training_step(module: torch.nn.Module, inputs: Sequence[torch.Tensor], grad: torch.Tensor):
    """The float64 reference of a training step of ``module``: a float64 copy
    of it called on the inputs in float64, ``grad`` (in float64) sent back
    through its first output. Returns (output, the inputs' gradients,
    {parameter name: gradient})."""
    module64 = copy.deepcopy(module).double()
    leaves: List[torch.Tensor] = [t.detach().double().requires_grad_() for t in inputs]
    out = module64(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad.detach().double())
    return out.detach(), [t.grad for t in leaves], {n: p.grad for n, p in module64.named_parameters()}
