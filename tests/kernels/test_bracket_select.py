"""The sampled bracket of the Triton backend's top-k selection (kernels/bracket_select.py): its one pass equals
its PyTorch pieces on awkward sizes and every dtype, and the selections it finds are the radix passes' and
torch.kthvalue's, bit for bit, also where the sample misses and the radix passes take over."""
import math

import pytest
import torch

from workbench.kernels import bracket_select, radix_passes
from workbench.kernels.topk_threshold import keep_count, topk_select, topk_select_multi, topk_select_reference

from .test_topk_threshold import kth_reference


@pytest.fixture
def triton_device(monkeypatch):
    from .conftest import TRITON_DEVICE, TRITON_IMPORT_ERROR
    from workbench.kernels.dispatch import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    if TRITON_IMPORT_ERROR:
        pytest.fail(TRITON_IMPORT_ERROR)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WORKBENCH_KERNELS", "triton")
    return TRITON_DEVICE


@pytest.fixture
def tight(monkeypatch):
    """A dense sample and a small buffer, so that a small tensor gets a bracket far narrower than itself."""
    monkeypatch.setattr(bracket_select, "SAMPLE_RATE", 8)
    monkeypatch.setattr(bracket_select, "MIN_CAPACITY", 64)


@pytest.fixture
def spy(monkeypatch):
    """Records what each bracket_select call returned (None: the radix passes ran)."""
    seen = []
    original = bracket_select.bracket_select

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(bracket_select, "bracket_select", recording)
    return seen


