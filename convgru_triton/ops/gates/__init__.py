"""The gate math of a ConvGRU step: Triton kernels (:mod:`.kernels`) and their
reference (:mod:`.naive`)."""
