"""topk_select: the exact top-m of |δ| (m = max(1, ⌊f·n⌋)): τ bit-equal to torch.kthvalue on the materialized
|δ|, the ties at τ counted, and the share of them the selection takes, on every backend."""
from dataclasses import replace

import pytest
import torch

from workbench.kernels import chunks, cpu_native, radix_passes
from workbench.kernels.topk_threshold import (ALL, TopK, keep_count, segment_quotas, topk_member_reference,
                                              topk_select, topk_select_multi, topk_select_reference,
                                              topk_thresholds)

# Tolerance: none, for every dtype. τ is an element of |δ| (fp32) and the counts are integers.
FRACTIONS = [0.01, 0.1, 0.2, 1 / 3, 0.5, 0.9, 1.0]


def kth_reference(pairs, fractions):
    """What the contract says, written out: kthvalue over all the magnitudes, non-finite as 0."""
    a = torch.cat([(e.float() - b.float()).abs().reshape(-1) for b, e in pairs])
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
    n = a.numel()
    return [0.0 if f == 1.0 else torch.kthvalue(a, n - keep_count(f, n) + 1).values.item() for f in fractions]


def heavy_ties(gen, n, dtype=torch.bfloat16):
    """δ drawn from a few values: every threshold sits inside a long run of equal magnitudes."""
    values = torch.tensor([0.0, 0.5, -0.5, 0.25, -0.25, 1.0])
    base = torch.randn(n, generator=gen).to(dtype)
    return base, (base.float() + values[torch.randint(0, 6, (n,), generator=gen)]).to(dtype)


def test_equals_kthvalue_and_counts_the_ties(backend, make, size, dtype):
    base = make.tensor(size, dtype)
    expert = make.expert(base)
    got = topk_select(base.to(backend), expert.to(backend), FRACTIONS)
    assert [s.tau for s in got] == kth_reference([(base, expert)], FRACTIONS)
    assert got == topk_select_reference(base, expert, FRACTIONS)


def test_large_tensor_on_cpu_path(cpu_backend, make, dtype):
    base = make.tensor(1000003, dtype)
    expert = make.expert(base)
    assert topk_select(base, expert, FRACTIONS) == topk_select_reference(base, expert, FRACTIONS)


def test_exactly_m_kept_with_heavy_ties(backend, gen):
    base, expert = heavy_ties(gen, 4099)
    got = topk_select(base.to(backend), expert.to(backend), FRACTIONS)
    assert got == topk_select_reference(base, expert, FRACTIONS)
    a = (expert.float() - base.float()).abs()
    for f, sel in zip(FRACTIONS[:-1], got):
        m = keep_count(f, 4099)
        above, ties = int((a > sel.tau).sum()), int((a == sel.tau).sum())
        assert sel.count == m and sel.ties == ties and above + sel.take == m   # exactly m, ties fill the rest
        assert 0 < sel.take <= ties
        member = topk_member_reference(a, torch.ones(4099, dtype=torch.bool), sel)
        assert int(member.sum()) == m
        first_ties = (a == sel.tau).nonzero().flatten()[:sel.take]             # the first ties in flat order
        assert member[first_ties].all() and int(member[a == sel.tau].sum()) == sel.take


def test_keep_all_keeps_every_tie(backend, gen):
    base, expert = heavy_ties(gen, 4099)
    exact = topk_select(base.to(backend), expert.to(backend), [0.3])[0]
    keep_all = topk_select(base.to(backend), expert.to(backend), [0.3], ties="keep_all")[0]
    assert keep_all.tau == exact.tau and keep_all.take == ALL and not keep_all.partial and exact.partial


def test_edge_cases(backend, gen):
    base = torch.randn(100, generator=gen)
    expert = base + torch.randn(100, generator=gen)
    dev = backend
    # All-zero deltas: τ = 0, the first m zeros.
    zero = topk_select(base.to(dev), base.clone().to(dev), [0.1, 0.5, 1.0])
    assert [s.tau for s in zero] == [0.0, 0.0, 0.0] and [s.take for s in zero[:2]] == [10, 50]
    # n = 1: the only element, for every fraction < 1.
    one_b, one_e = torch.tensor([1.5]), torch.tensor([-0.75])
    assert topk_thresholds(one_b.to(dev), one_e.to(dev), [0.01, 0.99, 1.0]) == [2.25, 2.25, 0.0]
    assert topk_select(base.to(dev), expert.to(dev), [1.0])[0] == TopK(0.0, count=100)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter: inf − inf
def test_nonfinite_ranks_as_zero(backend, make):
    base = make.tensor(4099, torch.float32)
    expert = make.expert(base, scale=1.0)
    expert[:40] = float("nan")
    base[40:80] = float("inf")
    got = topk_select(base.to(backend), expert.to(backend), FRACTIONS + [0.995])
    assert got == topk_select_reference(base, expert, FRACTIONS + [0.995])
    assert got[-1].tau == 0.0                                        # the non-finite elements sit at 0


