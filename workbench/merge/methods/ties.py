"""TIES (Yadav et al., 2023) and TIES-SV (Tao et al., 2024): trim to the top-k |δ| (plus a slack band),
elect a sign per element, average the deltas that agree with it (DESIGN.md §4.4, §4.5)."""
from workbench.kernels.ties import ties_merge
from workbench.kernels.topk_threshold import topk_thresholds
from workbench.merge.methods import MergeInfo, TensorMerge, register


def thresholds_for(job: TensorMerge) -> list:
    """(τ_hi, τ_lo) per expert: the ⌈k·n⌉-th and ⌈(k+s)·n⌉-th largest |δ| of this tensor, exact."""
    if job.thresholds is not None:  # model scope: the engine ranked the whole model
        return job.thresholds
    pairs = []
    for expert, k, s in zip(job.experts, job.densities, job.slacks):
        fractions = [k] if s == 0 else [k, min(1.0, k + s)]
        taus = topk_thresholds(job.base, expert, fractions)
        pairs.append((taus[0], taus[-1]))
    return pairs


def run_ties(job: TensorMerge, method: str):
    taus = thresholds_for(job)
    tau_hi = [hi for hi, _ in taus]
    tau_lo = [lo for _, lo in taus]
    out, c = ties_merge(job.base, job.experts, weights=job.weights, tau_hi=tau_hi, tau_lo=tau_lo, lam=job.lam,
                        method="ties", normalize=job.normalize, consensus=job.consensus, out=job.out)
    info = MergeInfo(method, c.numel, kept=list(c.kept), survived=list(c.survived),
                     slack_admitted=list(c.slack_admitted), nonfinite=list(c.nonfinite),
                     thresholds=[[hi, lo] for hi, lo in taus])
    return out, info


@register("ties")
def ties(job: TensorMerge):
    return run_ties(job, "ties")


@register("ties_sv")
def ties_sv(job: TensorMerge):
    return run_ties(job, "ties_sv")
