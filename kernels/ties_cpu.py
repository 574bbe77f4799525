"""The CPU path of `ties.ties_merge`: the same formula, piece by piece, in vectorized PyTorch.

Each piece (chunks.CHUNK elements) is read once from θ_b and from every expert, merged with fp32
temporaries that stay cache-sized, and written once. The operations and their order are those of the
reference (`ties._ties_reference`) up to rewrites that cannot change a bit: sign(δ)=S ∧ S≠0 as δ·S > 0,
w·δ skipped for w = 1, λ·x skipped for λ = 1, the non-finite masking only in pieces that have any.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import chunks

if TYPE_CHECKING:
    from .ties import _Params

FLT_MAX = 3.4028234663852886e38


def _delta(x: torch.Tensor, b: torch.Tensor | None):
    """(δ, |δ|, finite mask or None, non-finite count) of one expert piece; δ = 0 where not finite.

    With b None (linear) δ is θ_t itself. Never writes into `x` (a view of the caller's tensor).
    """
    if b is None:
        d = x.float()
    elif x.dtype == torch.float32:
        d = x - b
    else:
        d = x.float().sub_(b)
    a = d.abs()
    if torch.isfinite(a.max()):
        return d, a, None, 0
    ok = a <= FLT_MAX
    return torch.where(ok, d, 0.0), torch.where(ok, a, 0.0), ok, int(ok.numel() - ok.count_nonzero())


def _ties_piece(b, xs, p: "_Params", counts):
    keeps, slacks, deltas, values = [], [], [], []
    elect = elect_slack = None
    for t, x in enumerate(xs):
        d, a, ok, bad = _delta(x, b)
        counts[t, 3] += bad
        keep = a >= p.tau_hi[t]
        if ok is not None:
            keep &= ok
        v = torch.sign(d) if p.count_consensus else (d if p.weights[t] == 1.0 else d * p.weights[t])
        term = torch.where(keep, v, 0.0)
        elect = term if elect is None else elect.add_(term)
        slack = None
        if p.has_slack:
            slack = (a >= p.tau_lo[t]) & ~keep
            if ok is not None:
                slack &= ok
            term = torch.where(slack, v, 0.0)
            elect_slack = term if elect_slack is None else elect_slack.add_(term)
        keeps.append(keep)
        slacks.append(slack)
        deltas.append(d)
        values.append(None if p.count_consensus else v)
        counts[t, 0] += int(keep.count_nonzero())
    s = torch.sign(elect)
    if p.has_slack:
        s = torch.where(s == 0, torch.sign(elect_slack), s)
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for t, (d, keep, slack, wd) in enumerate(zip(deltas, keeps, slacks, values)):
        agree = (d * s) > 0
        if slack is None:
            agree &= keep
            survived = int(agree.count_nonzero())
            counts[t, 1] += survived
        else:
            agree &= keep | slack
            survived = int((agree & keep).count_nonzero())
            counts[t, 1] += survived
            counts[t, 2] += int(agree.count_nonzero()) - survived
        if wd is None:
            wd = d if p.weights[t] == 1.0 else d * p.weights[t]
        num.add_(torch.where(agree, wd, 0.0))
        den.add_(torch.where(agree, p.weights[t], 0.0))
    if not p.normalize:
        return num
    nonzero = den != 0
    return num.div_(den.masked_fill_(~nonzero, 1.0)).masked_fill_(~nonzero, 0.0)


def _task_arithmetic_piece(b, xs, p: "_Params", counts):
    acc = torch.zeros_like(b)
    for t, x in enumerate(xs):
        d, _, ok, bad = _delta(x, b)
        counts[t, 3] += bad
        counts[t, 0] += d.numel() - bad
        counts[t, 1] += d.numel() - bad
        acc.add_(d if p.weights[t] == 1.0 else d * p.weights[t])   # δ is already 0 where not finite
    return acc


def _linear_piece(xs, p: "_Params", counts):
    num = den = None
    for t, x in enumerate(xs):
        d, _, ok, bad = _delta(x, None)
        counts[t, 3] += bad
        counts[t, 0] += d.numel() - bad
        counts[t, 1] += d.numel() - bad
        if num is None:
            num, den = torch.zeros_like(d), torch.zeros_like(d)
        num.add_(d * p.weights[t])
        den.add_(torch.full_like(d, p.weights[t]) if ok is None else torch.where(ok, p.weights[t], 0.0))
    nonzero = den != 0
    return num.div_(den.masked_fill_(~nonzero, 1.0)).masked_fill_(~nonzero, 0.0)


def ties_cpu(base, experts, p: "_Params", out) -> torch.Tensor:
    """Merge piece by piece into `out`; returns counts [T, 4] int64 (kept, survived, admitted, non-finite)."""
    counts = torch.zeros((len(experts), 4), dtype=torch.int64)
    for index in chunks.pieces(experts[0].shape):
        xs = [chunks.read(e, index) for e in experts]
        if p.method == 2:
            merged = _linear_piece(xs, p, counts)
            chunks.write(out, index, merged)
            continue
        b = chunks.read(base, index).float()
        if p.method == 0:
            merged = _ties_piece(b, xs, p, counts)
        else:
            merged = _task_arithmetic_piece(b, xs, p, counts)
        if p.lam != 1.0:
            merged.mul_(p.lam)
        # `b` may be `out`'s own memory (fp32, in place): every read of it is done by now.
        chunks.write(out, index, merged.add_(b))
    return counts
