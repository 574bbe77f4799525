"""Fused merge kernels (Triton), each beside its plain-PyTorch reference; `dispatch` picks the path.

One fused operation per module: `delta_stats` (§4.1), `topk_threshold` (§4.2), `ties` (§4.3–4.5),
`layer_swap` (§4.6), `masks` (export), `dare` (§4.7). Importing this package does not import Triton.
"""
from .cpu_native import count_nonfinite
from .dare import dare_, dare_ties_merge
from .delta_stats import DeltaStats, delta_stats
from .dispatch import BACKENDS, KernelBackendError, kernel_backend
from .layer_swap import lerp_
from .masks import pack_bits, topk_masks, unpack_bits
from .ties import MergeCounts, ties_merge
from .topk_threshold import keep_count, topk_thresholds, topk_thresholds_multi

__all__ = [
    "BACKENDS", "DeltaStats", "KernelBackendError", "MergeCounts", "count_nonfinite", "dare_", "dare_ties_merge", "delta_stats",
    "keep_count",
    "kernel_backend", "lerp_", "pack_bits", "ties_merge", "topk_masks", "topk_thresholds",
    "topk_thresholds_multi", "unpack_bits",
]
