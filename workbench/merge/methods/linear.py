"""Linear (model soups, Wortsman et al., 2022): Σ w_t θ_t / Σ w_t."""
from workbench.kernels.ties import ties_merge
from workbench.merge.methods import MergeInfo, TensorMerge, register


@register("linear")
def linear(job: TensorMerge):
    out, counts = ties_merge(None, job.experts, weights=job.weights, method="linear", out=job.out)
    return out, MergeInfo("linear", counts.numel, nonfinite=list(counts.nonfinite))
