"""ties_merge: TIES (Yadav et al. 2023), TIES-SV (Tao et al. 2024, docs/design.md §4.5), task arithmetic and
linear, bit for bit on every backend, for any piece size, thread count and Triton segment size."""
import os

import pytest
import torch

from workbench.kernels import chunks, cpu_native, radix_passes
from workbench.kernels.merge_codes import Count
from workbench.kernels.ties import MergeCounts, ties_merge
from workbench.kernels.ties import ties_merge_reference
from workbench.kernels.topk_threshold import keep_count, topk_select_reference

# Tolerances, per storage dtype, against the independent implementation written below (its sums run in
# another order, so the fp32 result may differ in the last bit before rounding to the storage dtype).
# Against `ties_merge_reference` the tolerance is zero for every dtype: same fp32 operations, same order.
INDEPENDENT = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.float16: dict(rtol=1e-3, atol=1e-5),
               torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}
EXACT = dict(rtol=0, atol=0, equal_nan=True)


def yadav_ties(base, experts, densities, weights=None, lam=1.0, consensus="sum", normalize=True):
    """TIES written from the paper, with mergekit's count: keep the ⌊k·n⌋ largest |δ| (ties by position,
    a stable descending sort), elect, disjoint merge."""
    b = base.float().reshape(-1)
    deltas = [e.float().reshape(-1) - b for e in experts]
    weights = weights or [1.0] * len(experts)
    kept, trimmed = [], []
    for d, k in zip(deltas, densities):
        order = torch.sort(d.abs(), descending=True, stable=True).indices[:max(1, int(k * d.numel()))]
        kept.append(torch.zeros_like(d, dtype=torch.bool).index_fill_(0, order, True))
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


def selections(base, experts, densities, slacks=None):
    """(keep, protect) per expert from the kthvalue reference (protect None where s = 0)."""
    keep, protect = [], []
    for e, k, s in zip(experts, densities, slacks or [0.0] * len(experts)):
        sel = topk_select_reference(base, e, [k, s] if s else [k])
        keep.append(sel[0])
        protect.append(sel[1] if s else None)
    return keep, protect


def family(make, size, dtype, count=3):
    base = make.tensor(size, dtype)
    return base, [make.expert(base, scale=0.02 * (1 + t)) for t in range(count)]


def tied_family(gen, n, dtype, count=3):
    """Deltas from a few values (ties at every τ, zero deltas, ±0, tied elections)."""
    values = torch.tensor([0.0, -0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 0.125])
    base = values[torch.randint(len(values), (n,), generator=gen)].to(dtype)
    experts = []
    for _ in range(count):
        same = torch.rand(n, generator=gen) < 0.3
        experts.append(torch.where(same, base.float(), base.float() + values[torch.randint(len(values), (n,),
                                                                                          generator=gen)]).to(dtype))
    return base, experts


def on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else [x.to(device) for x in t] for t in tensors]


def bits(t):
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


METHODS = {
    "ties-sv": dict(method="ties", weights=[1.0, 0.7, 1.3], lam=0.9, slacks=[0.0, 0.2, 0.1]),
    "ties-count": dict(method="ties", consensus="count", slacks=[0.0, 0.0, 0.0]),
    "ties-sv-count-unnormalized": dict(method="ties", normalize=False, consensus="count", slacks=[0.2, 0.0, 0.3]),
    "ties-negative-weight": dict(method="ties", weights=[1.0, -0.5, 1.0], slacks=[0.0, 0.1, 0.0]),
    "task_arithmetic": dict(method="task_arithmetic", weights=[0.3, 0.5, 0.2], lam=1.1),
    "linear": dict(method="linear", weights=[0.3, 0.5, 0.2]),
}


def arguments(variant, base, experts):
    kwargs = dict(METHODS[variant])
    slacks = kwargs.pop("slacks", None)
    if slacks is not None:
        kwargs["keep"], kwargs["protect"] = selections(base, experts, [0.2, 0.3, 0.5], slacks)
    return kwargs


