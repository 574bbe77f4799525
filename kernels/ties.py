"""TIES and TIES-SV merge in one fused pass (docs/design.md §4.3–4.5); task arithmetic and linear as switches.

TIES (Yadav et al., 2023, "TIES-Merging") with the slack variable of TIES-SV (Tao et al., 2024, as this
project reads it), per element, for experts t = 1..T with δ_t = θ_t − θ_b in fp32 and weights w_t:
  keep_t    = the exact top-k of |δ_t| at density k_t (topk_threshold.TopK: above τ, ties in flat order)
  protect_t = the exact top-k of |δ_t| at slack s_t ≤ k_t (so protect_t ⊆ keep_t; none where s_t = 0)
  v_t       = w_t·δ_t (consensus "sum") or sign(δ_t) (consensus "count": unweighted majority)
  S_plain   = sign(Σ_t keep_t·v_t)                          (the TIES election)
  S         = sign(Σ_t protect_t·v_t) where that is not 0, else S_plain   (the protected vote decides)
  agree_t   = keep_t ∧ sign(δ_t) = S ≠ 0
  merged    = Σ_t agree_t·w_t·δ_t / Σ_t agree_t·w_t   (0 where no expert agrees; the plain sum if not normalize)
  out       = θ_b + λ·merged
With no protected element S = S_plain: TIES-SV with s = 0 is TIES bit for bit. The counts also report
each expert's kept and protected elements that entered under S_plain (the same pass, no second merge).
task_arithmetic: out = θ_b + λ·Σ_t w_t·δ_t.  linear: out = Σ_t w_t·θ_t / Σ_t w_t (no base needed).

Non-finite δ_t (θ_t or θ_b NaN/Inf; for linear, non-finite θ_t) is excluded: never kept, adds nothing,
and is counted. Sums run over t in order, in fp32, with the same operations on every backend (no FMA
contraction), so the C kernels, the PyTorch pieces, the Triton kernel and the reference agree bit for bit.
The output may be θ_b's own buffer: each element is read before it is written, by the same program.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Sequence

import torch

from . import cpu_native
from .merge_codes import Count, Method
from .dispatch import FLT_MAX, LAUNCH_OPTIONS, flat_contiguous, fp32_scalar, jit, kernel_backend, triton_kernels
from .rounding import store_rounded
from .ties_cpu import ties_pieces
from .radix_passes import segment_size
from .topk_threshold import (KEEP_ALL_ELEMENTS, NO_ELEMENTS, TopK, segment_quotas, topk_member,
                             topk_member_reference)

if TYPE_CHECKING:
    import triton.language as tl


METHODS = {"ties": Method.TIES, "task_arithmetic": Method.TASK_ARITHMETIC, "linear": Method.LINEAR}
CONSENSUS = ("sum", "count")
BLOCK = 1024       # elements per Triton loop step; below 2¹¹ for _tally's packing
TRITON_MAX_EXPERTS = 16   # the Triton kernel carries each element's memberships as bits of one int32
LANE_TALLY_EXPERTS = 4    # up to this many experts, the Triton kernel tallies its counts per lane
COUNT_STRIDE = 8   # count columns per expert in the Triton kernel's rows (len(Count) rounded up)
# The names the Triton kernel reads (module constants become tl.constexpr in its scope).
TIES, TASK_ARITHMETIC, LINEAR = Method
KEPT, KEPT_ENTERED, PROTECTED, PROTECTED_ENTERED, KEPT_ENTERED_PLAIN, PROTECTED_ENTERED_PLAIN, NONFINITE = Count


@dataclass
class MergeCounts:
    """Per-expert element counts of one merged tensor (the TIES / TIES-SV diagnostic), and what ran."""

    numel: int
    kept: list[int]
    kept_entered: list[int]
    protected: list[int]
    protected_entered: list[int]
    kept_entered_without_slack: list[int]
    protected_entered_without_slack: list[int]
    nonfinite: list[int]
    backend: str = field(default="", compare=False)   # dispatch.kernel_backend's answer that ran


@dataclass(frozen=True)
class MergeParams:
    """Everything but the tensors; numbers rounded to fp32 so every backend sees the same values."""

    method: Method
    weights: list[float]
    keep: list[TopK]
    protect: list[TopK]
    lam: float
    count_consensus: bool
    normalize: bool

    @property
    def has_protect(self) -> bool:
        return self.method == Method.TIES and any(s != NO_ELEMENTS for s in self.protect)

    @property
    def exact_ties(self) -> bool:
        """Whether some selection keeps only part of its ties (then positions decide)."""
        return self.method == Method.TIES and any(s.partial for s in self.keep + self.protect)

    @property
    def keep_taus(self) -> list[float]:
        return [s.tau for s in self.keep]

    @property
    def protect_taus(self) -> list[float]:
        return [s.tau for s in self.protect]


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@jit
def _expert_delta(expert_ptr, offs, live, b, METHOD: tl.constexpr):
    x = tl.load(expert_ptr + offs, mask=live, other=0.0).to(tl.float32)
    if METHOD == LINEAR:
        d = x
    else:
        d = x - b
    ok = live & (tl.abs(d) <= FLT_MAX)
    d = tl.where(ok, d, 0.0)
    return d, tl.abs(d), ok


@jit
def _tally(counts, cidx, first, c0, c1, c2, c3):
    # counts[first + j] += the block's count of column c_j, j < 4: one reduction for four columns, their
    # sums packed 11 bits apart (a block has at most 1024 < 2¹¹ elements).
    packed = (c0.to(tl.int64) | (c1.to(tl.int64) << 11) | (c2.to(tl.int64) << 22) | (c3.to(tl.int64) << 33))
    total = tl.sum(packed, axis=0)
    j = cidx - first
    field = tl.where((j >= 0) & (j < 4), j, 0)
    return counts + tl.where((j >= 0) & (j < 4), ((total >> (11 * field)) & 0x7FF).to(tl.int32), 0)


@jit
def _ties_kernel(base_ptr, experts, params_ptr, quotas_ptr, out_ptr, counts_ptr, n, segment, lam,
                 T: tl.constexpr, METHOD: tl.constexpr, COUNT_CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                 HAS_PROTECT: tl.constexpr, EXACT: tl.constexpr, HAS_BASE: tl.constexpr,
                 QUOTAS: tl.constexpr, COUNTS: tl.constexpr, LANE_TALLIES: tl.constexpr, BLOCK: tl.constexpr):
    # One program per segment of `segment` elements, BLOCK at a time. params: [T, 3] fp32 = (w_t, keep τ_t,
    # protect τ_t); quotas: [programs, 2T] int64 = the ties at τ expert t's keep (2t) and protect (2t+1)
    # take in this segment; counts: [programs, COUNTS] int32, expert t's Count c at t·COUNT_STRIDE + c.
    # LANE_TALLIES (T ≤ 4): each expert's seven counts are tallied per lane in 8-bit fields of one int64
    # (a lane sees segment / BLOCK ≤ 64 elements) and reduced once per program; otherwise each block
    # reduces its counts (`_tally`), a block-wide sum per four columns.
    # The first loop over the experts selects and elects; each element's memberships travel to the second
    # loop as bits of one int32 (bit t: keep_t, bit 16 + t: protect_t; T ≤ 16). The second loop re-loads
    # the block the first has just read (an L1/L2 hit), so DRAM sees θ_b and each expert once and the
    # output once.
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * segment
    end = tl.minimum(start + segment, n)
    qidx = tl.arange(0, QUOTAS)
    quota = tl.load(quotas_ptr + pid * (2 * T) + qidx, mask=qidx < 2 * T, other=0)
    cidx = tl.arange(0, COUNTS)
    counts = tl.zeros([COUNTS], dtype=tl.int32)
    lane0 = tl.zeros([BLOCK], dtype=tl.int64)
    lane1 = tl.zeros([BLOCK], dtype=tl.int64)
    lane2 = tl.zeros([BLOCK], dtype=tl.int64)
    lane3 = tl.zeros([BLOCK], dtype=tl.int64)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        live = offs < end
        if HAS_BASE:
            b = tl.load(base_ptr + offs, mask=live, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK], dtype=tl.float32)
        members = tl.zeros([BLOCK], dtype=tl.int32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        s_plain = s
        if METHOD == TIES:
            e_keep = tl.zeros([BLOCK], dtype=tl.float32)
            e_prot = tl.zeros([BLOCK], dtype=tl.float32)
            for t in tl.static_range(T):
                d, a, ok = _expert_delta(experts[t], offs, live, b, METHOD)
                keep, left = topk_member(a, ok, live, tl.load(params_ptr + 3 * t + 1),
                                         tl.sum(tl.where(qidx == 2 * t, quota, 0), axis=0), EXACT)
                quota = tl.where(qidx == 2 * t, left, quota)
                members |= keep.to(tl.int32) << t
                if COUNT_CONSENSUS:
                    v = _sign(d)
                else:
                    v = d * tl.load(params_ptr + 3 * t)
                e_keep += tl.where(keep, v, 0.0)
                if HAS_PROTECT:
                    prot, left = topk_member(a, ok, live, tl.load(params_ptr + 3 * t + 2),
                                             tl.sum(tl.where(qidx == 2 * t + 1, quota, 0), axis=0), EXACT)
                    quota = tl.where(qidx == 2 * t + 1, left, quota)
                    members |= prot.to(tl.int32) << (16 + t)
                    e_prot += tl.where(prot, v, 0.0)
            s_plain = _sign(e_keep)
            s = s_plain
            if HAS_PROTECT:
                s = tl.where(_sign(e_prot) != 0.0, _sign(e_prot), s_plain)
        num = tl.zeros([BLOCK], dtype=tl.float32)
        den = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(T):
            w = tl.load(params_ptr + 3 * t)
            d, a, ok = _expert_delta(experts[t], offs, live, b, METHOD)
            if METHOD == TIES:
                keep = ((members >> t) & 1) != 0
                prot = ((members >> (16 + t)) & 1) != 0
                agree = keep & (d * s > 0.0)
                plain = keep & (d * s_plain > 0.0)
            else:
                keep = ok
                prot = live & False
                agree = ok
                plain = ok
            num += tl.where(agree, d * w, 0.0)
            den += tl.where(agree, w, 0.0)
            if LANE_TALLIES:
                packed = ((keep.to(tl.int64) << (8 * KEPT)) | (agree.to(tl.int64) << (8 * KEPT_ENTERED))
                          | (prot.to(tl.int64) << (8 * PROTECTED))
                          | ((prot & agree).to(tl.int64) << (8 * PROTECTED_ENTERED))
                          | (plain.to(tl.int64) << (8 * KEPT_ENTERED_PLAIN))
                          | ((prot & plain).to(tl.int64) << (8 * PROTECTED_ENTERED_PLAIN))
                          | ((live & ~ok).to(tl.int64) << (8 * NONFINITE)))
                if t == 0:
                    lane0 += packed
                elif t == 1:
                    lane1 += packed
                elif t == 2:
                    lane2 += packed
                else:
                    lane3 += packed
            else:
                counts = _tally(counts, cidx, t * COUNT_STRIDE + KEPT, keep, agree, prot, prot & agree)
                counts = _tally(counts, cidx, t * COUNT_STRIDE + KEPT_ENTERED_PLAIN, plain, prot & plain,
                                live & ~ok, live & False)
        if METHOD == TASK_ARITHMETIC:
            merged = num
        elif NORMALIZE or METHOD == LINEAR:
            merged = tl.where(den != 0.0, tl.math.div_rn(num, tl.where(den != 0.0, den, 1.0)), 0.0)
        else:
            merged = num
        if METHOD == LINEAR:
            result = merged
        else:
            result = b + lam * merged
        store_rounded(out_ptr, offs, result, live)
    if LANE_TALLIES:
        for t in tl.static_range(T):
            if t == 0:
                lanes = lane0
            elif t == 1:
                lanes = lane1
            elif t == 2:
                lanes = lane2
            else:
                lanes = lane3
            for c in tl.static_range(NONFINITE + 1):
                tl.store(counts_ptr + pid * COUNTS + t * COUNT_STRIDE + c,
                         tl.sum((lanes >> (8 * c)) & 0xFF, axis=0).to(tl.int32))
    else:
        tl.store(counts_ptr + pid * COUNTS + cidx, counts)


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _ties_triton(base, experts, p: MergeParams, out) -> torch.Tensor:
    """Launch: one program per segment; per-program counts reduced on the host in int64."""
    ref = experts[0]
    kernels = triton_kernels(globals(), ref.device)
    n, T = ref.numel(), len(experts)
    seg = segment_size(n)
    programs = max(1, -(-n // seg))
    flat_experts = tuple(flat_contiguous(e) for e in experts)
    has_base = base is not None and p.method != Method.LINEAR
    flat_base = flat_contiguous(base) if has_base else flat_experts[0]
    target = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
    params = torch.tensor([[w, k, s] for w, k, s in zip(p.weights, p.keep_taus, p.protect_taus)],
                          dtype=torch.float32, device=ref.device)
    quotas = torch.zeros((programs, 2 * T), dtype=torch.int64, device=ref.device)
    if p.method == Method.TIES:
        for t, e in enumerate(flat_experts):
            quotas[:, 2 * t] = segment_quotas(p.keep[t], flat_base, e, "triton", seg)
            quotas[:, 2 * t + 1] = segment_quotas(p.protect[t], flat_base, e, "triton", seg)
    counts_width = _pow2(COUNT_STRIDE * T)
    counts = torch.zeros((programs, counts_width), dtype=torch.int32, device=ref.device)
    if n:
        kernels._ties_kernel[(programs,)](flat_base, flat_experts, params, quotas, target, counts, n, seg, p.lam,
                                          T=T, METHOD=int(p.method), COUNT_CONSENSUS=p.count_consensus,
                                          NORMALIZE=p.normalize, HAS_PROTECT=p.has_protect, EXACT=p.exact_ties,
                                          HAS_BASE=has_base, QUOTAS=_pow2(2 * T), COUNTS=counts_width,
                                          LANE_TALLIES=T <= LANE_TALLY_EXPERTS and seg // BLOCK < 256,
                                          BLOCK=BLOCK, **LAUNCH_OPTIONS)
    if target.data_ptr() != out.data_ptr() or not out.is_contiguous():
        out.copy_(target.view(out.shape))
    return counts.sum(0, dtype=torch.int64).cpu()[:COUNT_STRIDE * T].view(T, COUNT_STRIDE)[:, :len(Count)].clone()


# ---------------------------------------------------------------------------------------------- C

def range_quotas(p: MergeParams, base, experts) -> list:
    """Per C range (cpu_native.ranges), per expert: (ties its keep takes there, ties its protect takes)."""
    n = experts[0].numel()
    seg = cpu_native.segment(n)
    ranges = len(cpu_native.ranges(n))
    if p.method != Method.TIES:
        return [[(0, 0)] * len(experts) for _ in range(ranges)]
    per_expert = [(segment_quotas(k, base, e, "c", seg), segment_quotas(s, base, e, "c", seg))
                  for k, s, e in zip(p.keep, p.protect, experts)]
    return [[(keep[r], prot[r]) for keep, prot in per_expert] for r in range(ranges)]


def _ties_c(base, experts, p: MergeParams, out) -> torch.Tensor | None:
    return cpu_native.merge(base, experts, p, out, range_quotas(p, base, experts))


# --------------------------------------------------------------------------------------------- public

def ties_merge(base: torch.Tensor | None, experts: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
               keep: Sequence[TopK | None] | None = None, protect: Sequence[TopK | None] | None = None,
               lam: float = 1.0, method: str = "ties", normalize: bool = True, consensus: str = "sum",
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, MergeCounts]:
    """Merge one tensor: TIES / TIES-SV (default), task arithmetic or linear; returns (out, counts).

    weights: w_t (default 1). keep: per expert, the trim's selection (`topk_select` at density k_t; None:
    every element). protect: per expert, TIES-SV's selection at slack s_t (None: nothing). out: where to
    write (may be `base`).
    """
    experts, p, out = prepare_merge(base, experts, weights, keep, protect, lam, method, normalize, consensus, out)
    backend = kernel_backend(base, *experts, out, native=len(experts) <= cpu_native.max_experts(),
                             triton=len(experts) <= TRITON_MAX_EXPERTS)
    counts = None
    if backend == "triton":
        counts = _ties_triton(base, experts, p, out)
    elif backend == "reference":
        counts = _ties_reference(base, experts, p, out)
    elif backend == "c":
        counts = _ties_c(base, experts, p, out)
        if counts is None:          # a NaN result: PyTorch's pieces round NaN as PyTorch does
            backend = "torch"
    if counts is None:
        counts = ties_pieces(base, experts, p, out)
    return out, merge_counts(experts[0].numel(), counts, backend)


def ties_merge_reference(base, experts, **kwargs) -> tuple[torch.Tensor, MergeCounts]:
    """The formula on materialized fp32 tensors (same arguments as `ties_merge`)."""
    args = {"weights": None, "keep": None, "protect": None, "lam": 1.0, "method": "ties", "normalize": True,
            "consensus": "sum", "out": None, **kwargs}
    experts, p, out = prepare_merge(base, experts, *args.values())
    counts = _ties_reference(base, experts, p, out)
    return out, merge_counts(experts[0].numel(), counts, "reference")


# -------------------------------------------------------------------------------------------- reference

def _ties_reference(base, experts, p: MergeParams, out) -> torch.Tensor:
    T = len(experts)
    x = [e.float().reshape(-1) for e in experts]
    b = base.float().reshape(-1) if base is not None else torch.zeros_like(x[0])
    d = [xt if p.method == Method.LINEAR else xt - b for xt in x]
    ok = [torch.isfinite(dt) for dt in d]
    d = [torch.where(okt, dt, 0.0) for okt, dt in zip(ok, d)]
    counts = torch.zeros((T, len(Count)), dtype=torch.int64)
    prot = [torch.zeros_like(okt) for okt in ok]
    if p.method == Method.TIES:
        keep = [topk_member_reference(dt.abs(), okt, sel) for dt, okt, sel in zip(d, ok, p.keep)]
        if p.has_protect:
            prot = [topk_member_reference(dt.abs(), okt, sel) for dt, okt, sel in zip(d, ok, p.protect)]
        v = [torch.sign(dt) if p.count_consensus else dt * w for dt, w in zip(d, p.weights)]
        e_keep, e_prot = torch.zeros_like(b), torch.zeros_like(b)
        for t in range(T):
            e_keep = e_keep + torch.where(keep[t], v[t], 0.0)
            e_prot = e_prot + torch.where(prot[t], v[t], 0.0)
        s_plain = torch.sign(e_keep)
        s = torch.where(torch.sign(e_prot) != 0, torch.sign(e_prot), s_plain) if p.has_protect else s_plain
        agree = [keep[t] & (d[t] * s > 0) for t in range(T)]
        plain = [keep[t] & (d[t] * s_plain > 0) for t in range(T)]
    else:
        keep = agree = plain = ok
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for t, w in enumerate(p.weights):
        num = num + torch.where(agree[t], d[t] * w, 0.0)
        den = den + torch.where(agree[t], w, 0.0)
        counts[t] = torch.stack([keep[t].sum(), agree[t].sum(), prot[t].sum(), (prot[t] & agree[t]).sum(),
                                 plain[t].sum(), (prot[t] & plain[t]).sum(), (~ok[t]).sum()])
    if p.method == Method.TASK_ARITHMETIC or (p.method == Method.TIES and not p.normalize):
        merged = num
    else:
        merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    result = merged if p.method == Method.LINEAR else b + p.lam * merged
    out.copy_(result.view(out.shape))
    return counts


# ---------------------------------------------------------------------------------------------- helpers

def prepare_merge(base, experts, weights, keep, protect, lam, method, normalize, consensus, out):
    """Check the arguments of `ties_merge`; (experts as a list, MergeParams, the output tensor)."""
    experts = list(experts)
    if method not in METHODS:
        raise ValueError(f"ties_merge: method {method!r}: expected one of {', '.join(METHODS)}")
    if consensus not in CONSENSUS:
        raise ValueError(f"ties_merge: consensus {consensus!r}: expected one of {', '.join(CONSENSUS)}")
    if not experts:
        raise ValueError("ties_merge: no experts")
    if base is None and method != "linear":
        raise ValueError(f"ties_merge: method {method!r} needs a base tensor")
    shape = experts[0].shape
    for i, t in enumerate(([base] if base is not None else []) + experts):
        if t.shape != shape:
            raise ValueError(f"ties_merge: tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    T = len(experts)
    weights = [1.0] * T if weights is None else list(weights)
    keep = [None] * T if keep is None else list(keep)
    protect = [None] * T if protect is None else list(protect)
    for name, values in (("weights", weights), ("keep", keep), ("protect", protect)):
        if len(values) != T:
            raise ValueError(f"ties_merge: {len(values)} {name} for {T} experts")
    if method != "ties" and any(s is not None for s in keep + protect):
        raise ValueError(f"ties_merge: method {method!r} keeps every element; keep/protect apply to 'ties'")
    for t, (k, s) in enumerate(zip(keep, protect)):
        if k is not None and s is not None and s.tau < k.tau:
            raise ValueError(f"ties_merge: expert {t}: the protection (tau {s.tau}) reaches below the trim "
                             f"(tau {k.tau}); protect the top s·n of the kept elements (slack <= density)")
    if out is None:
        dtype = base.dtype if base is not None else experts[0].dtype
        out = torch.empty(shape, dtype=dtype, device=experts[0].device)
    elif out.shape != shape:
        raise ValueError(f"ties_merge: out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    p = MergeParams(method=METHODS[method], weights=[fp32_scalar(w) for w in weights],
                    keep=[KEEP_ALL_ELEMENTS if k is None else replace(k, tau=fp32_scalar(k.tau)) for k in keep],
                    protect=[NO_ELEMENTS if s is None else replace(s, tau=fp32_scalar(s.tau)) for s in protect],
                    lam=fp32_scalar(lam), count_consensus=consensus == "count", normalize=bool(normalize))
    return experts, p, out


def merge_counts(numel: int, counts: torch.Tensor, backend: str) -> MergeCounts:
    c = counts.tolist()
    column = lambda k: [row[k] for row in c]  # noqa: E731
    return MergeCounts(numel=numel, kept=column(Count.KEPT), kept_entered=column(Count.KEPT_ENTERED),
                       protected=column(Count.PROTECTED), protected_entered=column(Count.PROTECTED_ENTERED),
                       kept_entered_without_slack=column(Count.KEPT_ENTERED_PLAIN),
                       protected_entered_without_slack=column(Count.PROTECTED_ENTERED_PLAIN),
                       nonfinite=column(Count.NONFINITE), backend=backend)
