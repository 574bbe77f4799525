"""Task arithmetic (Ilharco et al., 2023): θ_b + λ Σ w_t δ_t."""
from workbench.kernels.ties import ties_merge
from workbench.merge.methods import MergeInfo, TensorMerge, register


@register("task_arithmetic")
def task_arithmetic(job: TensorMerge):
    out, counts = ties_merge(job.base, job.tensors, weights=job.weights, lam=job.lam, method="task_arithmetic",
                             out=job.out)
    return out, MergeInfo.from_counts("task_arithmetic", counts, trimmed=False)
