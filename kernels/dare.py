"""DARE: drop and rescale the delta before merging (docs/design.md §4.7; Yu et al., 2024, "Language Models are
Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch").

In place: θ_t ← θ_b + m ⊙ δ·(1/(1 − p)), δ = θ_t − θ_b in fp32, m_i ~ Bernoulli(1 − p).
The mask comes from a counter-based hash, identical in Triton and in PyTorch, so a seed gives the same
mask on every backend and device, whatever the chunking or launch grid:
  x = lowbias32((i mod 2³²) ⊕ k0);  x = lowbias32(x ⊕ ⌊i / 2³²⌋ ⊕ k1);  u = ⌊x / 2⁸⌋ (24 bits)
  element i is dropped iff u < ⌈p·2²⁴⌉   (so P(drop) = ⌈p·2²⁴⌉ / 2²⁴, within 6e-8 of p)
with i the row-major element index, (k0, k1) = splitmix64(seed) split in two 32-bit halves and lowbias32
Chris Wellons' 32-bit integer hash. The rescale multiplies by the fp32 reciprocal 1/(1 − p) (one rounding,
bitwise reproducible everywhere; true division could differ by 1 ulp). Dropped elements become θ_b.
Non-finite δ is left to the merge, which counts and excludes it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import chunks, cpu_native
from .dispatch import LAUNCH_OPTIONS, flat_contiguous, fp32_scalar, jit, kernel_backend, triton_kernels
from .rounding import store_rounded
from .ties import merge_counts, prepare_merge, range_quotas, ties_merge
from .topk_threshold import TopK

if TYPE_CHECKING:
    import triton.language as tl

BLOCK = 1024
_M32 = 0xFFFFFFFF


def seed_keys(seed: int) -> tuple[int, int]:
    """splitmix64(seed) as two 32-bit keys."""
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & _M32, z >> 32


def drop_threshold(p: float) -> int:
    """⌈p·2²⁴⌉: a 24-bit hash value below it drops the element."""
    return math.ceil(p * (1 << 24))


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@jit
def _dare_kernel(expert_ptr, base_ptr, keys_ptr, n, threshold, scale, BLOCK: tl.constexpr):
    # keys: int64 [k0, k1] (a tensor, not scalar arguments: Triton would specialize a key equal to 1).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k0 = tl.load(keys_ptr).to(tl.uint32)
    k1 = tl.load(keys_ptr + 1).to(tl.uint32)
    x = _lowbias32(offs.to(tl.uint32) ^ k0)                 # int64 → uint32 keeps the low 32 bits
    x = _lowbias32(x ^ (offs >> 32).to(tl.uint32) ^ k1)
    keep = (x >> 8).to(tl.int32) >= threshold
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(expert_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    store_rounded(expert_ptr, offs, b + tl.where(keep, (e - b) * scale, 0.0), mask)


def _dare_triton(expert, base, k0, k1, threshold, scale):
    kernels = triton_kernels(globals(), expert.device)
    target = expert.view(-1) if expert.is_contiguous() else expert.contiguous().view(-1)
    n = target.numel()
    keys = torch.tensor([k0, k1], dtype=torch.int64, device=expert.device)
    kernels._dare_kernel[(-(-n // BLOCK),)](target, flat_contiguous(base), keys, n, threshold, scale,
                                            BLOCK=BLOCK, **LAUNCH_OPTIONS)
    if target.data_ptr() != expert.data_ptr() or not expert.is_contiguous():
        expert.copy_(target.view(expert.shape))


# ------------------------------------------------------------------------------------------ PyTorch hash

def _lowbias32_torch(x: torch.Tensor) -> torch.Tensor:
    # uint32 arithmetic in int64: products wrap modulo 2⁶⁴, whose low 32 bits are the uint32 product.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dare_keep_mask(start: int, count: int, seed: int, p: float, device="cpu") -> torch.Tensor:
    """The DARE keep mask of elements [start, start + count) (row-major indices) as a bool tensor."""
    k0, k1 = seed_keys(seed)
    idx = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _lowbias32_torch((idx & _M32) ^ k0)
    x = _lowbias32_torch(x ^ (idx >> 32) ^ k1)
    return (x >> 8) >= drop_threshold(p)


def _dare_cpu(expert, base, seed, p, scale):
    start = 0
    for index in chunks.pieces(expert.shape):
        e = chunks.read(expert, index)
        b = chunks.read(base, index).float()
        keep = dare_keep_mask(start, e.numel(), seed, p, e.device)
        start += e.numel()
        delta = e.float() - b
        chunks.write(expert, index, b + torch.where(keep, delta * scale, 0.0))


def dare_reference(expert: torch.Tensor, base: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The formula on materialized tensors, written back into expert."""
    if p == 0.0:
        return expert
    keep = dare_keep_mask(0, expert.numel(), seed, p, expert.device).view(expert.shape)
    b = base.float()
    expert.copy_(b + torch.where(keep, (expert.float() - b) * fp32_scalar(1.0 / (1.0 - p)), 0.0))
    return expert


