"""ties_merge: TIES (Yadav et al. 2023), TIES-SV (Tao et al. 2024), task arithmetic and linear."""
import math

import pytest
import torch

from workbench.kernels.ties import MergeCounts, ties_merge
from workbench.kernels.ties import ties_merge_reference
from workbench.kernels.topk_threshold import topk_thresholds_reference

# Tolerances, per storage dtype, against the independent implementation written below (its sums run in
# another order, so the fp32 result may differ in the last bit before rounding to the storage dtype).
# Against `ties_merge_reference` the tolerance is zero for every dtype: same fp32 operations, same order.
INDEPENDENT = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float16: dict(rtol=1e-3, atol=1e-5),
               torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}
EXACT = dict(rtol=0, atol=0, equal_nan=True)


def yadav_ties(base, experts, densities, weights=None, lam=1.0, consensus="sum", normalize=True):
    """TIES written straight from the paper: trim (top-k by torch.topk), elect, disjoint merge."""
    b = base.float().reshape(-1)
    deltas = [e.float().reshape(-1) - b for e in experts]
    weights = weights or [1.0] * len(experts)
    kept, trimmed = [], []
    for d, k in zip(deltas, densities):
        count = max(1, math.ceil(round(k * d.numel(), 9)))                        # ⌈k·n⌉
        kth_largest = torch.topk(d.abs(), count).values[-1]
        kept.append(d.abs() >= kth_largest)                                       # ties at τ kept
        trimmed.append(torch.where(kept[-1], d, torch.zeros_like(d)))
    if consensus == "sum":
        elected = torch.sign(sum(w * t for w, t in zip(weights, trimmed)))
    else:
        elected = torch.sign(sum(torch.sign(t) for t in trimmed))
    agree = [(torch.sign(t) == elected) & (t != 0) for t in trimmed]
    total = sum(torch.where(a, w * t, torch.zeros_like(t)) for a, w, t in zip(agree, weights, trimmed))
    mass = sum(a.float() * w for a, w in zip(agree, weights))
    merged = torch.where(mass > 0, total / mass.clamp_min(1e-30), torch.zeros_like(total)) if normalize else total
    return (b + lam * merged).reshape(base.shape).to(base.dtype), agree, kept


def thresholds(base, experts, densities, slacks):
    """(τ_hi, τ_lo) per expert, from the kthvalue reference (on whatever backend the test runs)."""
    pairs = [topk_thresholds_reference(base, e, [k, min(1.0, k + s)]) for e, k, s in zip(experts, densities, slacks)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def family(make, size, dtype, count=3):
    base = make.tensor(size, dtype)
    return base, [make.expert(base, scale=0.02 * (1 + t)) for t in range(count)]


def on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else [x.to(device) for x in t] for t in tensors]


METHODS = {
    "ties-sv": dict(method="ties", weights=[1.0, 0.7, 1.3], lam=0.9, slacks=[0.0, 0.3, 0.1]),
    "ties-count": dict(method="ties", consensus="count", slacks=[0.0, 0.0, 0.0]),
    "ties-sum-unnormalized": dict(method="ties", normalize=False, slacks=[0.2, 0.0, 0.0]),
    "task_arithmetic": dict(method="task_arithmetic", weights=[0.3, 0.5, 0.2], lam=1.1),
    "linear": dict(method="linear", weights=[0.3, 0.5, 0.2]),
}


@pytest.mark.parametrize("variant", list(METHODS))
def test_matches_reference_bitwise(backend, make, size, dtype, variant):
    base, experts = family(make, size, dtype)
    kwargs = dict(METHODS[variant])
    slacks = kwargs.pop("slacks", None)
    if slacks is not None:
        kwargs["tau_hi"], kwargs["tau_lo"] = thresholds(base, experts, [0.2, 0.3, 0.5], slacks)
    got, got_counts = ties_merge(*on(backend, base, experts), **kwargs)
    want, want_counts = ties_merge_reference(base, experts, **kwargs)
    torch.testing.assert_close(got.cpu(), want, **EXACT)
    assert got.shape == base.shape and got.dtype == base.dtype
    assert got_counts == want_counts


