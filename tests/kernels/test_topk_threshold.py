"""topk_thresholds: τ(f) = the ⌈f·n⌉-th largest |δ|, bit-equal to torch.kthvalue on the materialized |δ|."""
import pytest
import torch

from workbench.kernels.topk_threshold import keep_count, topk_thresholds, topk_thresholds_multi

# Tolerance: none, for every dtype. The threshold is an element of |δ| (fp32), so it is exact or wrong.
FRACTIONS = [0.01, 0.1, 0.2, 1 / 3, 0.5, 0.9, 1.0]


def kth_reference(pairs, fractions):
    """What the contract says, written out: kthvalue over all the magnitudes, non-finite as 0."""
    a = torch.cat([(e.float() - b.float()).abs().reshape(-1) for b, e in pairs])
    a = torch.nan_to_num(a, nan=0.0, posinf=0.0)
    n = a.numel()
    out = []
    for f in fractions:
        out.append(0.0 if f == 1.0 else torch.kthvalue(a, n - keep_count(f, n) + 1).values.item())
    return out


def test_equals_kthvalue(backend, make, size, dtype):
    base = make.tensor(size, dtype)
    expert = make.expert(base)
    got = topk_thresholds(base.to(backend), expert.to(backend), FRACTIONS)
    assert got == kth_reference([(base, expert)], FRACTIONS)


def test_large_tensor_on_cpu_path(cpu_backend, make, dtype):
    base = make.tensor(1000003, dtype)
    expert = make.expert(base)
    assert topk_thresholds(base, expert, FRACTIONS) == kth_reference([(base, expert)], FRACTIONS)


def test_heavy_ties(backend, gen):
    # δ drawn from five values: every threshold sits inside a long run of equal magnitudes.
    values = torch.tensor([0.0, 0.5, -0.5, 0.25, 1.0])
    base = torch.randn(4099, generator=gen).to(torch.bfloat16).float()
    expert = base + values[torch.randint(0, 5, (4099,), generator=gen)]
    got = topk_thresholds(base.to(backend), expert.to(backend), FRACTIONS)
    assert got == kth_reference([(base, expert)], FRACTIONS)
    a = (expert - base).abs()
    for f, tau in zip(FRACTIONS, got):
        kept = int((a >= tau).sum())
        assert kept >= keep_count(f, 4099)                           # ties at τ are all kept ...
        assert int((a > tau).sum()) < keep_count(f, 4099)            # ... and only those


def test_edge_cases(backend, gen):
    base = torch.randn(100, generator=gen)
    expert = base + torch.randn(100, generator=gen)
    dev = backend
    # k + s = 1: τ_lo keeps everything.
    tau_hi, tau_lo = topk_thresholds(base.to(dev), expert.to(dev), [0.3, 0.3 + 0.7])
    assert tau_lo == 0.0 and tau_hi == kth_reference([(base, expert)], [0.3])[0]
    # All-zero deltas.
    assert topk_thresholds(base.to(dev), base.clone().to(dev), [0.1, 0.5, 1.0]) == [0.0, 0.0, 0.0]
    # n = 1: the only element, for every fraction < 1.
    one_b, one_e = torch.tensor([1.5]), torch.tensor([-0.75])
    assert topk_thresholds(one_b.to(dev), one_e.to(dev), [0.01, 0.99, 1.0]) == [2.25, 2.25, 0.0]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter: inf − inf
def test_nonfinite_ranks_as_zero(backend, make):
    base = make.tensor(4099, torch.float32)
    expert = make.expert(base, scale=1.0)
    expert[:40] = float("nan")
    base[40:80] = float("inf")
    got = topk_thresholds(base.to(backend), expert.to(backend), FRACTIONS)
    assert got == kth_reference([(base, expert)], FRACTIONS)


def test_model_scope_equals_kthvalue_of_the_concatenation(backend, gen, make):
    pairs = []
    for shape, dtype in [((300,), torch.bfloat16), ((17, 23), torch.float32), ((1,), torch.float16),
                         ((0,), torch.float32), ((2000,), torch.float16)]:
        base = torch.randn(shape, generator=gen).to(dtype)
        pairs.append((base, make.expert(base, scale=0.05 * (1 + len(pairs)))))
    calls = []

    def make_pairs():
        calls.append(1)
        for b, e in pairs:                                           # one tensor at a time
            yield b.to(backend), e.to(backend)

    got = topk_thresholds_multi(make_pairs, FRACTIONS)
    assert got == kth_reference(pairs, FRACTIONS)
    assert len(calls) <= 2                                           # two histogram passes at most


def test_cpu_path_never_sorts(cpu_backend, make, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the selection must not sort")

    base = make.tensor(50000, torch.bfloat16)
    expert = make.expert(base)
    want = kth_reference([(base, expert)], FRACTIONS)
    for name in ("sort", "argsort", "topk", "kthvalue", "msort", "quantile"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden, raising=False)
    assert topk_thresholds(base, expert, FRACTIONS) == want


def test_keep_count_is_a_tolerant_ceil():
    assert keep_count(0.2, 100) == 20                 # 0.2·100 = 20.000000000000004 in binary
    assert keep_count(0.7, 10) == 7                   # 0.7·10 = 7.000000000000001
    assert keep_count(0.1, 1000) == 100
    assert keep_count(float(torch.tensor(0.1, dtype=torch.float32)), 1000) == 100   # 100.0000015
    assert keep_count(0.25, 10) == 3                  # a real fraction still rounds up
    assert keep_count(0.201, 100) == 21
    assert keep_count(1e-9, 10) == 1                  # at least one element
    assert keep_count(1.0, 7) == 7


def test_fraction_outside_range_is_refused():
    for f in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            topk_thresholds(torch.zeros(3), torch.ones(3), [f])