def dare_(expert: torch.Tensor, base: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """In place, drop each δ element with probability p and rescale the survivors by 1/(1 − p)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dare_: drop rate p={p} is outside [0, 1)")
    if expert.shape != base.shape:
        raise ValueError(f"dare_: expert shape {tuple(expert.shape)} != base shape {tuple(base.shape)}")
    if p == 0.0 or expert.numel() == 0:
        return expert
    backend = kernel_backend(base, expert)
    if backend == "reference":
        return dare_reference(expert, base, p, seed)
    scale = fp32_scalar(1.0 / (1.0 - p))
    if backend == "triton":
        k0, k1 = seed_keys(seed)
        _dare_triton(expert, base, k0, k1, drop_threshold(p), scale)
    else:
        _dare_cpu(expert, base, seed, p, scale)
    return expert


# Keep every element the drop left non-zero: τ = the smallest positive float, so |δ| ≥ τ ⇔ δ ≠ 0. DARE's
# drop is the trim here (mergekit's dare_ties likewise trims no further).
KEEP_NONZERO = TopK(tau=1.4e-45)


def dare_ties_merge(base: torch.Tensor, experts, drop_rates, seeds, *, weights=None, lam: float = 1.0,
                    normalize: bool = True, consensus: str = "sum", out: torch.Tensor | None = None):
    """DARE-TIES: `dare_` on each expert (drop rate p_t, seed s_t), then `ties_merge` keeping every δ the
    drop left non-zero; returns (out, MergeCounts).

    On the C kernels it is one pass that drops on the fly and never writes into the experts; elsewhere
    (and for tensors the C kernels do not take) `dare_` runs in place on the experts first. Both give the
    same bits.
    """
    experts, drop_rates, seeds = list(experts), [float(p) for p in drop_rates], list(seeds)
    if not len(experts) == len(drop_rates) == len(seeds):
        raise ValueError(f"dare_ties_merge: {len(experts)} experts, {len(drop_rates)} drop rates, {len(seeds)} seeds")
    for t, p in enumerate(drop_rates):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dare_ties_merge: expert {t}: drop rate p={p} is outside [0, 1)")
    keep = [KEEP_NONZERO] * len(experts)
    native = len(experts) <= cpu_native.max_experts()
    if experts and kernel_backend(base, *experts, out, native=native) == "c":
        prepared, params, target = prepare_merge(base, experts, weights, keep, None, lam, "ties", normalize, consensus,
                                                 out)
        dare = [(*seed_keys(s), drop_threshold(p), fp32_scalar(1.0 / (1.0 - p))) for p, s in zip(drop_rates, seeds)]
        counts = cpu_native.merge(base, prepared, params, target, range_quotas(params, base, prepared), dare=dare)
        if counts is not None:
            return target, merge_counts(prepared[0].numel(), counts, "c")
    dropped = [dare_(e, base, p, s) for e, p, s in zip(experts, drop_rates, seeds)]
    return ties_merge(base, dropped, weights=weights, keep=keep, lam=lam, method="ties", normalize=normalize,
                      consensus=consensus, out=out)