@pytest.mark.parametrize("variant", list(METHODS))
def test_matches_reference_bitwise(backend, make, size, dtype, variant):
    base, experts = family(make, size, dtype)
    kwargs = arguments(variant, base, experts)
    got, got_counts = ties_merge(*on(backend, base, experts), **kwargs)
    want, want_counts = ties_merge_reference(base, experts, **kwargs)
    torch.testing.assert_close(got.cpu(), want, **EXACT)
    assert got.shape == base.shape and got.dtype == base.dtype
    assert got_counts == want_counts


@pytest.mark.parametrize("count", [1, 4, 5])
def test_any_expert_count_gives_the_same_bits_and_counts(backend, gen, count, monkeypatch):
    # The Triton kernel tallies its counts per lane up to four experts and per block above; with a small
    # segment every program's tallies add up on the host, and partial ties fall in some segments only.
    monkeypatch.setattr(radix_passes, "MAX_SEGMENT", 2048)
    monkeypatch.setattr(radix_passes, "TARGET_PROGRAMS", 1)
    base, experts = tied_family(gen, 9001, torch.bfloat16, count=count)
    experts[-1][77] = float("nan")
    from workbench.kernels.topk_threshold import topk_select

    dev_base = base.to(backend)
    sels = [topk_select(dev_base, e.to(backend), [0.3, 0.1]) for e in experts]
    kwargs = dict(keep=[s[0] for s in sels], protect=[s[1] for s in sels])
    got, counts = ties_merge(*on(backend, base, experts), **kwargs)
    want, want_counts = ties_merge_reference(base, experts, **kwargs)
    assert torch.equal(bits(got.cpu()), bits(want)) and counts == want_counts
    assert counts.kept == [s.count for s in kwargs["keep"]] and counts.nonfinite[-1] == 1


@pytest.mark.parametrize("variant", ["ties-sv", "ties-sv-count-unnormalized", "task_arithmetic"])
def test_heavy_ties_bitwise_with_exactly_m_kept(backend, gen, dtype, variant):
    # Ties at every τ: each selection keeps only some of them, by position; a NaN and an Inf send some
    # pieces down the non-finite path.
    interpreted = os.environ.get("WORKBENCH_KERNELS") == "triton" and backend == "cpu"
    base, experts = tied_family(gen, 4099 if interpreted else 3 * (1 << 17) + 5, dtype)   # several pieces
    experts[0][1000] = float("nan")
    experts[1][3001] = float("inf")
    kwargs = arguments(variant, base, experts)
    got, counts = ties_merge(*on(backend, base, experts), **kwargs)
    want, want_counts = ties_merge_reference(base, experts, **kwargs)
    assert torch.equal(bits(got.cpu()), bits(want)) and counts == want_counts
    assert counts.nonfinite == [1, 1, 0]
    if "keep" in kwargs:                                              # exactly m kept, m' protected
        assert counts.kept == [sel.count for sel in kwargs["keep"]]
        assert counts.protected == [0 if sel is None else sel.count for sel in kwargs["protect"]]
        assert kwargs["keep"][0].count == keep_count(0.2, base.numel())


def test_large_tensor_on_cpu_path(cpu_backend, make, dtype):
    base, experts = family(make, 1000003, dtype, count=2)
    keep, protect = selections(base, experts, [0.2, 0.3], [0.1, 0.0])
    got, got_counts = ties_merge(base, experts, keep=keep, protect=protect, weights=[1.0, 0.5])
    want, want_counts = ties_merge_reference(base, experts, keep=keep, protect=protect, weights=[1.0, 0.5])
    torch.testing.assert_close(got, want, **EXACT)
    assert got_counts == want_counts


