"""Operators of the ConvGRU step.

* :mod:`.naive`: the pure-PyTorch reference (``*_ref``), also the eager backend.
* :mod:`.conv_gru_cell`: the fused Triton kernels, their launchers and the
  autograd function. It imports Triton, so it is imported lazily, only when the
  Triton backend is selected.
"""