def _bounds(base, expert, device):
    """Two brackets from the tensor's own quantiles (one wide, one narrow), as int32 keys."""
    key = radix_passes.abs_delta_key(base.reshape(-1), expert.reshape(-1)).sort().values
    n = key.numel()
    picks = [(n // 4, (3 * n) // 4), (n // 2, n // 2)]
    return torch.tensor([[int(key[lo]), int(key[hi])] for lo, hi in picks], dtype=torch.int32, device=device)


def test_the_pass_equals_its_pytorch_pieces(triton_device, make, size, dtype):
    base = make.tensor(size, dtype)
    expert = make.expert(base)
    bounds = _bounds(base, expert, triton_device)
    results = []
    for run in (bracket_select.bracket_pass_triton, bracket_select.bracket_pass_torch):
        fill = torch.zeros(1, dtype=torch.int64, device=triton_device)
        cands = torch.full((base.numel() + 5,), -1, dtype=torch.int32, device=triton_device)
        counts = run(base.to(triton_device), expert.to(triton_device), bounds, fill, cands).sum(0)
        results.append((counts.tolist(), int(fill[0]), cands[:int(fill[0])].sort().values.tolist(),
                        cands[int(fill[0]):].tolist()))
    assert results[0] == results[1]
    key = radix_passes.abs_delta_key(base.reshape(-1), expert.reshape(-1))
    lo, hi = bounds.cpu()[:, 0], bounds.cpu()[:, 1]
    assert results[0][0] == [[int((key > h).sum()), int((key == h).sum()), int((key == l).sum())]
                             for l, h in zip(lo, hi)]
    inside = ((key[None] > lo[:, None]) & (key[None] < hi[:, None])).any(0)
    assert results[0][2] == key[inside].sort().values.tolist() and set(results[0][3]) <= {-1}


def test_a_full_buffer_is_counted_not_overrun(triton_device, make):
    base = make.tensor(4099, torch.float32)
    expert = make.expert(base)
    bounds = torch.tensor([[-1, bracket_select.KEY_MAX]], dtype=torch.int32, device=triton_device)  # every key
    for run in (bracket_select.bracket_pass_triton, bracket_select.bracket_pass_torch):
        fill = torch.zeros(1, dtype=torch.int64, device=triton_device)
        cands = torch.full((100 + 7,), -1, dtype=torch.int32, device=triton_device)
        run(base.to(triton_device), expert.to(triton_device), bounds, fill, cands[:100])
        assert int(fill[0]) == 4099 and (cands[100:] == -1).all()


@pytest.mark.parametrize("fractions", [[0.2, 0.1], [0.01, 0.9], [1.0, 1 / 3], [0.5]])
def test_the_bracket_finds_kthvalue(triton_device, tight, spy, make, dtype, fractions):
    base = make.tensor(20011, dtype)
    expert = make.expert(base)
    got = topk_select(base.to(triton_device), expert.to(triton_device), fractions)
    assert spy and spy[-1] is not None                          # the bracket answered, not the fallback
    assert got == topk_select_reference(base, expert, fractions)
    assert got == topk_select(base.to(triton_device), expert.to(triton_device), fractions, algorithm="radix")
    assert [s.tau for s in got] == kth_reference([(base, expert)], fractions)


def test_the_bracket_is_narrow(triton_device, tight, make, monkeypatch):
    """With the tight sample the buffer holds a small part of the tensor: the pass really narrows."""
    base = make.tensor(20011, torch.float32)
    expert = make.expert(base)
    sizes = []
    original = torch.Tensor.topk

    def recording(self, k, *args, **kwargs):
        sizes.append(self.numel())
        return original(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", recording)
    n, _, picks = bracket_select.bracket_select(lambda: [(base.to(triton_device), expert.to(triton_device))],
                                                lambda n: [keep_count(0.2, n)])
    assert n == 20011 and sizes and max(sizes) < n // 4
    key, above, ties, _ = picks[0]
    assert key == int(torch.tensor(kth_reference([(base, expert)], [0.2])[0]).view(torch.int32))


def test_runs_of_ties_are_counted_at_the_ends(triton_device, tight, spy, gen):
    """bf16-like deltas (three exact values): τ sits in a run the bracket counts rather than stores."""
    base = torch.zeros(20011)
    expert = torch.tensor([0.25, 0.5, 1.0])[torch.randint(0, 3, (20011,), generator=gen)]
    fractions = [0.5, 0.1]
    got = topk_select(base.to(triton_device), expert.to(triton_device), fractions)
    assert spy and spy[-1] is not None
    assert got == topk_select_reference(base, expert, fractions)
    assert [s.tau for s in got] == [0.5, 1.0] and all(s.partial for s in got)
    for sel in got:              # the pass counted τ per program: the merge needs no counting pass
        assert sel.segment == radix_passes.segment_size(20011) and int(sel.segment_ties.sum()) == sel.ties
        assert sel.segment_ties.tolist() == [int((expert[i:i + sel.segment] == sel.tau).sum())
                                            for i in range(0, 20011, sel.segment)]


@pytest.mark.parametrize("fractions", [[0.2, 0.1], [0.9]])
def test_nonfinite_deltas_rank_as_zero(triton_device, tight, spy, make, fractions):
    """A third of the deltas NaN or ±Inf (key 0, like an unchanged weight): the top fractions come from the
    finite ones; 0.9 reaches into the zeros, where τ = 0 and the run at lo answers."""
    base = make.tensor(20011, torch.float32)
    expert = make.expert(base)
    where = torch.randperm(20011, generator=make.gen)[:6670]
    expert[where[:3000]] = float("nan")
    expert[where[3000:5000]] = float("inf")
    base[where[5000:]] = float("-inf")
    got = topk_select(base.to(triton_device), expert.to(triton_device), fractions)
    assert spy and spy[-1] is not None
    assert got == topk_select_reference(base, expert, fractions)
    assert [s.tau for s in got] == kth_reference([(base, expert)], fractions)


def test_a_full_buffer_falls_back(triton_device, tight, spy, make, monkeypatch):
    monkeypatch.setattr(bracket_select, "MIN_CAPACITY", 1)
    monkeypatch.setattr(bracket_select, "CAPACITY_FACTOR", 0)     # room for one candidate
    base = make.tensor(20011, torch.float32)
    expert = make.expert(base)
    got = topk_select(base.to(triton_device), expert.to(triton_device), [0.3])
    assert spy == [None]
    assert got == topk_select_reference(base, expert, [0.3])


def test_a_misleading_sample_falls_back(triton_device, tight, spy, make):
    """Every sampled element (flat index j·K mod n) given a huge delta: the bracket misses, radix answers."""
    n = 20011
    base = make.tensor(n, torch.float32)
    expert = make.expert(base)
    count = -(-n // bracket_select.SAMPLE_RATE)
    index = (torch.arange(count, dtype=torch.int64) * bracket_select.SAMPLE_STRIDE) % n
    expert[index] += 100.0
    got = topk_select(base.to(triton_device), expert.to(triton_device), [0.2])
    assert spy == [None]
    assert got == topk_select_reference(base, expert, [0.2])


def test_model_scope_by_the_bracket(triton_device, tight, spy, gen):
    pairs = []
    for shape, dtype in [((3000,), torch.bfloat16), ((170, 23), torch.float32), ((1,), torch.float16),
                         ((0,), torch.float32), ((9000,), torch.bfloat16)]:
        base = torch.randn(shape, generator=gen).to(dtype)
        pairs.append((base, (base.float() + torch.randn(shape, generator=gen) * 0.01).to(dtype)))
    fractions = [0.2, 0.05]
    pools = topk_select_multi(lambda: ((b.to(triton_device), e.to(triton_device)) for b, e in pairs), fractions)
    assert spy and spy[0] is not None
    assert [p.whole.tau for p in pools] == kth_reference(pairs, fractions)
    radix = topk_select_multi(lambda: ((b.to(triton_device), e.to(triton_device)) for b, e in pairs), fractions,
                              algorithm="radix")
    assert [p.whole for p in pools] == [p.whole for p in radix] and [p.parts for p in pools] == [p.parts for p in radix]


def test_the_cpu_path_never_samples(cpu_backend, make, spy):
    base = make.tensor(4099, torch.float32)
    expert = make.expert(base)
    assert topk_select(base, expert, [0.2]) == topk_select_reference(base, expert, [0.2])
    assert spy == []


@pytest.mark.parametrize("m,n,samples", [(1, 10**6, 4000), (200, 1000, 1000), (10**6, 2 * 10**8, 781250),
                                         (10**8, 2 * 10**8, 781250), (999, 1000, 4)])
def test_the_ranks_bound_the_sample_rank(m, n, samples):
    r_hi, r_lo = bracket_select.bracket_ranks(m, n, samples)
    expected = m / n * samples
    spread = bracket_select.Z * math.sqrt(samples * (m / n) * (1 - m / n))
    assert r_hi < expected - spread and r_lo > expected + spread


def test_bad_algorithm_is_refused():
    with pytest.raises(ValueError, match="algorithm 'sort'"):
        topk_select(torch.zeros(3), torch.ones(3), [0.5], algorithm="sort")