@pytest.mark.parametrize("threads, piece", [(1, 1000), (2, 4096), (3, 1 << 17)])
def test_any_piece_size_and_thread_count_gives_the_same_bits(cpu_backend, gen, monkeypatch, threads, piece):
    monkeypatch.setattr(chunks, "CHUNK", piece)
    monkeypatch.setattr(cpu_native, "MIN_SPLIT", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    base, experts = tied_family(gen, 70001, torch.bfloat16)
    from workbench.kernels.topk_threshold import topk_select

    keep = [topk_select(base, e, [0.3])[0] for e in experts]                 # with the C ranges' tie counts
    protect = [None, topk_select(base, experts[1], [0.1])[0], None]
    got, counts = ties_merge(base, experts, keep=keep, protect=protect)
    want, want_counts = ties_merge_reference(base, experts, keep=keep, protect=protect)
    assert torch.equal(bits(got), bits(want)) and counts == want_counts


@pytest.mark.parametrize("segment", [1024, 2048, 8192])
def test_any_triton_segment_gives_the_same_bits(backend, gen, monkeypatch, segment):
    if os.environ.get("WORKBENCH_KERNELS") != "triton":
        pytest.skip("Triton segments")
    monkeypatch.setattr(radix_passes, "MAX_SEGMENT", segment)
    monkeypatch.setattr(radix_passes, "TARGET_PROGRAMS", 1)
    base, experts = tied_family(gen, 9001, torch.bfloat16, count=2)
    from workbench.kernels.topk_threshold import topk_select

    dev_base, dev_experts = on(backend, base, experts)
    keep = [topk_select(dev_base, e, [0.3], algorithm="radix")[0] for e in dev_experts]   # with the programs'
    assert keep[0].segment == segment and keep[0].partial                                  # tie counts
    protect = [topk_select(dev_base, dev_experts[0], [0.1])[0], None]
    got, counts = ties_merge(dev_base, dev_experts, keep=keep, protect=protect)
    want, want_counts = ties_merge_reference(base, experts, keep=keep, protect=protect)
    assert torch.equal(bits(got.cpu()), bits(want)) and counts == want_counts
    bracket = [topk_select(dev_base, e, [0.3])[0] for e in dev_experts]    # the bracket's selections
    assert bracket == keep
    again, again_counts = ties_merge(dev_base, dev_experts, keep=bracket, protect=protect)
    assert torch.equal(bits(again.cpu()), bits(want)) and again_counts == want_counts


def test_ties_equals_the_paper_definition(backend, make, size, dtype):
    base, experts = family(make, size, dtype)
    densities, weights = [0.2, 0.3, 0.5], [1.0, 0.6, 1.4]
    for consensus in ("sum", "count"):
        keep, _ = selections(base, experts, densities)
        got, counts = ties_merge(*on(backend, base, experts), keep=keep, weights=weights, lam=0.8,
                                 consensus=consensus)
        want, agree, kept = yadav_ties(base, experts, densities, weights, lam=0.8, consensus=consensus)
        torch.testing.assert_close(got.cpu(), want, **INDEPENDENT[dtype])
        assert counts.kept == [int(k.sum()) for k in kept]
        assert counts.kept_entered == [int(a.sum()) for a in agree]


def test_ties_sv_without_slack_is_ties_bit_for_bit(backend, make, size, dtype):
    base, experts = family(make, size, dtype)
    keep, protect = selections(base, experts, [0.2, 0.3, 0.5])
    assert protect == [None, None, None]
    ties, ties_counts = ties_merge(*on(backend, base, experts), keep=keep)
    sv, sv_counts = ties_merge(*on(backend, base, experts), keep=keep, protect=protect)
    assert torch.equal(bits(ties), bits(sv)) and ties_counts == sv_counts
    assert sv_counts.protected == [0, 0, 0] and sv_counts.kept_entered_without_slack == sv_counts.kept_entered


def test_the_protected_vote_keeps_the_task_experts_top_elements(backend, gen):
    # Tao et al.'s loss, constructed: the language expert's deltas are larger everywhere and, on the task
    # expert's largest deltas, of the opposite sign. TIES lets the language expert win those elections;
    # TIES-SV (slack 0.2 on the task expert) lets the task expert's protected vote decide them.
    n = 4099
    base = torch.randn(n, generator=gen)
    task = torch.rand(n, generator=gen) * 0.4 + 0.05
    task *= torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    language = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) * (torch.rand(n, generator=gen) + 1.0)
    top = task.abs() >= task.abs().kthvalue(n - int(0.2 * n) + 1).values       # the task expert's top 20%
    language = torch.where(top, -torch.sign(task) * language.abs(), language)
    experts = [base + language, base + task]
    keep = [None, topk_select_reference(base, experts[1], [0.5])[0]]
    protect = [None, topk_select_reference(base, experts[1], [0.2])[0]]
    ties, ties_counts = ties_merge(*on(backend, base, experts), keep=keep)
    sv, sv_counts = ties_merge(*on(backend, base, experts), keep=keep, protect=protect)
    ties, sv = ties.cpu(), sv.cpu()
    d_task = experts[1] - base
    assert int(top.sum()) == sv_counts.protected[1] == int(0.2 * n)
    assert (torch.sign(ties - base)[top] != torch.sign(d_task)[top]).all()     # TIES: every one lost
    assert (torch.sign(sv - base)[top] == torch.sign(d_task)[top]).all()       # TIES-SV: every one kept
    assert torch.equal(sv[top], (base + d_task)[top])                           # the task expert's own delta
    assert sv_counts.protected_entered[1] == sv_counts.protected[1]
    assert sv_counts.protected_entered_without_slack[1] == 0                   # the plain election, same pass
    assert ties_counts.kept_entered[1] == sv_counts.kept_entered_without_slack[1] < sv_counts.kept_entered[1]


