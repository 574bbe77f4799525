"""The CPU path of `ties.ties_merge`: the same formula, piece by piece, in vectorized PyTorch.

Each piece (chunks.CHUNK elements) is read once from θ_b and from every expert, merged with fp32
temporaries that stay cache-sized, and written once. The operations and their order are those of the
reference (`ties._ties_reference`) up to rewrites that cannot change a bit: sign(δ)=S ∧ S≠0 as δ·S > 0,
w·δ skipped for w = 1, λ·x skipped for λ = 1, the non-finite masking only in pieces that have any.

TIES pieces whose deltas are all finite, with positive weights, take a fast path without a boolean
tensor: in this CPU build `torch.where` and every op that makes or reads a bool tensor run 4-30x slower
than a float op (measured on 128K elements, 2 threads: where 285 us, a comparison 40 us, a float add or
an int32 bitwise op 9-12 us). Masks are int32 words, −1 (all ones) or 0, so "δ where kept, else +0" is
the bitwise AND of δ's bits with the mask; |δ| ≥ τ compares the bit patterns (non-negative floats order
like their bits); agreement, counts and the division guard are float arithmetic on {0, ±1}. Every
rewrite gives the reference's bits (the kernel tests compare them on random inputs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import chunks, cpu_native

if TYPE_CHECKING:
    from .ties import _Params

FLT_MAX = 3.4028234663852886e38


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


def _ties_piece(b, xs, p: "_Params", counts):
    # Per expert: keep = |δ| ≥ τ_hi and cand = |δ| ≥ τ_lo = keep ∨ slack (τ_lo ≤ τ_hi), so slack = cand ⊕ keep.
    deltas, keeps, cands = [], [], []
    elect = elect_slack = None
    for t, x in enumerate(xs):
        d, a, ok, bad = _delta(x, b)
        counts[t, 3] += bad
        keep = a >= p.tau_hi[t]
        cand = a >= p.tau_lo[t] if p.has_slack else keep
        if ok is not None:                                   # only in pieces with NaN/Inf
            keep &= ok
            cand = cand & ok if p.has_slack else keep
        v = torch.sign(d) if p.count_consensus else _weighted(d, p.weights[t])
        term = torch.where(keep, v, 0.0)
        elect = term if elect is None else elect.add_(term)  # a -0 start is harmless: only sign() is read
        if p.has_slack:
            term = torch.where(cand ^ keep, v, 0.0)
            elect_slack = term if elect_slack is None else elect_slack.add_(term)
        counts[t, 0] += int(keep.count_nonzero())
        deltas.append(d)
        keeps.append(keep)
        cands.append(cand)
    s = torch.sign(elect)
    if p.has_slack:
        s = torch.where(s == 0, torch.sign(elect_slack), s)
    num, den = torch.zeros_like(b), None
    for t, (d, keep, cand) in enumerate(zip(deltas, keeps, cands)):
        agree = (d * s) > 0                                  # sign(δ) = S ≠ 0
        agree &= cand
        if p.has_slack:
            survived = int((agree & keep).count_nonzero())
            counts[t, 2] += int(agree.count_nonzero()) - survived
        else:
            survived = int(agree.count_nonzero())
        counts[t, 1] += survived
        num.add_(torch.where(agree, _weighted(d, p.weights[t]), 0.0))
        term = torch.where(agree, p.weights[t], 0.0)
        den = term if den is None else den.add_(term)        # den is only compared with 0 and divided by
    if not p.normalize:
        return num
    return torch.where(den != 0, num.div_(den), 0.0)


_ABS = 0x7FFFFFFF          # clears the sign bit: |x| on float32 bits
_MAX_FINITE = 0x7F7FFFFF   # bits of the largest finite float32: |δ| bits above it are Inf or NaN


def _float_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def _fast_params(p: "_Params"):
    """(τ_hi bits − 1, τ_lo bits − 1) per expert for the fast path, or None where it does not apply.

    a ≥ τ ⇔ (τ_bits − 1) − a_bits < 0 for non-negative finite a and τ ≥ 0 (τ = 0: bits −1, keep all).
    Positive weights make Σ agree·w zero only where no expert agrees (the division guard relies on it).
    """
    if not all(w > 0 for w in p.weights):
        return None
    taus = p.tau_hi + p.tau_lo
    if any(tau != tau for tau in taus):                      # NaN
        return None
    to_bits = lambda tau: (0 if tau <= 0 else _float_bits(tau)) - 1  # noqa: E731
    return [to_bits(t) for t in p.tau_hi], [to_bits(t) for t in p.tau_lo]


def _ties_piece_fast(b, xs, p: "_Params", counts, bits):
    """TIES / TIES-SV on a piece without boolean tensors; None if some δ is not finite (general path)."""
    hi_bits, lo_bits = bits
    i32, f32 = torch.int32, torch.float32
    deltas, mags = [], []
    for x in xs:
        d = torch.sub(x, b)
        a = d.view(i32) & _ABS
        if int(a.max()) > _MAX_FINITE:
            return None
        deltas.append(d)
        mags.append(a)
    cands, keeps, votes, slack_votes = [], [], [], []
    for t, (d, a) in enumerate(zip(deltas, mags)):
        keep = torch.rsub(a, hi_bits[t]).bitwise_right_shift_(31)          # −1 where |δ| ≥ τ_hi, else 0
        counts[t, 0] -= int(keep.sum())
        kd = (d.view(i32) & keep).view(f32)                                 # δ where kept, +0 elsewhere
        votes.append(torch.sign(kd) if p.count_consensus else _weighted(kd, p.weights[t]))
        if p.has_slack:
            cand = torch.rsub(a, lo_bits[t]).bitwise_right_shift_(31)
            sd = (d.view(i32) & (cand ^ keep)).view(f32)                    # δ in the slack band
            slack_votes.append(torch.sign(sd) if p.count_consensus else _weighted(sd, p.weights[t]))
            cands.append((d.view(i32) & cand).view(f32))
        else:
            cands.append(kd)
        keeps.append(keep)
    elect = _sum_new(votes)          # (a vote may be a kept δ itself: summed into a new tensor)
    s = torch.sign(elect)
    if p.has_slack:                                                         # where S = 0, the slack's sign
        s.add_(torch.sign(_sum_new(slack_votes)).mul_(torch.rsub(s.abs(), 1.0)))
    num, den = torch.zeros_like(b), None
    for t, (cd, keep) in enumerate(zip(cands, keeps)):
        agree = torch.mul(cd, s).sign_().clamp_min_(0.0)                   # 1 where sign(δ) = S ≠ 0, in band
        n_agree = int(agree.sum())
        if p.has_slack:
            survived = int((agree.view(i32) & keep).view(f32).sum())
            counts[t, 2] += n_agree - survived
        else:
            survived = n_agree
        counts[t, 1] += survived
        w = p.weights[t]
        num.add_(agree * _weighted(cd, w))
        term = agree if w == 1.0 else agree.mul_(w)
        den = term if den is None else den.add_(term)
    if not p.normalize:
        return num
    return num.div_(den.add_(torch.rsub(torch.sign(den), 1.0)))            # den = 0 only where num = +0


def _sum_new(terms: list) -> torch.Tensor:
    """Σ terms, left to right, in a tensor none of them is (the only term itself when there is one)."""
    if len(terms) == 1:
        return terms[0]
    total = terms[0] + terms[1]
    for term in terms[2:]:
        total.add_(term)
    return total


def _weighted(d: torch.Tensor, w: float) -> torch.Tensor:
    return d if w == 1.0 else d * w


def _task_arithmetic_piece(b, xs, p: "_Params", counts):
    acc = None
    for t, x in enumerate(xs):
        d = torch.sub(x, b)
        bad = 0
        if not torch.isfinite(d.sum()):                      # NaN/Inf here (or a finite sum overflowed)
            ok = torch.isfinite(d)
            bad = int(ok.numel() - ok.count_nonzero())
            d = torch.where(ok, d, 0.0)
        counts[t, 3] += bad
        counts[t, 0] += d.numel() - bad
        counts[t, 1] += d.numel() - bad
        term = _weighted(d, p.weights[t])                   # a new tensor (δ is one): ours to write into
        # The reference sums from +0, and +0 + term differs from term where term = −0: start with term + 0.
        acc = term.add_(0.0) if acc is None else acc.add_(term)
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
    return torch.where(den != 0, num.div_(den), 0.0)


def ties_cpu(base, experts, p: "_Params", out) -> torch.Tensor:
    """Merge into `out`; returns counts [T, 4] int64 (kept, survived, admitted, non-finite).

    The C pass (cpu_native.c) when it takes these tensors, else piece by piece in PyTorch.
    """
    native = cpu_native.ties(base, experts, p, out)
    if native is not None:
        return native
    counts = torch.zeros((len(experts), 4), dtype=torch.int64)
    bits = _fast_params(p) if p.method == 0 else None
    for index in chunks.pieces(experts[0].shape):
        xs = [chunks.read(e, index) for e in experts]
        if p.method == 2:
            merged = _linear_piece(xs, p, counts)
            chunks.write(out, index, merged)
            continue
        b = chunks.read(base, index).float()
        if p.method == 0:
            merged = _ties_piece_fast(b, xs, p, counts, bits) if bits is not None else None
            if merged is None:
                merged = _ties_piece(b, xs, p, counts)
        else:
            merged = _task_arithmetic_piece(b, xs, p, counts)
        if p.lam != 1.0:
            merged.mul_(p.lam)
        # `b` may be `out`'s own memory (fp32, in place): every read of it is done by now.
        chunks.write(out, index, merged.add_(b))
    return counts
