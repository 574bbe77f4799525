"""Exact top-k thresholds of |δ| by radix select (DESIGN §4.2; the trim step of TIES, Yadav et al. 2023,
with the slack band of Tao et al. 2024).

τ(f) is the ⌈f·n⌉-th largest |δ| = |θ_expert − θ_base| computed in fp32; f = 1 gives 0.0 (keep everything).
It equals ``torch.kthvalue(|δ|, n − ⌈f·n⌉ + 1)`` on the materialized magnitudes, bit for bit.
Non-finite δ counts as magnitude 0.

Algorithm: non-negative fp32 values order like their bit patterns read as unsigned integers, so the k-th
largest value is found digit by digit, most significant first:
  pass 1: a histogram of the high 16 bits of |δ| over every element; walking it from the top gives, for
          each fraction, the bucket B holding rank k and the rank r left inside it;
  pass 2: a histogram of the low 16 bits over the elements whose high half is one of those buckets;
          walking it gives the low half: τ = bits(B << 16 | L).
Two passes, exact, |δ| recomputed from base and expert each time: no sort, no index tensor, δ never
materialized for a whole tensor. All fractions share the passes. Counts are integers, so the atomic
histogram of the Triton path is deterministic.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from . import chunks, cpu_native
from .dispatch import LAUNCH_OPTIONS, flat_contiguous, jit, kernel_backend, triton_kernels

if TYPE_CHECKING:
    import triton.language as tl

HIGH_BINS = 1 << 15   # high halves of finite non-negative floats are <= 0x7F7F
LOW_BINS = 1 << 16
BLOCK = 1024


def keep_count(fraction: float, n: int) -> int:
    """⌈f·n⌉, clamped to [1, n], tolerant to rounding in f.

    f·n within min(1e-6·f·n, 1e-3) of an integer counts as that integer, so that 0.2·n computed as
    20.000000000000004 (or f stored in float32) does not keep one element more than intended.
    """
    x = fraction * n
    nearest = round(x)
    k = nearest if abs(x - nearest) <= min(1e-6 * x, 1e-3) else math.ceil(x)
    return min(max(int(k), 1), n)


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _abs_delta_bits(base_ptr, expert_ptr, offs, mask):
    # |δ| in fp32 as int32 bits; non-finite → 0 (ranked as magnitude 0).
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(expert_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(e - b)
    a = tl.where(a <= 3.4028234663852886e38, a, 0.0)
    return a.to(tl.int32, bitcast=True)


@jit
def _high_histogram_kernel(base_ptr, expert_ptr, hist_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = _abs_delta_bits(base_ptr, expert_ptr, offs, mask)
    tl.atomic_add(hist_ptr + (bits >> 16), 1, mask=mask)


@jit
def _low_histogram_kernel(base_ptr, expert_ptr, buckets_ptr, hist_ptr, n,
                          NUM_BUCKETS: tl.constexpr, BLOCK: tl.constexpr):
    # Only elements whose high half is a target bucket count; one 65536-bin row per bucket.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = _abs_delta_bits(base_ptr, expert_ptr, offs, mask)
    high = bits >> 16
    low = bits & 0xFFFF
    for slot in tl.static_range(NUM_BUCKETS):
        target = tl.load(buckets_ptr + slot)
        tl.atomic_add(hist_ptr + slot * 65536 + low, 1, mask=mask & (high == target))


def _high_triton(base, expert, hist):
    kernels = triton_kernels(globals(), base.device)
    b, e = flat_contiguous(base), flat_contiguous(expert)
    n = b.numel()
    kernels._high_histogram_kernel[(_cdiv(n, BLOCK),)](b, e, hist, n, BLOCK=BLOCK, **LAUNCH_OPTIONS)


def _low_triton(base, expert, buckets, hist):
    kernels = triton_kernels(globals(), base.device)
    b, e = flat_contiguous(base), flat_contiguous(expert)
    n = b.numel()
    targets = torch.tensor(buckets, dtype=torch.int32, device=base.device)
    kernels._low_histogram_kernel[(_cdiv(n, BLOCK),)](b, e, targets, hist, n, NUM_BUCKETS=len(buckets),
                                                            BLOCK=BLOCK, **LAUNCH_OPTIONS)


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


# -------------------------------------------------------------------------------------------------- CPU

def _abs_delta_bits_cpu(b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    a = e.float().sub_(b.float()) if e.dtype != torch.float32 else e - b.float()
    a.abs_().nan_to_num_(nan=0.0, posinf=0.0)
    return a.view(torch.int32)


def _high_cpu(base, expert, hist):
    if cpu_native.hist_high(base, expert, hist):
        return
    for index in chunks.pieces(base.shape):
        bits = _abs_delta_bits_cpu(chunks.read(base, index), chunks.read(expert, index))
        hist += torch.bincount(bits >> 16, minlength=HIGH_BINS)


def _low_cpu(base, expert, buckets, hist):
    if cpu_native.hist_low(base, expert, buckets, hist):
        return
    for index in chunks.pieces(base.shape):
        bits = _abs_delta_bits_cpu(chunks.read(base, index), chunks.read(expert, index))
        high = bits >> 16
        for slot, bucket in enumerate(buckets):
            hist[slot] += torch.bincount(bits[high == bucket] & 0xFFFF, minlength=LOW_BINS)


# ------------------------------------------------------------------------------------------- selection

def _walk(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, rank within bin) of the `rank`-th largest element counted in `hist` (bins ascending)."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, rank))
    above = int(from_top[j - 1]) if j > 0 else 0
    return hist.numel() - 1 - j, rank - above


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int32).view(torch.float32))


def _histogram_pass(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], buckets: list[int] | None):
    """Pass 1 (buckets None): (high histogram, n). Pass 2: (low histograms, one row per bucket, n)."""
    hists: dict[torch.device, torch.Tensor] = {}
    n = 0
    for i, (base, expert) in enumerate(pairs):
        if base.shape != expert.shape:
            raise ValueError(f"topk_thresholds: pair {i}: base shape {tuple(base.shape)} != expert shape "
                             f"{tuple(expert.shape)}")
        n += base.numel()
        if base.numel() == 0:
            continue
        triton = kernel_backend(base) == "triton"
        if base.device not in hists:
            shape = (HIGH_BINS,) if buckets is None else (len(buckets), LOW_BINS)
            hists[base.device] = torch.zeros(shape, dtype=torch.int64, device=base.device)
        hist = hists[base.device]
        if buckets is None:
            (_high_triton if triton else _high_cpu)(base, expert, hist)
        else:
            (_low_triton if triton else _low_cpu)(base, expert, buckets, hist)
    total = sum((h.cpu() for h in hists.values()), torch.zeros(1, dtype=torch.int64))
    return total, n


def topk_thresholds_multi(make_pairs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                          fractions: Sequence[float]) -> list[float]:
    """τ(f) for each fraction, ranking |δ| over all the pairs together (model scope).

    `make_pairs` is called once per pass (at most twice) and may yield tensors one at a time.
    """
    fractions = _check_fractions(fractions)
    if all(f == 1.0 for f in fractions):
        return [0.0] * len(fractions)
    if kernel_backend() == "reference":
        return _thresholds_reference(list(make_pairs()), fractions)
    high, n = _histogram_pass(make_pairs(), None)
    if n == 0:
        return [0.0] * len(fractions)
    located = {}
    for f in fractions:
        if f < 1.0:
            located[f] = _walk(high, keep_count(f, n))
    buckets = sorted({bucket for bucket, _ in located.values()})
    low, _ = _histogram_pass(make_pairs(), buckets)
    out = []
    for f in fractions:
        if f == 1.0:
            out.append(0.0)
            continue
        bucket, rank = located[f]
        low_bits, _ = _walk(low[buckets.index(bucket)], rank)
        out.append(_bits_to_float(bucket << 16 | low_bits))
    return out


def topk_thresholds(base: torch.Tensor, expert: torch.Tensor, fractions: Sequence[float]) -> list[float]:
    """τ(f) for each fraction: the ⌈f·n⌉-th largest |expert − base| of one tensor (0.0 for f = 1)."""
    return topk_thresholds_multi(lambda: [(base, expert)], fractions)


# -------------------------------------------------------------------------------------------- reference

def topk_thresholds_reference(base: torch.Tensor, expert: torch.Tensor, fractions: Sequence[float]) -> list[float]:
    """torch.kthvalue on the materialized |δ|."""
    return _thresholds_reference([(base, expert)], _check_fractions(fractions))


def _thresholds_reference(pairs, fractions) -> list[float]:
    mags = [(e.float() - b.float()).abs().reshape(-1) for b, e in pairs]
    absdelta = torch.cat(mags) if mags else torch.zeros(0)
    absdelta = torch.where(torch.isfinite(absdelta), absdelta, 0.0)
    n = absdelta.numel()
    out = []
    for f in fractions:
        if f == 1.0 or n == 0:
            out.append(0.0)
        else:
            out.append(float(torch.kthvalue(absdelta, n - keep_count(f, n) + 1).values))
    return out


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = [float(f) for f in fractions]
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"topk_thresholds: fraction {f} is outside (0, 1]")
    return fractions
