"""Triton kernels (``backend="triton"``). Not written yet."""
raise ImportError("the Triton kernels are not implemented yet")
