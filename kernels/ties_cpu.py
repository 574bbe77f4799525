"""The PyTorch pieces of `ties.ties_merge`: the same formula, piece by piece, in vectorized PyTorch.

The CPU path's fallback where the C kernels do not run (fp16, non-contiguous tensors, no compiler,
`WORKBENCH_NATIVE=0`, a NaN result), and the path for CUDA tensors without Triton (the pieces are
device-agnostic). Each piece (chunks.CHUNK elements) is read once from θ_b and from every expert, merged
with fp32 temporaries that stay cache-sized, and written once. The operations and their order are those
of the reference (`ties._ties_reference`) up to rewrites that cannot change a bit: sign(δ)=S ∧ S≠0 as
δ·S > 0, w·δ skipped for w = 1, λ·x skipped for λ = 1, the non-finite masking only in pieces that have any.
Pieces run in flat order, so the exact top-k's ties are taken with one running quota per selection.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import chunks
from .dispatch import FLT_MAX
from .merge_codes import Count, Method

from .topk_threshold import PieceSelection

if TYPE_CHECKING:
    from .ties import MergeParams


def _delta(x: torch.Tensor, b: torch.Tensor | None):
    """(δ, |δ|, finite mask or None, non-finite count) of one expert piece; δ = 0 where not finite.

    With b None (linear) δ is θ_t itself. Never writes into `x` (a view of the caller's tensor).
    """
    d = x.float() if b is None else torch.sub(x, b)     # mixed bf16/fp16 − fp32 promotes to fp32
    a = d.abs()
    if torch.isfinite(a.max()):
        return d, a, None, 0
    ok = a <= FLT_MAX
    return torch.where(ok, d, 0.0), torch.where(ok, a, 0.0), ok, int(ok.numel() - ok.count_nonzero())


def _ties_piece(b, xs, p: "MergeParams", counts, keeps: list, protects: list):
    deltas, kept, protected = [], [], []
    e_keep = e_prot = None
    for t, x in enumerate(xs):
        d, a, ok, bad = _delta(x, b)
        counts[t, Count.NONFINITE] += bad
        keep = keeps[t].member(a, ok)
        v = torch.sign(d) if p.count_consensus else _weighted(d, p.weights[t])
        term = torch.where(keep, v, 0.0)
        e_keep = term if e_keep is None else e_keep.add_(term)   # a −0 start is harmless: only sign() is read
        counts[t, Count.KEPT] += int(keep.count_nonzero())
        prot = None
        if p.has_protect:
            prot = protects[t].member(a, ok)
            term = torch.where(prot, v, 0.0)
            e_prot = term if e_prot is None else e_prot.add_(term)
            counts[t, Count.PROTECTED] += int(prot.count_nonzero())
        deltas.append(d)
        kept.append(keep)
        protected.append(prot)
    s_plain = torch.sign(e_keep)
    s = s_plain
    if p.has_protect:
        s_prot = torch.sign(e_prot)
        s = torch.where(s_prot != 0, s_prot, s_plain)
    num, den = torch.zeros_like(b), None
    for t, (d, keep, prot) in enumerate(zip(deltas, kept, protected)):
        agree = ((d * s) > 0).logical_and_(keep)                  # sign(δ) = S ≠ 0, kept
        entered = int(agree.count_nonzero())
        counts[t, Count.KEPT_ENTERED] += entered
        if p.has_protect:
            plain = ((d * s_plain) > 0).logical_and_(keep)
            counts[t, Count.PROTECTED_ENTERED] += int((prot & agree).count_nonzero())
            counts[t, Count.KEPT_ENTERED_PLAIN] += int(plain.count_nonzero())
            counts[t, Count.PROTECTED_ENTERED_PLAIN] += int((prot & plain).count_nonzero())
        else:
            counts[t, Count.KEPT_ENTERED_PLAIN] += entered
        num.add_(torch.where(agree, _weighted(d, p.weights[t]), 0.0))
        term = torch.where(agree, p.weights[t], 0.0)
        den = term if den is None else den.add_(term)        # den is only compared with 0 and divided by
    if not p.normalize:
        return num
    return torch.where(den != 0, num.div_(den), 0.0)


def _weighted(d: torch.Tensor, w: float) -> torch.Tensor:
    return d if w == 1.0 else d * w


def _task_arithmetic_piece(b, xs, p: "MergeParams", counts):
    acc = None
    for t, x in enumerate(xs):
        d = torch.sub(x, b)
        bad = 0
        if not torch.isfinite(d.sum()):                      # NaN/Inf here (or a finite sum overflowed)
            ok = torch.isfinite(d)
            bad = int(ok.numel() - ok.count_nonzero())
            d = torch.where(ok, d, 0.0)
        _count_all(counts, t, d.numel() - bad, bad)
        term = _weighted(d, p.weights[t])                   # a new tensor (δ is one): ours to write into
        # The reference sums from +0, and +0 + term differs from term where term = −0: start with term + 0.
        acc = term.add_(0.0) if acc is None else acc.add_(term)
    return acc


def _linear_piece(xs, p: "MergeParams", counts):
    num = den = None
    for t, x in enumerate(xs):
        d, _, ok, bad = _delta(x, None)
        _count_all(counts, t, d.numel() - bad, bad)
        if num is None:
            num, den = torch.zeros_like(d), torch.zeros_like(d)
        num.add_(d * p.weights[t])
        den.add_(torch.full_like(d, p.weights[t]) if ok is None else torch.where(ok, p.weights[t], 0.0))
    return torch.where(den != 0, num.div_(den), 0.0)


def _count_all(counts, t, finite: int, bad: int) -> None:
    """Methods without a trim keep, and merge, every finite element."""
    counts[t, Count.KEPT] += finite
    counts[t, Count.KEPT_ENTERED] += finite
    counts[t, Count.KEPT_ENTERED_PLAIN] += finite
    counts[t, Count.NONFINITE] += bad


def ties_pieces(base, experts, p: "MergeParams", out) -> torch.Tensor:
    """Merge into `out` piece by piece; returns counts [T, len(Count)] int64."""
    counts = torch.zeros((len(experts), len(Count)), dtype=torch.int64)
    keeps = [PieceSelection(s) for s in p.keep]
    protects = [PieceSelection(s) for s in p.protect]
    for index in chunks.pieces(experts[0].shape):
        xs = [chunks.read(e, index) for e in experts]
        if p.method == Method.LINEAR:
            chunks.write(out, index, _linear_piece(xs, p, counts))
            continue
        b = chunks.read(base, index).float()
        if p.method == Method.TIES:
            merged = _ties_piece(b, xs, p, counts, keeps, protects)
        else:
            merged = _task_arithmetic_piece(b, xs, p, counts)
        if p.lam != 1.0:
            merged.mul_(p.lam)
        # `b` may be `out`'s own memory (fp32, in place): every read of it is done by now.
        chunks.write(out, index, merged.add_(b))
    return counts
