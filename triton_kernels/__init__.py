"""Triton kernels, installed as lossforge_kernels.triton_kernels (one module per loss family)."""
