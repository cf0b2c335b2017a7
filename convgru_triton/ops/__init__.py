"""The ConvGRU's operators, one folder each, as in flash-linear-attention:

* :mod:`.gates`: the elementwise gate math of a step (bias adds, sigmoid,
  tanh, the reset product, the new state), forward and backward, between
  cuDNN convolutions. ``kernels`` (Triton kernels, launchers, launches bound
  to compiled kernels), ``naive`` (the ``*_ref`` references: the one
  definition of the math, also the eager backend).
* :mod:`.fused_step`: a step's hidden (and, for a cell, input) convolution
  with the gate math as implicit-GEMM Triton kernels, and the data gradient
  of its backward. ``kernels``, ``naive`` (``reference_step``,
  ``reference_backward_step``).
* :mod:`.sequence`: one layer and direction over a sequence as one
  registered operator (``torch.library``: fake, autograd, autocast rule),
  with the time loops that run on either op above. ``op``, ``vmap`` (its
  ``torch.vmap`` rules), ``naive`` (``conv_gru_cell_ref``,
  ``conv_gru_sequence_ref``: a whole step and a layer in plain PyTorch).

Modules that import Triton (``gates.kernels``, ``fused_step.kernels``) are
imported only where the Triton backend is chosen: the package works without
Triton.
"""
