"""The exact top-k selection of |δ| (docs/design.md §4.2, §5.3: the trim of TIES, Yadav et al. 2023, and
the protection of TIES-SV, §4.5).

For a density k over n elements the selection keeps exactly m = max(1, ⌊k·n⌋) elements (mergekit's count,
`int(k * n)` in float64): τ is the m-th largest |δ| = |θ_expert − θ_base| in fp32 (non-finite δ ranks as
0), every element above τ is kept, and of the elements equal to τ the first ones in flat index order, as
many as m still needs (`TopK.take`). The rule `keep_all` keeps every tie instead (the TIES reference code).
τ equals ``torch.kthvalue(|δ|, n − m + 1)`` on the materialized magnitudes, bit for bit.

On the Triton backend a sampled bracket finds τ in one pass over |δ| (bracket_select.py); when the sample
misses, and on the CPU path, the radix passes below do. Both are exact.

Algorithm of the fallback and the CPU path: radix select. Non-negative fp32 values order like their bit
patterns read as unsigned integers, so the m-th largest is found digit by digit, most significant first: each
pass (radix_passes.py)
histograms one digit over the elements whose higher digits equal the prefix chosen so far, and walking
the histogram from the top gives the next digit and the rank left inside it. |δ| is recomputed from base
and expert in every pass: no sort, no index tensor, δ never materialized for a whole tensor. All
fractions share the passes.

The last pass's per-program (Triton) or per-range (C) rows hold each segment's count of elements equal to
τ: a merge turns them into per-segment quotas of ties with an exclusive prefix sum (`segment_quotas`), so
every program knows which ties are its own without a serial pass. This module also holds the selection in
the three forms other kernels apply it: `topk_member` (inside a Triton kernel), `PieceSelection` (the
PyTorch pieces, in flat order) and `topk_member_reference` (whole tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch

from . import bracket_select, cpu_native, radix_passes
from .dispatch import jit, kernel_backend
from .radix_passes import segment_size

if TYPE_CHECKING:
    import triton.language as tl

ALL = 1 << 62                 # a quota of ties larger than any tensor: every tie
TIE_RULES = ("exact", "keep_all")
ALGORITHMS = ("auto", "radix")   # auto: the sampled bracket on Triton (radix where it misses); radix: always


def keep_count(fraction: float, n: int) -> int:
    """m = max(1, ⌊f·n⌋) with f·n in float64, as mergekit counts (`int(density * numel)`); n for f = 1."""
    if fraction >= 1.0:
        return n
    return min(max(int(fraction * n), 1), n)


@dataclass(frozen=True)
class TopK:
    """An exact top-k selection of |δ| in one tensor: every element with |δ| > tau, and the first `take`
    elements with |δ| = tau in flat index order (`take` ≥ `ties`: every one).

    ties: how many elements equal tau (None: not counted). count: m, the size of the selection (None for
    a tensor's share of a model-scope pool). segment, segment_ties: the count of ties in each segment of
    `segment` elements, as the selection's last pass found them (0 / None: not recorded).
    """

    tau: float
    take: int = ALL
    ties: int | None = None
    count: int | None = None
    segment: int = field(default=0, compare=False)
    segment_ties: torch.Tensor | list | None = field(default=None, compare=False, repr=False)

    @property
    def partial(self) -> bool:
        """Whether only some of the ties are kept (then which ones depends on their positions)."""
        if self.take <= 0:
            return False
        return self.take < (ALL if self.ties is None else self.ties)


KEEP_ALL_ELEMENTS = TopK(tau=0.0)                      # |δ| ≥ 0: every finite element
NO_ELEMENTS = TopK(tau=float("inf"), take=0)           # |δ| > inf: none (no protection)


@dataclass(frozen=True)
class PoolTopK:
    """A model-scope selection: the whole pool's, and each tensor's share of it (in pool order)."""

    whole: TopK
    parts: list


# -------------------------------------------------------------------- the selection inside other kernels

@jit
def topk_member(a, ok, live, tau, quota, EXACT: tl.constexpr):
    # The exact top-k in a block: |δ| > τ, and ties at τ while the segment's quota lasts, in flat order.
    # a = |δ| (0 where not finite). Returns (member, quota left). A quota of 0 or ALL (every tie of the
    # segment: segment_quotas writes ALL where a quota covers them) needs no tie's rank and leaves the
    # quota as it is; only a segment that takes part of its ties (EXACT, at most one segment per selection)
    # pays for the block-wide prefix sum and count.
    tie = live & (a == tau)
    member = ok & ((a > tau) | (tie & (tie.to(tl.int64) <= quota)))     # every tie if quota > 0
    left = quota
    if EXACT:
        if (quota > 0) & (quota < ALL):
            rank = tl.cumsum(tie.to(tl.int32), axis=0).to(tl.int64)
            member = ok & ((a > tau) | (tie & (rank <= quota)))
            left = tl.maximum(quota - tl.sum(tie.to(tl.int32), axis=0).to(tl.int64), 0)
    return member, left


class PieceSelection:
    """A selection applied piece by piece in flat order: the ties at τ it still takes are consumed as it goes."""

    def __init__(self, sel: TopK):
        self.tau = torch.tensor(sel.tau, dtype=torch.float32)
        self.left = sel.take

    def member(self, a: torch.Tensor, ok: torch.Tensor | None) -> torch.Tensor:
        """|δ| > τ, and ties at τ while the quota lasts; `a` is |δ| (0 where not finite)."""
        if self.left <= 0:
            chosen = a > self.tau
        else:
            tie = a == self.tau
            ties = int(tie.count_nonzero())
            if ties <= self.left:
                chosen = a >= self.tau
            else:
                chosen = (a > self.tau) | (tie & (torch.cumsum(tie, 0) <= self.left))
            self.left = max(self.left - ties, 0)
        return chosen if ok is None else chosen & ok


# ------------------------------------------------------------------------------------------- selection

def _walk(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin, rank within bin) of the `rank`-th largest element counted in `hist` (bins ascending)."""
    from_top = np.cumsum(hist[::-1])
    j = int(np.searchsorted(from_top, rank))
    above = int(from_top[j - 1]) if j > 0 else 0
    return hist.size - 1 - j, rank - above


def _bits_to_float(bits: int) -> float:
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


class _Passes:
    """The radix passes over a sequence of (base, expert) pairs, each pair on its own backend, with one
    digit layout for all: Triton's when the first pair runs Triton, else the CPU layout (the PyTorch pieces
    take either, so a pair whose backend has the other layout runs them)."""

    def __init__(self, make_pairs: Callable[[], Iterable]):
        self.make_pairs = make_pairs
        self.digits = None
        self.n = 0
        self.segment_rows = None   # a single pair's last-pass rows per segment (C range or Triton program)
        self.segment = 0

    def _backend(self, base, expert) -> str:
        backend = kernel_backend(base, expert, native=True)
        if self.digits is None:
            self.digits = radix_passes.TRITON_DIGITS if backend == "triton" else radix_passes.CPU_DIGITS
        if (backend == "triton") != (self.digits is radix_passes.TRITON_DIGITS):
            return "torch"
        return backend

    def run(self, step: int, prefixes: list[int], keep_segments: bool = False) -> np.ndarray:
        """Pass `step` over every pair: int64 [max(1, len(prefixes)), 2**width] (pass 0 also counts n)."""
        total, pairs = None, 0
        self.segment_rows, self.segment = None, 0
        for i, (base, expert) in enumerate(self.make_pairs()):
            if base.shape != expert.shape:
                raise ValueError(f"topk_select: pair {i}: base shape {tuple(base.shape)} != expert shape "
                                 f"{tuple(expert.shape)}")
            pairs += 1
            if step == 0:
                self.n += base.numel()
            if base.numel() == 0:
                continue
            backend = self._backend(base, expert)
            shift, width = self.digits[step]
            if backend == "triton":
                rows, seg = radix_passes.triton_pass(base, expert, shift, width, prefixes), segment_size(base.numel())
            elif backend == "c":
                rows = cpu_native.radix_hist(base, expert, shift, width, prefixes)
                seg = cpu_native.segment(base.numel())
            else:
                rows, seg = radix_passes.torch_pass(base, expert, shift, width, prefixes), 0
            # Host-side bookkeeping in numpy: a PyTorch op per pass and tensor is an OpenMP region, which
            # stalls for milliseconds whenever another process holds a core.
            part = rows.sum(0, dtype=torch.int64).cpu().numpy() if isinstance(rows, torch.Tensor) else rows.sum(0)
            total = part if total is None else total + part
            if keep_segments and seg:
                self.segment_rows, self.segment = rows, seg
        if pairs != 1:
            self.segment_rows, self.segment = None, 0
        return total


def _bracket_select(make_pairs, fractions: list[float], rule: str) -> list[TopK] | None:
    """The exact selections by the sampled bracket (bracket_select.py); None where it does not apply or missed."""
    ranked = [f for f in fractions if f < 1.0]
    found = bracket_select.bracket_select(make_pairs, lambda n: [keep_count(f, n) for f in ranked])
    if found is None:
        return None
    n, segment, picks = found
    picks, out = iter(picks), []
    for f in fractions:
        if f >= 1.0:
            out.append(TopK(0.0, count=n))
            continue
        key, above, ties, segment_ties = next(picks)
        m = keep_count(f, n)
        recorded = segment_ties is not None and rule == "exact"
        out.append(TopK(_bits_to_float(key), take=m - above if rule == "exact" else ALL, ties=ties, count=m,
                        segment=segment if recorded else 0, segment_ties=segment_ties if recorded else None))
    return out


def _radix_select(passes: _Passes, fractions: list[float], rule: str) -> list[TopK]:
    """The exact selections of `fractions` over everything `passes` reads."""
    hist = passes.run(0, [])          # the top digit of every element; fixes n and the digit layout
    if passes.n == 0 or hist is None:
        return [TopK(0.0, count=passes.n) for _ in fractions]
    ranked = [i for i, f in enumerate(fractions) if f < 1.0]
    prefix = {i: 0 for i in ranked}
    rank = {i: keep_count(fractions[i], passes.n) for i in ranked}
    row_of = {i: 0 for i in ranked}
    found = {}
    for step, (_, width) in enumerate(passes.digits):
        if step:
            prefixes = sorted(set(prefix.values()))
            hist = passes.run(step, prefixes, keep_segments=step == len(passes.digits) - 1)
            row_of = {i: prefixes.index(prefix[i]) for i in ranked}
        for i in ranked:
            row = hist[row_of[i]]
            digit, rank[i] = _walk(row, rank[i])
            prefix[i] = prefix[i] << width | digit
            found[i] = (row_of[i], digit, int(row[digit]))
    out = []
    for i, f in enumerate(fractions):
        if f >= 1.0:
            out.append(TopK(0.0, count=passes.n))
            continue
        row, digit, ties = found[i]
        segment_ties = None
        if passes.segment_rows is not None and rule == "exact":
            column = passes.segment_rows[:, row, digit]
            segment_ties = column.to(torch.int64) if isinstance(column, torch.Tensor) else column.tolist()
        out.append(TopK(_bits_to_float(prefix[i]), take=rank[i] if rule == "exact" else ALL, ties=ties,
                        count=keep_count(f, passes.n), segment=passes.segment if segment_ties is not None else 0,
                        segment_ties=segment_ties))
    return out


def topk_select(base: torch.Tensor, expert: torch.Tensor, fractions: Sequence[float],
                ties: str = "exact", algorithm: str = "auto") -> list[TopK]:
    """The exact top-m selection of |expert − base| for each fraction (m = max(1, ⌊f·n⌋); f = 1: all).
    algorithm: "auto" or "radix" (the radix passes on every backend; for comparing the two)."""
    fractions, _ = _check(fractions, ties, algorithm)
    backend = kernel_backend(base, expert, native=True)
    if backend == "reference":
        return _select_reference([(base, expert)], fractions, ties)
    if all(f >= 1.0 for f in fractions):
        return [TopK(0.0, count=base.numel()) for _ in fractions]
    if algorithm == "auto" and base.numel() and backend == "triton":
        found = _bracket_select(lambda: [(base, expert)], fractions, ties)
        if found is not None:
            return found
    return _radix_select(_Passes(lambda: [(base, expert)]), fractions, ties)


def topk_thresholds(base: torch.Tensor, expert: torch.Tensor, fractions: Sequence[float]) -> list[float]:
    """τ for each fraction: the m-th largest |expert − base| (0.0 for f = 1)."""
    return [s.tau for s in topk_select(base, expert, fractions)]


def topk_select_multi(make_pairs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                      fractions: Sequence[float], ties: str = "exact", algorithm: str = "auto") -> list[PoolTopK]:
    """Model scope: the selections over all the pairs together, ties ordered by pair then flat index.

    `make_pairs` is called once per pass and may yield tensors one at a time: the passes of the bracket or
    radix selection, then, when a selection keeps only some of its ties, one pass counting each pair's ties
    to give each its share.
    """
    fractions, _ = _check(fractions, ties, algorithm)
    if kernel_backend(native=True) == "reference":
        pairs = list(make_pairs())
        return _pool_reference(pairs, fractions, ties)
    passes = _Passes(make_pairs)
    if all(f >= 1.0 for f in fractions):
        sizes = [b.numel() for b, _ in make_pairs()]
        return [PoolTopK(TopK(0.0, count=sum(sizes)), [KEEP_ALL_ELEMENTS] * len(sizes)) for _ in fractions]
    wholes = _bracket_select(make_pairs, fractions, ties) if algorithm == "auto" else None
    if wholes is None:
        wholes = _radix_select(passes, fractions, ties)
    partial = [i for i, s in enumerate(wholes) if s.partial]
    counts = {i: [] for i in partial}
    sizes = []
    for base, expert in make_pairs():
        sizes.append(base.numel())
        for i in partial:
            counts[i].append(_count_equal(base, expert, wholes[i].tau) if base.numel() else 0)
    return [PoolTopK(whole, _shares(whole, counts.get(i), len(sizes))) for i, whole in enumerate(wholes)]


def _shares(whole: TopK, pair_ties: list[int] | None, pairs: int) -> list[TopK]:
    """Each pair's part of a pool selection: ties before it in pool order use up the quota first."""
    if pair_ties is None:
        return [TopK(whole.tau, take=whole.take if whole.take == 0 else ALL)] * pairs
    parts, before = [], 0
    for t in pair_ties:
        parts.append(TopK(whole.tau, take=min(max(whole.take - before, 0), t), ties=t))
        before += t
    return parts


def _count_equal(base, expert, tau: float) -> int:
    backend = kernel_backend(base, expert, native=True)
    if backend == "triton":
        return int(radix_passes.triton_count_equal(base, expert, tau).sum())
    if backend == "c":
        return sum(cpu_native.count_equal(base, expert, tau))
    return radix_passes.torch_count_equal(base, expert, tau)


def segment_quotas(sel: TopK, base, expert, backend: str, segment: int):
    """The ties at τ each segment of `segment` elements keeps, in flat order: an exclusive prefix sum of the
    segments' tie counts (the selection's own, when it recorded them for these segments; else one counting
    pass). "c": a list of ints, one per C range; "triton": int64 [programs] on base's device, ALL where the
    quota covers every tie of its segment."""
    segments = max(1, -(-base.numel() // segment))
    if backend == "c":
        if not sel.partial:
            return [0 if sel.take <= 0 else ALL] * segments
        ties = sel.segment_ties if sel.segment == segment and sel.segment_ties is not None else \
            cpu_native.count_equal(base, expert, sel.tau)
        quotas, before = [], 0
        for count in ties:
            quotas.append(max(sel.take - before, 0))
            before += count
        return quotas
    if backend != "triton":
        raise ValueError(f"segment_quotas: backend {backend!r} has no segments")
    if not sel.partial:
        return torch.full((segments,), 0 if sel.take <= 0 else ALL, dtype=torch.int64, device=base.device)
    if sel.segment == segment and sel.segment_ties is not None:
        ties = torch.as_tensor(sel.segment_ties, device=base.device)
    else:
        ties = radix_passes.triton_count_equal(base, expert, sel.tau)
    quotas = (sel.take - (ties.cumsum(0) - ties)).clamp_min(0)
    return torch.where(quotas >= ties, ALL, quotas)       # ALL: every tie of the segment (topk_member)


# -------------------------------------------------------------------------------------------- reference

def topk_member_reference(a: torch.Tensor, ok: torch.Tensor, sel: TopK) -> torch.Tensor:
    """Membership of a flat |δ| tensor `a` (0 where not finite; `ok`: δ finite) in `sel`, whole-tensor."""
    tau = torch.tensor(sel.tau, dtype=torch.float32)
    tie = a == tau
    take = tie & (torch.cumsum(tie, 0) <= min(sel.take, a.numel() + 1))
    return ok & ((a > tau) | take)


def topk_select_reference(base: torch.Tensor, expert: torch.Tensor, fractions: Sequence[float],
                          ties: str = "exact") -> list[TopK]:
    """torch.kthvalue and counts on the materialized |δ|."""
    fractions, _ = _check(fractions, ties)
    return _select_reference([(base, expert)], fractions, ties)


def topk_thresholds_reference(base, expert, fractions) -> list[float]:
    """τ for each fraction by torch.kthvalue on the materialized |δ|."""
    return [s.tau for s in topk_select_reference(base, expert, fractions)]


def _magnitudes(pairs) -> torch.Tensor:
    mags = [(e.float() - b.float()).abs().reshape(-1) for b, e in pairs]
    absdelta = torch.cat(mags) if mags else torch.zeros(0)
    return torch.where(torch.isfinite(absdelta), absdelta, 0.0)


def _select_reference(pairs, fractions, rule) -> list[TopK]:
    a = _magnitudes(pairs)
    n = a.numel()
    out = []
    for f in fractions:
        if f >= 1.0 or n == 0:
            out.append(TopK(0.0, count=n))
            continue
        m = keep_count(f, n)
        tau = torch.kthvalue(a, n - m + 1).values
        above, ties = int((a > tau).sum()), int((a == tau).sum())
        out.append(TopK(float(tau), take=m - above if rule == "exact" else ALL, ties=ties, count=m))
    return out


def _pool_reference(pairs, fractions, rule) -> list[PoolTopK]:
    wholes = _select_reference(pairs, fractions, rule)
    out = []
    for whole in wholes:
        if not whole.partial:
            out.append(PoolTopK(whole, [TopK(whole.tau, take=whole.take if whole.take == 0 else ALL)] * len(pairs)))
            continue
        tau = torch.tensor(whole.tau, dtype=torch.float32)
        counts = [int((_magnitudes([p]) == tau).sum()) for p in pairs]
        out.append(PoolTopK(whole, _shares(whole, counts, len(pairs))))
    return out


def _check(fractions: Sequence[float], rule: str, algorithm: str = "auto"):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"topk_select: algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    fractions = [float(f) for f in fractions]
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"topk_select: fraction {f} is outside (0, 1]")
    if rule not in TIE_RULES:
        raise ValueError(f"topk_select: ties {rule!r}: expected one of {', '.join(TIE_RULES)}")
    return fractions, rule
