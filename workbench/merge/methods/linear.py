"""Linear (model soups, Wortsman et al., 2022): Σ w_t θ_t / Σ w_t."""
from workbench.kernels.ties import ties_merge
from workbench.merge.methods import MergeInfo, TensorMerge, register


@register("linear")
def linear(job: TensorMerge):
    out, counts = ties_merge(None, job.tensors, weights=job.weights, method="linear", out=job.out)
    return out, MergeInfo.from_counts("linear", counts, trimmed=False)
