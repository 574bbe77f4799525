"""DARE-TIES (Yu et al., 2024, with Yadav et al., 2023): drop each δ element with probability p = 1 − k_t,
rescale survivors by 1/(1 − p) (seeded per tensor and expert), then TIES's election and disjoint merge."""
from workbench.kernels import dare_, ties_merge
from workbench.merge.methods import MergeInfo, TensorMerge, register

# Keep every element the drop left non-zero: τ = the smallest positive float, so |δ| ≥ τ ⇔ δ ≠ 0.
KEEP_NONZERO = 1.4e-45


@register("dare_ties")
def dare_ties(job: TensorMerge):
    # The engine's expert buffers are private copies: the drop may write into them.
    experts = [dare_(expert, job.base, 1.0 - k, seed=(job.seed * 1000003 + t) % (2**31)) if k < 1 else expert
               for t, (expert, k) in enumerate(zip(job.experts, job.densities))]
    taus = [KEEP_NONZERO] * len(experts)
    out, c = ties_merge(job.base, experts, weights=job.weights, tau_hi=taus, tau_lo=taus, lam=job.lam,
                        method="ties", normalize=job.normalize, consensus=job.consensus, out=job.out)
    return out, MergeInfo("dare_ties", c.numel, kept=list(c.kept), survived=list(c.survived),
                          slack_admitted=list(c.slack_admitted), nonfinite=list(c.nonfinite),
                          thresholds=[[0.0, 0.0] for _ in experts])
