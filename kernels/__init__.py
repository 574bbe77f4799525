"""Fused merge kernels (Triton), each beside its plain-PyTorch reference; `dispatch` picks the path."""