def test_model_scope_shares_the_ties_in_pool_order(backend, gen, make):
    pairs = []
    for shape, dtype in [((300,), torch.bfloat16), ((17, 23), torch.float32), ((1,), torch.float16),
                         ((0,), torch.float32), ((2000,), torch.bfloat16)]:
        base = torch.randn(shape, generator=gen).to(dtype)
        expert = (base.float() + torch.randint(-2, 3, shape, generator=gen) * 0.25).to(dtype)
        pairs.append((base, expert))
    calls = []

    def make_pairs():
        calls.append(1)
        for b, e in pairs:                                           # one tensor at a time
            yield b.to(backend), e.to(backend)

    pools = topk_select_multi(make_pairs, FRACTIONS)
    assert [p.whole.tau for p in pools] == kth_reference(pairs, FRACTIONS)
    for f, pool in zip(FRACTIONS[:-1], pools):
        a = [torch.nan_to_num((e.float() - b.float()).abs().reshape(-1)) for b, e in pairs]
        kept = sum(int(topk_member_reference(x, torch.ones_like(x, dtype=torch.bool), part).sum())
                   for x, part in zip(a, pool.parts))
        assert kept == keep_count(f, sum(x.numel() for x in a))     # exactly m over the whole pool
        ties = [int((x == pool.whole.tau).sum()) for x in a]
        takes = [min(part.take, t) for part, t in zip(pool.parts, ties)]
        left, expected = pool.whole.take, []
        for t in ties:                                               # earlier tensors' ties go first
            expected.append(min(left, t))
            left -= expected[-1]
        assert takes == expected and sum(takes) == pool.whole.take
    assert len(calls) <= 5                                           # CPU: 2 radix passes + 1 count, at most


def test_model_scope_reference_agrees(gen, monkeypatch):
    pairs = [heavy_ties(gen, 1000), heavy_ties(gen, 3001, torch.float32)]
    got = topk_select_multi(lambda: iter(pairs), [0.2, 0.5])
    monkeypatch.setenv("WORKBENCH_KERNELS", "reference")
    assert topk_select_multi(lambda: iter(pairs), [0.2, 0.5]) == got


@pytest.mark.parametrize("pieces", [1000, 4096, 1 << 17])
def test_segment_quotas_hand_out_exactly_the_ties_taken(cpu_backend, gen, monkeypatch, pieces):
    # The C ranges (one per thread) or the PyTorch pieces: the quotas add up to the selection's take.
    monkeypatch.setattr(chunks, "CHUNK", pieces)
    monkeypatch.setattr(cpu_native, "MIN_SPLIT", 1000)
    base, expert = heavy_ties(gen, 70001)
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        sel = topk_select(base, expert, [0.3])[0]
        assert sel == topk_select_reference(base, expert, [0.3])[0] and sel.partial
        if cpu_native.takes(base, expert):
            assert sel.segment == cpu_native.segment(70001) and len(sel.segment_ties) == threads
            quotas = segment_quotas(sel, base, expert, "c", sel.segment)
            assert sum(min(q, t) for q, t in zip(quotas, sel.segment_ties)) == sel.take
            assert quotas == segment_quotas(replace(sel, segment=0), base, expert, "c", sel.segment)  # counted


def test_cpu_path_never_sorts(cpu_backend, make, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the selection must not sort")

    base = make.tensor(50000, torch.bfloat16)
    expert = make.expert(base)
    want = topk_select_reference(base, expert, FRACTIONS)
    for name in ("sort", "argsort", "topk", "kthvalue", "msort", "quantile"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden, raising=False)
    assert topk_select(base, expert, FRACTIONS) == want


def test_keep_count_is_mergekits_count():
    assert keep_count(0.2, 100) == 20                 # 0.2·100 = 20.000000000000004 in binary
    assert keep_count(0.7, 10) == 7                   # 7.000000000000001
    assert keep_count(0.29, 100) == 28                # 28.999999999999996: int() as mergekit has it
    assert keep_count(0.25, 10) == 2                  # the floor
    assert keep_count(1e-9, 10) == 1                  # at least one element
    assert keep_count(1.0, 7) == 7
    for n in (1, 7, 4099, 271_000_003):
        for f in (0.1, 0.2, 0.3, 0.29, 0.7):
            assert keep_count(f, n) == max(1, int(f * n))


def test_segment_size_is_a_power_of_two_between_block_and_max():
    for n in (1, 1024, 5000, 16_000_000, 200_000_000):
        s = radix_passes.segment_size(n)
        assert s & (s - 1) == 0 and radix_passes.BLOCK <= s <= radix_passes.MAX_SEGMENT


def test_bad_arguments_are_refused():
    for f in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            topk_select(torch.zeros(3), torch.ones(3), [f])
    with pytest.raises(ValueError, match="ties 'some'"):
        topk_select(torch.zeros(3), torch.ones(3), [0.5], ties="some")