def test_large_tensor_on_cpu_path(cpu_backend, make, dtype):
    base, experts = family(make, 1000003, dtype, count=2)
    tau_hi, tau_lo = thresholds(base, experts, [0.2, 0.3], [0.1, 0.0])
    got, got_counts = ties_merge(base, experts, tau_hi=tau_hi, tau_lo=tau_lo, weights=[1.0, 0.5])
    want, want_counts = ties_merge_reference(base, experts, tau_hi=tau_hi, tau_lo=tau_lo, weights=[1.0, 0.5])
    torch.testing.assert_close(got, want, **EXACT)
    assert got_counts == want_counts


FAST_PATH_CASES = {
    "ties": dict(weights=[1.0, 1.0, 1.0], slacks=[0.0, 0.0, 0.0]),
    "ties-sv-weighted": dict(weights=[0.5, 1.0, 2.0], lam=0.9, slacks=[0.2, 0.0, 0.1]),
    "ties-count": dict(consensus="count", slacks=[0.0, 0.3, 0.0]),
    "ties-unnormalized": dict(normalize=False, weights=[1.0, 0.7, 1.3], slacks=[0.1, 0.0, 0.0]),
    "ties-negative-weight": dict(weights=[1.0, -0.5, 1.0], slacks=[0.0, 0.1, 0.0]),  # the general path
    "task_arithmetic": dict(method="task_arithmetic", weights=[0.3, 1.0, 0.2], lam=1.1),
}


@pytest.mark.parametrize("case", list(FAST_PATH_CASES))
def test_cpu_fast_paths_give_the_reference_bits_on_ties_zeros_and_nonfinite_pieces(cpu_backend, gen, dtype, case):
    # The CPU path's bool-free fast pieces (ties_cpu.py) against the reference, bit for bit (signed zeros
    # included): deltas from a few values give ties at τ, zero deltas, ±0 in base and experts, tied sign
    # elections; a NaN and an Inf in two of the four pieces send those pieces down the general path.
    n = 3 * (1 << 17) + 5
    values = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 0.125])

    def pick():
        return values[torch.randint(len(values), (n,), generator=gen)]

    base = pick().to(dtype)
    experts = []
    for t in range(3):
        same = torch.rand(n, generator=gen) < 0.3
        experts.append(torch.where(same, base.float(), base.float() + pick()).to(dtype))
    experts[0][(1 << 17) + 11] = float("nan")
    experts[1][2 * (1 << 17) + 3] = float("inf")
    kwargs = {k: v for k, v in FAST_PATH_CASES[case].items() if k != "slacks"}
    if "slacks" in FAST_PATH_CASES[case]:
        kwargs["tau_hi"], kwargs["tau_lo"] = thresholds(base, experts, [0.2, 0.3, 0.5],
                                                        FAST_PATH_CASES[case]["slacks"])
    got, got_counts = ties_merge(base, experts, **kwargs)
    want, want_counts = ties_merge_reference(base, experts, **kwargs)
    as_bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(as_bits), want.view(as_bits))
    assert got_counts == want_counts and got_counts.nonfinite == [1, 1, 0]


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_ties_equals_the_paper_definition(backend, make, size, dtype, consensus):
    base, experts = family(make, size, dtype)
    densities, weights = [0.2, 0.3, 0.5], [1.0, 0.6, 1.4]
    tau_hi, _ = thresholds(base, experts, densities, [0.0] * 3)
    got, counts = ties_merge(*on(backend, base, experts), tau_hi=tau_hi, weights=weights, lam=0.8,
                             consensus=consensus)
    want, agree, kept = yadav_ties(base, experts, densities, weights, lam=0.8, consensus=consensus)
    torch.testing.assert_close(got.cpu(), want, **INDEPENDENT[dtype])
    assert counts.kept == [int(k.sum()) for k in kept]
    assert counts.survived == [int(a.sum()) for a in agree]


