"""Delta statistics (docs/design.md §4.1): Σ|δ|, Σδ², max|δ|, n, ‖δ‖/‖θ_b‖ and the non-finite count, in one
pass.

δ = θ_expert − θ_base in fp32, never materialized for a whole tensor. Elements where δ is not finite
(base or expert NaN/Inf) are counted in `nonfinite` and excluded from every sum and from the max; the base
norm runs over the same finite elements, so `rel_change` compares like with like.

Batching: tensors under PACK_LIMIT elements (norms, biases) are concatenated into one work buffer and
share one launch; larger tensors are read in place, one launch each. A launch walks a table of tiles
(start, end) over its buffer; tiles never straddle two tensors; each tile writes its partial sums and the
host adds them per tensor in float64 in a fixed order (deterministic, no float atomics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from . import chunks
from .dispatch import FLT_MAX, LAUNCH_OPTIONS, flat_contiguous, jit, kernel_backend, triton_kernels

if TYPE_CHECKING:
    import triton.language as tl

PACK_LIMIT = 1 << 16      # tensors smaller than this share a launch
PACK_BUFFER = 1 << 20     # elements per shared launch at most
TILE = 1 << 14            # elements per Triton program (a 1M-element tensor still fills 64 programs)
BLOCK = 1024              # elements per Triton loop step


@dataclass(frozen=True)
class DeltaStats:
    """Magnitude statistics of δ = expert − base for one tensor (finite elements only)."""

    numel: int
    sum_abs: float
    sum_sq: float
    max_abs: float
    base_sum_sq: float
    nonfinite: int

    @property
    def rel_change(self) -> float:
        """‖δ‖₂ / ‖θ_b‖₂ (0 when both are 0, inf when only the base norm is 0)."""
        num, den = math.sqrt(self.sum_sq), math.sqrt(self.base_sum_sq)
        if den == 0.0:
            return 0.0 if num == 0.0 else math.inf
        return num / den

    @property
    def mean_abs(self) -> float:
        """Σ|δ| / (number of finite elements)."""
        finite = self.numel - self.nonfinite
        return self.sum_abs / finite if finite else 0.0


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _delta_stats_kernel(base_ptr, expert_ptr, tile_start_ptr, tile_end_ptr, sums_ptr, bad_ptr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # One program per tile [start, end): per-lane fp32 accumulators, reduced once at the end. ALIGNED: every
    # tile starts and ends at a multiple of 16 elements (a tensor alone in its launch, of 16·k elements).
    # Said to the compiler, it lets the loads be vectors: bounds read from memory are otherwise of unknown
    # alignment, and the sm_90 code loaded bf16 two bytes at a time.
    tile = tl.program_id(0)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        end = tl.multiple_of(end, 16)
    sum_abs = tl.zeros([BLOCK], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    max_abs = tl.zeros([BLOCK], dtype=tl.float32)
    base_sq = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        b = tl.load(base_ptr + idx, mask=m, other=0.0).to(tl.float32)
        e = tl.load(expert_ptr + idx, mask=m, other=0.0).to(tl.float32)
        a = tl.abs(e - b)
        ok = a <= FLT_MAX                        # false for NaN and ±Inf; masked lanes are ok
        a = tl.where(ok, a, 0.0)
        b = tl.where(ok, b, 0.0)
        sum_abs += a
        sum_sq += a * a
        max_abs = tl.maximum(max_abs, a)
        base_sq += b * b
        bad += tl.where(ok, 0, 1)
    row = sums_ptr + tile * 4
    tl.store(row + 0, tl.sum(sum_abs, axis=0))
    tl.store(row + 1, tl.sum(sum_sq, axis=0))
    tl.store(row + 2, tl.max(max_abs, axis=0))
    tl.store(row + 3, tl.sum(base_sq, axis=0))
    tl.store(bad_ptr + tile, tl.sum(bad, axis=0))


def _groups(pairs) -> Iterator[list[int]]:
    """Pair indices in launch groups: a large tensor alone; small tensors together, up to PACK_BUFFER elements."""
    group, size = [], 0
    for i, (base, _) in enumerate(pairs):
        n = base.numel()
        if n >= PACK_LIMIT:
            yield [i]
        elif n > 0:
            if group and size + n > PACK_BUFFER:
                yield group
                group, size = [], 0
            group.append(i)
            size += n
    if group:
        yield group


def _flat_group(pairs, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's bases and experts as two flat buffers (the tensor itself when alone; else concatenated)."""
    if len(group) == 1:
        base, expert = pairs[group[0]]
        return flat_contiguous(base), flat_contiguous(expert)
    # torch.cat promotes mixed dtypes to a common one; the kernel converts to fp32 on load anyway.
    return (torch.cat([pairs[i][0].reshape(-1) for i in group]),
            torch.cat([pairs[i][1].reshape(-1) for i in group]))