def test_counts_match_direct_computation(backend, make):
    base, experts = family(make, 4099, torch.float32)
    weights = [1.0, 0.7, 1.3]
    keep, protect = selections(base, experts, [0.1, 0.3, 0.3], [0.0, 0.2, 0.1])
    _, counts = ties_merge(*on(backend, base, experts), keep=keep, protect=protect, weights=weights)
    d = [e - base for e in experts]
    k = [x.abs() >= sel.tau for x, sel in zip(d, keep)]                 # no ties in continuous data
    p = [x.abs() >= sel.tau if sel is not None else torch.zeros_like(kt) for x, sel, kt in zip(d, protect, k)]
    s_plain = torch.sign(sum(torch.where(kt, w * x, 0.0) for kt, w, x in zip(k, weights, d)))
    s_prot = torch.sign(sum(torch.where(pt, w * x, 0.0) for pt, w, x in zip(p, weights, d)))
    s = torch.where(s_prot != 0, s_prot, s_plain)
    agree = [kt & (torch.sign(x) == s) & (s != 0) for kt, x in zip(k, d)]
    plain = [kt & (torch.sign(x) == s_plain) & (s_plain != 0) for kt, x in zip(k, d)]
    total = lambda masks: [int(m.sum()) for m in masks]  # noqa: E731
    assert counts == MergeCounts(numel=4099, kept=total(k), kept_entered=total(agree), protected=total(p),
                                 protected_entered=total(a & pt for a, pt in zip(agree, p)),
                                 kept_entered_without_slack=total(plain),
                                 protected_entered_without_slack=total(a & pt for a, pt in zip(plain, p)),
                                 nonfinite=[0, 0, 0])
    assert counts.kept_entered[1] != counts.kept_entered_without_slack[1]     # the slack changed elections


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_in_place_equals_out_of_place(backend, make, size, dtype, method):
    base, experts = family(make, size, dtype)
    kwargs = dict(weights=[1.0, 0.5, 2.0], lam=0.7, method=method)
    if method == "ties":
        kwargs["keep"], kwargs["protect"] = selections(base, experts, [0.2, 0.3, 0.5], [0.1, 0.1, 0.0])
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
    kwargs = dict(method=method)
    if method == "ties":
        kwargs["keep"], kwargs["protect"] = selections(base, experts, [0.3, 0.3, 0.3], [0.2, 0.0, 0.0])
    poisoned = [e.clone() for e in experts]
    poisoned[0][10] = float("nan")
    poisoned[1][11] = float("inf")
    poisoned[2][12] = float("-inf")
    clean = [e.clone() for e in experts]
    for t, i in ((0, 10), (1, 11), (2, 12)):
        clean[t][i] = base[i]                                        # δ = 0 there: what "excluded" means
    got, counts = ties_merge(*on(backend, base, poisoned), **kwargs)
    want, want_counts = ties_merge(*on(backend, base, clean), **kwargs)
    torch.testing.assert_close(got, want, **EXACT)
    assert counts.nonfinite == [1, 1, 1]
    assert torch.isfinite(got.float()).all()
    if method == "ties":
        assert counts.kept_entered == want_counts.kept_entered


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
    assert counts.kept == counts.kept_entered == [4099] * 3 and counts.protected == [0] * 3