def test_ties_sv_without_slack_is_ties_bit_for_bit(backend, make, size, dtype):
    base, experts = family(make, size, dtype)
    tau_hi, tau_lo = thresholds(base, experts, [0.2, 0.3, 0.5], [0.0, 0.0, 0.0])
    ties, ties_counts = ties_merge(*on(backend, base, experts), tau_hi=tau_hi)
    sv, sv_counts = ties_merge(*on(backend, base, experts), tau_hi=tau_hi, tau_lo=tau_lo)
    assert torch.equal(ties.view(torch.uint8) if ties.dtype == torch.float32 else ties.view(torch.int16),
                       sv.view(torch.uint8) if sv.dtype == torch.float32 else sv.view(torch.int16))
    assert ties_counts == sv_counts and sv_counts.slack_admitted == [0, 0, 0]


def test_counts_match_direct_computation(backend, make):
    base, experts = family(make, 4099, torch.float32)
    weights = [1.0, 0.7, 1.3]
    tau_hi, tau_lo = thresholds(base, experts, [0.1, 0.2, 0.3], [0.0, 0.4, 0.1])
    _, counts = ties_merge(*on(backend, base, experts), tau_hi=tau_hi, tau_lo=tau_lo, weights=weights)
    d = [e - base for e in experts]
    keep = [x.abs() >= hi for x, hi in zip(d, tau_hi)]
    slack = [(x.abs() >= lo) & ~k for x, lo, k in zip(d, tau_lo, keep)]
    s = torch.sign(sum(torch.where(k, w * x, 0.0) for k, w, x in zip(keep, weights, d)))
    s = torch.where(s == 0, torch.sign(sum(torch.where(sl, w * x, 0.0) for sl, w, x in zip(slack, weights, d))), s)
    agree = [(k | sl) & (torch.sign(x) == s) & (s != 0) for k, sl, x in zip(keep, slack, d)]
    assert counts == MergeCounts(numel=4099, kept=[int(k.sum()) for k in keep],
                                 survived=[int((k & a).sum()) for k, a in zip(keep, agree)],
                                 slack_admitted=[int((sl & a).sum()) for sl, a in zip(slack, agree)],
                                 nonfinite=[0, 0, 0])
    assert counts.slack_admitted[1] > 0                              # the slack band did let some in


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_in_place_equals_out_of_place(backend, make, size, dtype, method):
    base, experts = family(make, size, dtype)
    tau_hi, tau_lo = thresholds(base, experts, [0.2, 0.3, 0.5], [0.1, 0.1, 0.0])
    kwargs = dict(tau_hi=tau_hi, tau_lo=tau_lo, weights=[1.0, 0.5, 2.0], lam=0.7, method=method)
    base, experts = on(backend, base, experts)
    fresh, fresh_counts = ties_merge(base, experts, **kwargs)
    inplace = base.clone() if base.is_contiguous() else base.t().clone().t()      # keep the strides
    result, counts = ties_merge(inplace, experts, out=inplace, **kwargs)
    assert result is inplace
    torch.testing.assert_close(inplace, fresh, **EXACT)
    assert counts == fresh_counts


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter: inf − inf
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_nonfinite_counted_and_excluded(backend, make, method):
    base, experts = family(make, 4099, torch.bfloat16)
    tau_hi, tau_lo = thresholds(base, experts, [0.3, 0.3, 0.3], [0.2, 0.0, 0.0])
    poisoned = [e.clone() for e in experts]
    poisoned[0][10] = float("nan")
    poisoned[1][11] = float("inf")
    poisoned[2][12] = float("-inf")
    clean = [e.clone() for e in experts]
    for t, i in ((0, 10), (1, 11), (2, 12)):
        clean[t][i] = base[i]                                        # δ = 0 there: what "excluded" means
    kwargs = dict(tau_hi=tau_hi, tau_lo=tau_lo, method=method)
    got, counts = ties_merge(*on(backend, base, poisoned), **kwargs)
    want, want_counts = ties_merge(*on(backend, base, clean), **kwargs)
    torch.testing.assert_close(got, want, **EXACT)
    assert counts.nonfinite == [1, 1, 1]
    assert torch.isfinite(got.float()).all()
    if method == "ties":
        assert counts.survived == want_counts.survived


