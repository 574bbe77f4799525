"""Benchmarks a user can run and compare (`workbench bench kernels|merge|pretrain`)."""