def test_output_dtype_follows_out(backend, make):
    base, experts = family(make, 4099, torch.bfloat16)
    out = torch.empty(4099, dtype=torch.float32, device=backend)
    got, _ = ties_merge(*on(backend, base, experts), method="task_arithmetic", out=out)
    want, _ = ties_merge_reference(base, experts, method="task_arithmetic", out=torch.empty(4099))
    assert got is out
    torch.testing.assert_close(got.cpu(), want, **EXACT)


def test_deterministic(backend, make):
    base, experts = family(make, 4099, torch.float16)
    keep, protect = selections(base, experts, [0.2, 0.3, 0.5], [0.1, 0.1, 0.1])
    first, _ = ties_merge(*on(backend, base, experts), keep=keep, protect=protect)
    second, _ = ties_merge(*on(backend, base, experts), keep=keep, protect=protect)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


def test_the_counts_name_the_backend_that_ran(backend, make):
    base, experts = family(make, 4099, torch.bfloat16)
    _, counts = ties_merge(*on(backend, base, experts), method="task_arithmetic")
    if os.environ["WORKBENCH_KERNELS"] == "triton":
        assert counts.backend == "triton"
    elif os.environ["WORKBENCH_NATIVE"] == "1":
        assert counts.backend == "c"
        _, counts = ties_merge(base.half(), [e.half() for e in experts], method="task_arithmetic")
        assert counts.backend == "torch"                                       # C takes fp32 and bf16
    else:
        assert counts.backend == "torch"


def test_count_columns_follow_the_enum():
    assert [c.name for c in Count] == ["KEPT", "KEPT_ENTERED", "PROTECTED", "PROTECTED_ENTERED", "KEPT_ENTERED_PLAIN",
                                       "PROTECTED_ENTERED_PLAIN", "NONFINITE"]


def test_bad_arguments_are_refused():
    base, experts = torch.zeros(4), [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4)]
    keep = topk_select_reference(base, experts[0], [0.5, 0.25])
    with pytest.raises(ValueError, match="method"):
        ties_merge(base, experts, method="dare")
    with pytest.raises(ValueError, match="3 weights for 2 experts"):
        ties_merge(base, experts, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="slack <= density"):
        ties_merge(base, experts, keep=[keep[1], None], protect=[keep[0], None])
    with pytest.raises(ValueError, match="keep/protect apply to 'ties'"):
        ties_merge(base, experts, keep=[keep[0], None], method="task_arithmetic")
    with pytest.raises(ValueError, match="needs a base"):
        ties_merge(None, experts)
    with pytest.raises(ValueError, match="shape"):
        ties_merge(base, [torch.ones(5)])
    with pytest.raises(ValueError, match="consensus"):
        ties_merge(base, experts, consensus="max")


def test_scalar_and_empty_tensors(backend):
    from workbench.kernels.topk_threshold import TopK

    base, experts = torch.tensor(1.0), [torch.tensor(3.0), torch.tensor(0.0)]   # δ = 2 (kept), −1 (trimmed)
    out, counts = ties_merge(*on(backend, base, experts), keep=[TopK(2.0), TopK(2.0)], weights=[1.0, 1.0])
    assert out.shape == () and out.item() == 3.0 and counts.kept_entered == [1, 0]
    out, counts = ties_merge(*on(backend, torch.zeros(0, 5), [torch.zeros(0, 5)]))
    assert out.shape == (0, 5) and counts.kept == [0]
