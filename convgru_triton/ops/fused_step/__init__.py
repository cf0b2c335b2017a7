"""The fused step: convolution and gate math in one pass (:mod:`.kernels`) and
its reference (:mod:`.naive`)."""
