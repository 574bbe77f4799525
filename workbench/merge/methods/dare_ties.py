"""DARE-TIES (Yu et al., 2024, with Yadav et al., 2023): drop each δ element with probability p = 1 − k_t,
rescale survivors by 1/(1 − p) (seeded per tensor and expert), then TIES's election and disjoint merge."""
from workbench.kernels.dare import dare_ties_merge
from workbench.merge.methods import MergeInfo, TensorMerge, register


@register("dare_ties")
def dare_ties(job: TensorMerge):
    # Off the C kernels the drop writes into the experts: the engine's private buffers, so it may.
    T = len(job.experts)
    out, c = dare_ties_merge(job.base, job.experts, [1.0 - k for k in job.densities],
                             [(job.seed * 1000003 + t) % (2**31) for t in range(T)], weights=job.weights,
                             lam=job.lam, normalize=job.normalize, consensus=job.consensus, out=job.out)
    return out, MergeInfo("dare_ties", c.numel, kept=list(c.kept), survived=list(c.survived),
                          slack_admitted=list(c.slack_admitted), nonfinite=list(c.nonfinite),
                          thresholds=[[0.0, 0.0] for _ in range(T)])
