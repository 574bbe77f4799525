"""Exact top-k thresholds on the GPU in one pass over |δ|: a sampled bracket, then a small exact selection
(docs/design.md §5.3). The radix passes (radix_passes.py) stay the fallback and the CPU path.

For fractions f with m = keep_count(f, N) over N elements (one tensor, or a model-scope pool of pairs):
1. Sample: a fixed, spread-out sample of the ranking keys (|δ| = |θ_expert − θ_base| in fp32, non-finite as
   0, read as int32 bits; non-negative floats order like their bits). Pair i gives ⌈n_i / SAMPLE_RATE⌉
   elements at flat indices j·K mod n_i (K a large prime), sorted on the device.
2. Bracket: for each fraction, two sample order statistics lo ≤ hi around the sample rank m·S/N, Z sample
   standard deviations of that rank to each side. The m-th largest key lies in [lo, hi] unless the sample is
   very unlike the whole.
3. One pass over every pair (Triton: `_bracket_kernel`; elsewhere `bracket_pass_torch`): per fraction, the
   counts of keys above hi, equal to hi and equal to lo; and the keys strictly inside any (lo, hi),
   appended to one candidate buffer (one atomic per block of the kernel, not per element; no histogram).
   The ends are counted, not stored, because bf16 weights give |δ| long runs of equal values: at n = 200M
   of the benchmark's inputs a closed bracket held 11% of the tensor, most of it two runs at its ends.
4. Check and select: from the top, the keys above hi, the run at hi, the candidates, the run at lo. If the
   m-th largest falls in a run, τ is that run's key and the run's count is the number of ties (for a single
   tensor also per program, so a merge needs no pass to count each segment's ties); if it falls among the
   candidates, τ is found by sorting them (a small part of N), and its ties are among them. Either
   way τ has the same bits as ``torch.kthvalue`` on the materialized |δ|. If it falls outside (the sample
   missed) or the candidates overflowed the buffer, `bracket_select` returns None and the caller runs the
   radix passes.

The sample decides only how fast the answer comes, never what it is. The candidates' order in the buffer
depends on the order of the blocks' atomics; nothing downstream reads that order.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from . import chunks
from .dispatch import LAUNCH_OPTIONS, flat_contiguous, jit, kernel_backend, triton_kernels
from .radix_passes import _abs_delta_key, abs_delta_key, segment_size

if TYPE_CHECKING:
    import triton.language as tl

BLOCK = 2048                  # elements per Triton loop step (one atomic and one scan each; not tuned on a GPU)
SAMPLE_RATE = 256             # one sampled element per SAMPLE_RATE
SAMPLE_STRIDE = 2654435761    # a prime: j·K mod n spreads the sample over rows and columns
Z = 6.0                       # the bracket's half-width in standard deviations of the sample rank
MIN_CAPACITY = 1 << 16        # candidate buffer: at least this many keys ...
CAPACITY_FACTOR = 4           # ... or this many times the expected count inside the brackets
KEY_MAX = 0x7FFFFFFF          # above every key (the largest finite fp32 is 0x7F7FFFFF)
MAX_FRACTIONS = 2             # fractions per pass (the kernel's per-lane tallies; more: the radix passes)


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _bracket_kernel(base_ptr, expert_ptr, bounds_ptr, counts_ptr, fill_ptr, cands_ptr, n, segment, capacity,
                    F: tl.constexpr, BLOCK: tl.constexpr):
    # One program per segment of `segment` elements. bounds: int32 [F, 2] = (lo, hi) keys per fraction.
    # counts: int32 [programs, F, 3] = the segment's keys > hi, == hi and == lo per fraction, tallied per
    # lane in 8-bit fields of one int64 (a lane sees segment / BLOCK <= 32 elements) and reduced once at
    # the end. The keys strictly inside any (lo, hi) are appended to cands at fill (int64): one atomic per
    # block reserves the block's slots; slots at or past `capacity` are counted but not written.
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * segment
    end = tl.minimum(start + segment, n)
    tally = tl.zeros([BLOCK], dtype=tl.int64)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        live = offs < end
        key = _abs_delta_key(base_ptr, expert_ptr, offs, live)
        inside = live & False
        for f in tl.static_range(F):
            lo = tl.load(bounds_ptr + 2 * f)
            hi = tl.load(bounds_ptr + 2 * f + 1)
            tally += (((live & (key > hi)).to(tl.int64) << (24 * f))
                      | ((live & (key == hi)).to(tl.int64) << (24 * f + 8))
                      | ((live & (key == lo)).to(tl.int64) << (24 * f + 16)))
            inside = inside | (live & (key > lo) & (key < hi))
        flag = inside.to(tl.int32)
        count = tl.sum(flag, axis=0)
        if count > 0:
            slot = tl.atomic_add(fill_ptr, count.to(tl.int64))
            pos = slot + (tl.cumsum(flag, axis=0) - flag).to(tl.int64)
            tl.store(cands_ptr + pos, key, mask=inside & (pos < capacity))
    for j in tl.static_range(3 * F):
        tl.store(counts_ptr + pid * (3 * F) + j, tl.sum((tally >> (8 * j)) & 0xFF, axis=0).to(tl.int32))


def bracket_pass_triton(base, expert, bounds, fill, cands) -> torch.Tensor:
    """The pass over one pair: int32 [programs, F, 3], each program's (segment_size(n) elements) keys > hi,
    == hi, == lo per fraction; appends the keys inside (lo, hi) to `cands` at `fill` (device tensors)."""
    kernels = triton_kernels(globals(), base.device)
    b, e = flat_contiguous(base), flat_contiguous(expert)
    n, seg = b.numel(), segment_size(b.numel())
    programs, F = -(-n // seg), bounds.shape[0]
    assert F <= MAX_FRACTIONS and seg // BLOCK < 256, "the kernel's per-lane tallies are 8-bit fields of an int64"
    counts = torch.empty((programs, F, 3), dtype=torch.int32, device=base.device)
    kernels._bracket_kernel[(programs,)](b, e, bounds, counts, fill, cands, n, seg, cands.numel(), F=F,
                                         BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return counts


# ----------------------------------------------------------------------------------------------- PyTorch

def bracket_pass_torch(base, expert, bounds, fill, cands) -> torch.Tensor:
    """The same pass in PyTorch pieces (any device), in flat order: int64 [1, F, 3] (one row: no segments)."""
    lo, hi = bounds[:, 0].cpu()[:, None], bounds[:, 1].cpu()[:, None]
    counts = torch.zeros((bounds.shape[0], 3), dtype=torch.int64)
    for index in chunks.pieces(base.shape):
        key = abs_delta_key(chunks.read(base, index), chunks.read(expert, index)).cpu()[None, :]
        counts += torch.stack([(key > hi).sum(1), (key == hi).sum(1), (key == lo).sum(1)], 1)
        picked = key[0][((key > lo) & (key < hi)).any(0)]
        at = int(fill[0])
        room = max(0, min(picked.numel(), cands.numel() - at))
        cands[at:at + room] = picked[:room].to(cands.device)
        fill[0] += picked.numel()
    return counts[None].to(bounds.device)


# ----------------------------------------------------------------------------------------------- selection

def sample_keys(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """The pair's sampled keys: ⌈n / SAMPLE_RATE⌉ elements at flat indices j·SAMPLE_STRIDE mod n."""
    n = base.numel()
    count = -(-n // SAMPLE_RATE)
    index = (torch.arange(count, dtype=torch.int64, device=base.device) * SAMPLE_STRIDE) % n
    return abs_delta_key(torch.take(base, index), torch.take(expert, index))   # flat order, no copy of a view


def bracket_ranks(m: int, n: int, samples: int) -> tuple[int, int]:
    """(r_hi, r_lo): 0-based ranks from the top of the sorted sample bounding the sample rank of the m-th
    largest of n keys, Z standard deviations to each side (r_hi < 0: no upper bound; r_lo ≥ samples: none
    below)."""
    p = m / n
    mean = p * samples
    spread = Z * math.sqrt(samples * p * (1.0 - p)) + 1.0
    return math.floor(mean - spread) - 1, math.ceil(mean + spread)


def bracket_select(make_pairs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                   ranks_of: Callable[[int], list[int]]) -> tuple[int, int, list[tuple]] | None:
    """(N, the segment size of the per-segment tie counts (0: none), and for each rank m in ranks_of(N),
    1 ≤ m ≤ N, counted from the largest key over all the pairs: (τ's key, elements above τ, elements equal
    to τ, those ties per segment or None)); None when the first pair is not on the Triton backend, there
    are no elements, or the bracket missed. The ties per segment come with a single tensor whose τ is an
    end of its bracket (the pass counted that key per program), in segments of `segment_size(n)`.

    `make_pairs` is called twice: once for the sample, once for the pass.
    """
    if not 0 < len(ranks_of(1)) <= MAX_FRACTIONS:
        return None
    samples, n, device = [], 0, None
    for base, expert in make_pairs():
        if device is None:
            if kernel_backend(base, expert, native=True) != "triton":
                return None
            device = base.device
        if base.numel():
            samples.append(sample_keys(base, expert))
            n += base.numel()
    if not samples:
        return None
    ranks = ranks_of(n)
    sample = torch.cat(samples).sort(descending=True).values
    s = sample.numel()
    bounds, expected = [], 0
    for m in ranks:
        r_hi, r_lo = bracket_ranks(m, n, s)
        hi = sample[r_hi] if r_hi >= 0 else torch.tensor(KEY_MAX, dtype=torch.int32, device=device)
        lo = sample[r_lo] if r_lo < s else torch.tensor(0, dtype=torch.int32, device=device)
        bounds.append(torch.stack([lo, hi]))
        expected += -(-(min(r_lo, s) - max(r_hi, 0) + 1) * n // s)
    bounds = torch.stack(bounds).to(torch.int32).contiguous()
    capacity = min(n, max(MIN_CAPACITY, CAPACITY_FACTOR * expected))
    cands = torch.empty(capacity, dtype=torch.int32, device=device)
    fill = torch.zeros(1, dtype=torch.int64, device=device)
    counts = torch.zeros((len(ranks), 3), dtype=torch.int64, device=device)
    rows, segment = None, 0
    for base, expert in make_pairs():
        if base.numel() == 0:
            continue
        triton = kernel_backend(base, expert, native=True) == "triton"
        part = (bracket_pass_triton if triton else bracket_pass_torch)(base, expert, bounds, fill, cands)
        counts += part.sum(0, dtype=torch.int64)
        rows, segment = (part, segment_size(base.numel())) if triton and len(samples) == 1 else (None, 0)
    filled = int(fill[0])
    if filled > capacity:
        return None
    found, out = cands[:filled], []
    for f, (m, (above, at_hi, at_lo), (lo, hi)) in enumerate(zip(ranks, counts.tolist(), bounds.tolist())):
        # From the top: keys > hi, == hi, inside (lo, hi) (the candidates), == lo (lo == hi: one run).
        mine = found[(found > lo) & (found < hi)] if lo < hi else found[:0]
        inner = mine.numel()
        ends = None if rows is None else rows[:, f].to(torch.int64)     # per segment: [> hi, == hi, == lo]
        if m <= above:
            return None
        if m <= above + at_hi:
            out.append((hi, above, at_hi, None if ends is None else ends[:, 1]))
        elif m <= above + at_hi + inner:
            key = mine.topk(m - above - at_hi).values[-1]
            out.append((int(key), above + at_hi + int((mine > key).sum()), int((mine == key).sum()), None))
        elif lo < hi and m <= above + at_hi + inner + at_lo:
            out.append((lo, above + at_hi + inner, at_lo, None if ends is None else ends[:, 2]))
        else:
            return None
    return n, segment, out
