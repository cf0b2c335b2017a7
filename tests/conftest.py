"""Test set-up shared by every test module.

Without a GPU the Triton kernels run on CPU tensors under the Triton
interpreter, which must be switched on before ``triton`` is first imported;
with a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _one_thread_no_tf32():
    """Tiny CPU convolutions that need autograd run ~100x slower with several
    OpenMP threads than with one on a small machine: run the tests on one
    thread. On CUDA keep TF32 off, so float32 results can be compared at 1e-5.
    (Saved and restored by hand: pytest's monkeypatch fails to restore
    torch.backends.cuda.matmul.allow_tf32, a property, with pytest 9.2.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Fill every buffer the fused kernels and the sequence operator write with
    NaN before they write it, so an element left unwritten fails the comparison."""
    from convgru_triton.ops import conv_gru, conv_gru_cell

    for module, allocator in ((conv_gru_cell, "_empty"), (conv_gru, "_empty_frames"), (conv_gru, "_empty_frame")):
        allocate = getattr(module, allocator)

        def poisoned(*args, _allocate=allocate, **kwargs):
            return _allocate(*args, **kwargs).fill_(float("nan"))

        monkeypatch.setattr(module, allocator, poisoned)
