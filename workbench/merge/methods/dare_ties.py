"""DARE-TIES (Yu et al., 2024, with Yadav et al., 2023): drop each δ element with probability p = 1 − k_t,
rescale survivors by 1/(1 − p) (seeded per tensor and expert), then TIES's election and disjoint merge."""
from workbench.kernels.dare import dare_ties_merge
from workbench.merge.methods import MergeInfo, TensorMerge, register, tensor_seed


@register("dare_ties")
def dare_ties(job: TensorMerge):
    # Off the C kernels the drop writes into the experts: the engine's private buffers, so it may.
    out, counts = dare_ties_merge(job.base, job.tensors, [1.0 - e.density for e in job.experts],
                                  [tensor_seed(job.seed, t) for t in range(len(job.experts))], weights=job.weights,
                                  lam=job.lam, normalize=job.normalize, consensus=job.consensus, out=job.out)
    return out, MergeInfo.from_counts("dare_ties", counts, [(0.0, None)] * len(job.experts))