def delta_stats_triton(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[DeltaStats]:
    """Triton path: one launch per large tensor and one per group of small tensors."""
    pairs = _check_pairs(pairs)
    results = [_empty_stats()] * len(pairs)
    for group in _groups(pairs):
        base, expert = _flat_group(pairs, group)
        kernels = triton_kernels(globals(), base.device)
        # Tile table: every tensor of the group starts a new tile, so no tile straddles two tensors. Built
        # on the device: a Python list of a 200M-element tensor's 12k tiles kept the GPU idle for longer
        # than the kernel ran.
        starts, ends, first_tile, pos = [], [], [0], 0
        for i in group:
            n = pairs[i][0].numel()
            tile = torch.arange(pos, pos + n, TILE, dtype=torch.int64, device=base.device)
            starts.append(tile)
            ends.append((tile + TILE).clamp_max_(pos + n))
            first_tile.append(first_tile[-1] + tile.numel())
            pos += n
        tiles = first_tile[-1]
        tile_start, tile_end = (torch.cat(starts), torch.cat(ends)) if len(group) > 1 else (starts[0], ends[0])
        sums = torch.empty((tiles, 4), dtype=torch.float32, device=base.device)
        bad = torch.empty(tiles, dtype=torch.int32, device=base.device)
        aligned = len(group) == 1 and base.numel() % 16 == 0      # tiles at multiples of TILE, ending at n
        kernels._delta_stats_kernel[(tiles,)](base, expert, tile_start, tile_end, sums, bad, ALIGNED=aligned,
                                              BLOCK=BLOCK, **LAUNCH_OPTIONS)
        sums, bad = sums.double().cpu(), bad.long().cpu()
        for k, i in enumerate(group):
            part, part_bad = sums[first_tile[k]:first_tile[k + 1]], bad[first_tile[k]:first_tile[k + 1]]
            results[i] = DeltaStats(numel=pairs[i][0].numel(), sum_abs=float(part[:, 0].sum()),
                                    sum_sq=float(part[:, 1].sum()), max_abs=float(part[:, 2].max()),
                                    base_sum_sq=float(part[:, 3].sum()), nonfinite=int(part_bad.sum()))
    return results


# -------------------------------------------------------------------------------------------------- CPU

def _piece_stats(b: torch.Tensor, e: torch.Tensor) -> tuple[float, float, float, float, int]:
    bf = b.float()
    d = e.float() - bf                          # a new tensor: free to square in place below
    peak = torch.linalg.vector_norm(d, math.inf)
    bad = 0
    if not torch.isfinite(peak):
        ok = torch.isfinite(d)
        bad = int(ok.numel() - ok.count_nonzero())
        d = torch.where(ok, d, 0.0)
        bf = torch.where(ok, bf, 0.0)
        peak = torch.linalg.vector_norm(d, math.inf)
    # ‖d‖₁ reads d without a temporary; the squares are summed with PyTorch's cascade sum, whose error
    # (~1e-8 relative on 50M elements) is far below ‖d‖₂² from vector_norm (~1e-5).
    sum_abs = float(torch.linalg.vector_norm(d, 1))
    return sum_abs, float(d.mul_(d).sum()), float(peak), float(bf.square().sum()), bad


def _small_group_stats(group) -> list[DeltaStats]:
    lengths = torch.tensor([b.numel() for b, _ in group])
    b = torch.cat([b.reshape(-1).float() for b, _ in group])
    d = torch.cat([e.reshape(-1).float() for _, e in group]).sub_(b)
    ok = torch.isfinite(d)
    bad = torch.zeros(len(group), dtype=torch.int64)
    if not bool(ok.all()):
        bad = torch.segment_reduce((~ok).double(), "sum", lengths=lengths).long()
        d = torch.where(ok, d, 0.0)
        b = torch.where(ok, b, 0.0)
    # segment_reduce adds sequentially: do it in float64 (the packed buffer is small).
    a, b = d.abs_().double(), b.double()
    cols = [torch.segment_reduce(a, "sum", lengths=lengths), torch.segment_reduce(a * a, "sum", lengths=lengths),
            torch.segment_reduce(a, "max", lengths=lengths), torch.segment_reduce(b * b, "sum", lengths=lengths)]
    cols = torch.stack(cols, 1).tolist()
    return [DeltaStats(int(n), c[0], c[1], c[2], c[3], int(k))
            for n, c, k in zip(lengths.tolist(), cols, bad.tolist())]


def delta_stats_cpu(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[DeltaStats]:
    """Fast CPU path: large tensors in cache-sized pieces; small tensors concatenated and segment-reduced."""
    pairs = _check_pairs(pairs)
    results = [_empty_stats()] * len(pairs)
    for group in _groups(pairs):
        if len(group) > 1 or pairs[group[0]][0].numel() < PACK_LIMIT:
            for i, stats in zip(group, _small_group_stats([pairs[j] for j in group])):
                results[i] = stats
            continue
        base, expert = pairs[group[0]]
        s_abs = s_sq = b_sq = peak = 0.0
        bad = 0
        for index in chunks.pieces(base.shape):
            part = _piece_stats(chunks.read(base, index), chunks.read(expert, index))
            s_abs, s_sq, peak, b_sq, bad = (s_abs + part[0], s_sq + part[1], max(peak, part[2]),
                                            b_sq + part[3], bad + part[4])
        results[group[0]] = DeltaStats(base.numel(), s_abs, s_sq, peak, b_sq, bad)
    return results


# -------------------------------------------------------------------------------------------- reference

def delta_stats_reference(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[DeltaStats]:
    """The formula on materialized tensors, summed in float64."""
    out = []
    for base, expert in _check_pairs(pairs):
        delta = expert.float() - base.float()
        finite = torch.isfinite(delta)
        d = delta[finite].double()
        b = base.float()[finite].double()
        out.append(DeltaStats(numel=base.numel(), sum_abs=float(d.abs().sum()), sum_sq=float((d * d).sum()),
                              max_abs=float(d.abs().max()) if d.numel() else 0.0,
                              base_sum_sq=float((b * b).sum()), nonfinite=int((~finite).sum())))
    return out


# ------------------------------------------------------------------------------------------------ entry

def delta_stats(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[DeltaStats]:
    """Statistics of δ = expert − base for each (base, expert) pair, batched over the pairs."""
    pairs = _check_pairs(pairs)
    if not pairs:
        return []
    backend = kernel_backend(pairs[0][0])
    if backend == "triton":
        return delta_stats_triton(pairs)
    if backend == "reference":
        return delta_stats_reference(pairs)
    return delta_stats_cpu(pairs)


def _empty_stats() -> DeltaStats:
    return DeltaStats(0, 0.0, 0.0, 0.0, 0.0, 0)


def _check_pairs(pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = list(pairs)
    for i, (base, expert) in enumerate(pairs):
        if base.shape != expert.shape:
            raise ValueError(f"delta_stats: pair {i}: base shape {tuple(base.shape)} != expert shape "
                             f"{tuple(expert.shape)}")
    return pairs
