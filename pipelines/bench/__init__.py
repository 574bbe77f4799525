"""Benchmarks a user can run and compare (`workbench bench kernels|merge|pretrain`): the fused kernels, whole
merges against mergekit, and CT throughput.

They live here, above everything they measure: the CT benchmark drives the pipeline's training code
(`pipelines/training.py`), and the engine (`workbench/`) never imports `pipelines/`, so benchmark code in
`workbench/` could not reach it. The figures, with their commands and dates, are in docs/benchmarks.md.
"""