def test_task_arithmetic_and_linear_formulas(backend, make, dtype):
    base, experts = family(make, 4099, dtype)
    w = [0.3, -0.5, 1.2]
    got, _ = ties_merge(*on(backend, base, experts), method="task_arithmetic", weights=w, lam=0.8)
    want = base.float() + 0.8 * sum(wt * (e.float() - base.float()) for wt, e in zip(w, experts))
    torch.testing.assert_close(got.cpu(), want.to(dtype), **INDEPENDENT[dtype])
    w = [0.3, 0.5, 1.2]
    got, counts = ties_merge(None, on(backend, experts)[0], method="linear", weights=w)
    want = sum(wt * e.float() for wt, e in zip(w, experts)) / sum(w)
    torch.testing.assert_close(got.cpu(), want.to(dtype), **INDEPENDENT[dtype])
    assert counts.kept == counts.survived == [4099] * 3 and counts.slack_admitted == [0] * 3


def test_output_dtype_follows_out(backend, make):
    base, experts = family(make, 4099, torch.bfloat16)
    out = torch.empty(4099, dtype=torch.float32, device=backend)
    got, _ = ties_merge(*on(backend, base, experts), method="task_arithmetic", out=out)
    want, _ = ties_merge_reference(base, experts, method="task_arithmetic", out=torch.empty(4099))
    assert got is out
    torch.testing.assert_close(got.cpu(), want, **EXACT)


def test_deterministic(backend, make):
    base, experts = family(make, 4099, torch.float16)
    tau_hi, tau_lo = thresholds(base, experts, [0.2, 0.3, 0.5], [0.1, 0.1, 0.1])
    first, _ = ties_merge(*on(backend, base, experts), tau_hi=tau_hi, tau_lo=tau_lo)
    second, _ = ties_merge(*on(backend, base, experts), tau_hi=tau_hi, tau_lo=tau_lo)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


def test_bad_arguments_are_refused():
    base, experts = torch.zeros(4), [torch.ones(4), torch.ones(4)]
    with pytest.raises(ValueError, match="method"):
        ties_merge(base, experts, method="dare")
    with pytest.raises(ValueError, match="3 weights for 2 experts"):
        ties_merge(base, experts, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="tau_lo"):
        ties_merge(base, experts, tau_hi=[0.5, 0.5], tau_lo=[0.6, 0.1])
    with pytest.raises(ValueError, match="needs a base"):
        ties_merge(None, experts)
    with pytest.raises(ValueError, match="shape"):
        ties_merge(base, [torch.ones(5)])
    with pytest.raises(ValueError, match="consensus"):
        ties_merge(base, experts, consensus="max")


def test_scalar_and_empty_tensors(backend):
    base, experts = torch.tensor(1.0), [torch.tensor(3.0), torch.tensor(0.0)]   # δ = 2 (kept), −1 (trimmed)
    out, counts = ties_merge(*on(backend, base, experts), tau_hi=[2.0, 2.0], weights=[1.0, 1.0])
    assert out.shape == () and out.item() == 3.0 and counts.survived == [1, 0]
    out, counts = ties_merge(*on(backend, torch.zeros(0, 5), [torch.zeros(0, 5)]))
    assert out.shape == (0, 5) and counts.kept == [0]
