"""TIES and TIES-SV merge in one fused pass (DESIGN §4.3–4.5); task arithmetic and linear as switches.

TIES (Yadav et al., 2023, "TIES-Merging"), with the slack variable of TIES-SV (Tao et al., 2024), per
element, for experts t = 1..T with δ_t = θ_t − θ_b in fp32 and weights w_t:
  keep_t  = |δ_t| ≥ τ_hi[t]                     (trim: τ_hi from topk_thresholds at density k_t)
  slack_t = τ_lo[t] ≤ |δ_t| < τ_hi[t]           (the slack band; empty when τ_lo = τ_hi)
  S       = sign(Σ_t keep_t·v_t), and where that is 0, sign(Σ_t slack_t·v_t)
            with v_t = w_t·δ_t (consensus "sum") or sign(δ_t) (consensus "count": unweighted majority)
  agree_t = (keep_t ∨ slack_t) ∧ sign(δ_t) = S ≠ 0
  merged  = Σ_t agree_t·w_t·δ_t / Σ_t agree_t·w_t   (0 where no expert agrees; the plain sum if not normalize)
  out     = θ_b + λ·merged
task_arithmetic: out = θ_b + λ·Σ_t w_t·δ_t.  linear: out = Σ_t w_t·θ_t / Σ_t w_t (no base needed).

Non-finite δ_t (θ_t or θ_b NaN/Inf; for linear, non-finite θ_t) is excluded: it is neither kept nor in the
slack band, adds nothing, and is counted. Sums run over t in order, in fp32, with the same operations on
every backend (no FMA contraction), so the CPU path, the Triton kernel and the reference agree bit for bit.
The output may be θ_b's own buffer: each element is read before it is written, by the same program.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .dispatch import LAUNCH_OPTIONS, flat_contiguous, fp32_scalar, jit, kernel_backend, triton_kernels
from .rounding import store_rounded
from .ties_cpu import ties_cpu

if TYPE_CHECKING:
    import triton.language as tl

METHODS = ("ties", "task_arithmetic", "linear")
CONSENSUS = ("sum", "count")
BLOCK = 1024
FLT_MAX = 3.4028234663852886e38


@dataclass
class MergeCounts:
    """Per-expert element counts of one merged tensor (the TIES-SV diagnostic)."""

    numel: int
    kept: list[int]             # |keep_t|: top-k elements (finite ones)
    survived: list[int]         # |keep_t ∧ agree_t|: top-k elements that won the sign election
    slack_admitted: list[int]   # |slack_t ∧ agree_t|: slack-band elements let in
    nonfinite: list[int]        # elements where δ_t (θ_t for linear) is not finite


@dataclass(frozen=True)
class _Params:
    method: int                 # index into METHODS
    weights: list[float]        # all values rounded to fp32: every backend sees the same numbers
    tau_hi: list[float]
    tau_lo: list[float]
    lam: float
    count_consensus: bool
    normalize: bool

    @property
    def has_slack(self) -> bool:
        return any(lo < hi for lo, hi in zip(self.tau_lo, self.tau_hi))


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@jit
def _ties_kernel(base_ptr, experts, params_ptr, out_ptr, counts_ptr, n, lam,
                 T: tl.constexpr, METHOD: tl.constexpr, COUNT_CONSENSUS: tl.constexpr,
                 NORMALIZE: tl.constexpr, HAS_SLACK: tl.constexpr, HAS_BASE: tl.constexpr,
                 BLOCK: tl.constexpr):
    # params: [T, 3] fp32 = (w_t, τ_hi[t], τ_lo[t]); counts: [programs, T, 4] int32 =
    # (kept, survived, slack_admitted, nonfinite). The second loop re-loads the block the first loop
    # has just read (an L1/L2 hit), so DRAM sees θ_b and each expert once and the output once.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK], dtype=tl.float32)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    if METHOD == 0:
        elect = tl.zeros([BLOCK], dtype=tl.float32)
        elect_slack = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(T):
            w = tl.load(params_ptr + 3 * t)
            d = tl.load(experts[t] + offs, mask=mask, other=0.0).to(tl.float32) - b
            a = tl.abs(d)
            ok = a <= 3.4028234663852886e38
            d = tl.where(ok, d, 0.0)
            keep = ok & (a >= tl.load(params_ptr + 3 * t + 1))
            if COUNT_CONSENSUS:
                v = _sign(d)
            else:
                v = d * w
            elect += tl.where(keep, v, 0.0)
            if HAS_SLACK:
                slack = ok & (a >= tl.load(params_ptr + 3 * t + 2)) & ~keep
                elect_slack += tl.where(slack, v, 0.0)
        s = _sign(elect)
        if HAS_SLACK:
            s = tl.where(s == 0.0, _sign(elect_slack), s)
    for t in tl.static_range(T):
        w = tl.load(params_ptr + 3 * t)
        x = tl.load(experts[t] + offs, mask=mask, other=0.0).to(tl.float32)
        if METHOD == 2:
            d = x
        else:
            d = x - b
        a = tl.abs(d)
        ok = a <= 3.4028234663852886e38
        d = tl.where(ok, d, 0.0)
        if METHOD == 0:
            keep = ok & (a >= tl.load(params_ptr + 3 * t + 1))
            agree = keep
            if HAS_SLACK:
                slack = ok & (a >= tl.load(params_ptr + 3 * t + 2)) & ~keep
                agree = agree | slack
            agree = agree & (d * s > 0.0)
            survived = keep & agree
        else:
            keep = ok & mask
            agree = keep
            survived = keep
        num += tl.where(agree, d * w, 0.0)
        den += tl.where(agree, w, 0.0)
        row = counts_ptr + (pid * T + t) * 4
        tl.store(row + 0, tl.sum((keep & mask).to(tl.int32), axis=0))
        tl.store(row + 1, tl.sum((survived & mask).to(tl.int32), axis=0))
        tl.store(row + 2, tl.sum((agree & ~survived & mask).to(tl.int32), axis=0))
        tl.store(row + 3, tl.sum((~ok & mask).to(tl.int32), axis=0))
    if METHOD == 1:
        merged = num
    elif NORMALIZE or METHOD == 2:
        merged = tl.where(den != 0.0, tl.math.div_rn(num, tl.where(den != 0.0, den, 1.0)), 0.0)
    else:
        merged = num
    if METHOD == 2:
        result = merged
    else:
        result = b + lam * merged
    store_rounded(out_ptr, offs, result, mask)


def _ties_triton(base, experts, p: _Params, out) -> torch.Tensor:
    """Launch: one program per BLOCK elements; per-program counts reduced on the host in int64."""
    ref = experts[0]
    kernels = triton_kernels(globals(), ref.device)
    n, T = ref.numel(), len(experts)
    flat_experts = tuple(flat_contiguous(e) for e in experts)
    has_base = base is not None and p.method != 2
    flat_base = flat_contiguous(base) if has_base else flat_experts[0]
    target = out.view(-1) if out.is_contiguous() else torch.empty(n, dtype=out.dtype, device=out.device)
    params = torch.tensor([[w, hi, lo] for w, hi, lo in zip(p.weights, p.tau_hi, p.tau_lo)],
                          dtype=torch.float32, device=ref.device)
    grid = -(-n // BLOCK)
    counts = torch.zeros((max(grid, 1), T, 4), dtype=torch.int32, device=ref.device)
    if n:
        kernels._ties_kernel[(grid,)](flat_base, flat_experts, params, target, counts, n, p.lam,
                                      T=T, METHOD=p.method, COUNT_CONSENSUS=p.count_consensus,
                                      NORMALIZE=p.normalize, HAS_SLACK=p.has_slack,
                                      HAS_BASE=has_base, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    if target.data_ptr() != out.data_ptr() or not out.is_contiguous():
        out.copy_(target.view(out.shape))
    return counts.sum(0, dtype=torch.int64).cpu()


# --------------------------------------------------------------------------------------------- public

def ties_merge(base: torch.Tensor | None, experts: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
               tau_hi: Sequence[float] | None = None, tau_lo: Sequence[float] | None = None, lam: float = 1.0,
               method: str = "ties", normalize: bool = True, consensus: str = "sum",
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, MergeCounts]:
    """Merge one tensor: TIES / TIES-SV (default), task arithmetic or linear; returns (out, counts).

    weights: w_t (default 1). tau_hi / tau_lo: per-expert thresholds from `topk_thresholds` (default 0:
    keep everything; tau_lo defaults to tau_hi: no slack). out: where to write (may be `base`).
    """
    experts, p, out = _prepare(base, experts, weights, tau_hi, tau_lo, lam, method, normalize, consensus, out)
    backend = kernel_backend(experts[0])
    if backend == "triton":
        counts = _ties_triton(base, experts, p, out)
    elif backend == "reference":
        counts = _ties_reference(base, experts, p, out)
    else:
        counts = ties_cpu(base, experts, p, out)
    return out, _merge_counts(experts[0].numel(), counts)


def ties_merge_reference(base, experts, **kwargs) -> tuple[torch.Tensor, MergeCounts]:
    """The formula on materialized fp32 tensors (same arguments as `ties_merge`)."""
    kwargs = {"weights": None, "tau_hi": None, "tau_lo": None, "lam": 1.0, "method": "ties",
              "normalize": True, "consensus": "sum", "out": None, **kwargs}
    experts, p, out = _prepare(base, experts, kwargs["weights"], kwargs["tau_hi"], kwargs["tau_lo"],
                               kwargs["lam"], kwargs["method"], kwargs["normalize"], kwargs["consensus"],
                               kwargs["out"])
    counts = _ties_reference(base, experts, p, out)
    return out, _merge_counts(experts[0].numel(), counts)


# -------------------------------------------------------------------------------------------- reference

def _ties_reference(base, experts, p: _Params, out) -> torch.Tensor:
    T = len(experts)
    x = [e.float().reshape(-1) for e in experts]
    b = base.float().reshape(-1) if base is not None else torch.zeros_like(x[0])
    d = [xt if p.method == 2 else xt - b for xt in x]
    ok = [torch.isfinite(dt) for dt in d]
    d = [torch.where(okt, dt, 0.0) for okt, dt in zip(ok, d)]
    counts = torch.zeros((T, 4), dtype=torch.int64)
    if p.method == 0:
        keep = [okt & (dt.abs() >= hi) for okt, dt, hi in zip(ok, d, p.tau_hi)]
        slack = [okt & (dt.abs() >= lo) & ~kt for okt, dt, lo, kt in zip(ok, d, p.tau_lo, keep)]
        v = [torch.sign(dt) if p.count_consensus else dt * w for dt, w in zip(d, p.weights)]
        elect, elect_slack = torch.zeros_like(b), torch.zeros_like(b)
        for t in range(T):
            elect = elect + torch.where(keep[t], v[t], 0.0)
            elect_slack = elect_slack + torch.where(slack[t], v[t], 0.0)
        s = torch.sign(elect)
        s = torch.where(s == 0, torch.sign(elect_slack), s)
        agree = [(keep[t] | slack[t]) & (torch.sign(d[t]) == s) & (s != 0) for t in range(T)]
    else:
        keep = ok
        slack = [torch.zeros_like(okt) for okt in ok]
        agree = ok
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for t, w in enumerate(p.weights):
        num = num + torch.where(agree[t], d[t] * w, 0.0)
        den = den + torch.where(agree[t], w, 0.0)
        counts[t] = torch.stack([keep[t].sum(), (keep[t] & agree[t]).sum(), (slack[t] & agree[t]).sum(),
                                 (~ok[t]).sum()])
    if p.method == 1 or (p.method == 0 and not p.normalize):
        merged = num
    else:
        merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    result = merged if p.method == 2 else b + p.lam * merged
    out.copy_(result.view(out.shape))
    return counts


# ---------------------------------------------------------------------------------------------- helpers

def _prepare(base, experts, weights, tau_hi, tau_lo, lam, method, normalize, consensus, out):
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
    tau_hi = [0.0] * T if tau_hi is None else list(tau_hi)
    tau_lo = tau_hi if tau_lo is None else list(tau_lo)
    for name, values in (("weights", weights), ("tau_hi", tau_hi), ("tau_lo", tau_lo)):
        if len(values) != T:
            raise ValueError(f"ties_merge: {len(values)} {name} for {T} experts")
    for t, (lo, hi) in enumerate(zip(tau_lo, tau_hi)):
        if lo > hi:
            raise ValueError(f"ties_merge: expert {t}: tau_lo {lo} > tau_hi {hi}")
    if out is None:
        dtype = base.dtype if base is not None else experts[0].dtype
        out = torch.empty(shape, dtype=dtype, device=experts[0].device)
    elif out.shape != shape:
        raise ValueError(f"ties_merge: out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    p = _Params(method=METHODS.index(method), weights=[fp32_scalar(w) for w in weights],
                tau_hi=[fp32_scalar(v) for v in tau_hi], tau_lo=[fp32_scalar(v) for v in tau_lo],
                lam=fp32_scalar(lam), count_consensus=consensus == "count", normalize=bool(normalize))
    return experts, p, out


def _merge_counts(numel: int, counts: torch.Tensor) -> MergeCounts:
    c = counts.tolist()
    return MergeCounts(numel=numel, kept=[r[0] for r in c], survived=[r[1] for r in c],
                       slack_admitted=[r[2] for r in c], nonfinite=[r[3] for r in c])
