"""TIES (Yadav et al., 2023) and TIES-SV (Tao et al., 2024): trim each expert to its exact top-k |δ|, elect a
sign per element (TIES-SV: the expert's protected top-s elements vote alone where they are), average the
deltas that agree with it (docs/design.md §4.2, §4.4, §4.5)."""
from workbench.kernels.ties import ties_merge
from workbench.kernels.topk_threshold import topk_select
from workbench.merge.methods import MergeInfo, TensorMerge, register


def selections_for(job: TensorMerge) -> list:
    """(keep, protect or None) per expert: the exact top ⌊k·n⌋ and ⌊s·n⌋ of |δ| in this tensor."""
    out = []
    for expert in job.experts:
        if expert.selection is not None:  # model scope: the engine ranked the whole model
            out.append(expert.selection)
            continue
        fractions = [expert.density] + ([expert.slack] if expert.slack > 0 else [])
        sel = topk_select(job.base, expert.tensor, fractions, ties=job.trim_ties)
        out.append((sel[0], sel[1] if expert.slack > 0 else None))
    return out


def run_ties(job: TensorMerge, method: str):
    sels = selections_for(job)
    out, counts = ties_merge(job.base, job.tensors, weights=job.weights, keep=[k for k, _ in sels],
                             protect=[p for _, p in sels], lam=job.lam, method="ties", normalize=job.normalize,
                             consensus=job.consensus, out=job.out)
    taus = [(k.tau, None if p is None else p.tau) for k, p in sels]
    return out, MergeInfo.from_counts(method, counts, taus)


@register("ties")
def ties(job: TensorMerge):
    return run_ties(job, "ties")


@register("ties_sv")
def ties_sv(job: TensorMerge):
    return run_ties(job, "ties_sv")
