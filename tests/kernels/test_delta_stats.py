"""delta_stats: one fused pass giving Σ|δ|, Σδ², max|δ|, n, ‖δ‖/‖θ_b‖ and the non-finite count."""
import math

import pytest
import torch

from workbench.kernels.delta_stats import DeltaStats, delta_stats
from workbench.kernels.delta_stats import PACK_LIMIT, delta_stats_reference

# Relative tolerance of the sums against the float64 reference, per input dtype. δ is exact in fp32
# for every storage dtype; the error is fp32 accumulation (per block or per piece), the same for all.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def assert_stats_close(actual: DeltaStats, expected: DeltaStats, rtol: float):
    assert actual.numel == expected.numel
    assert actual.nonfinite == expected.nonfinite
    assert actual.max_abs == expected.max_abs                      # a max is exact
    for field in ("sum_abs", "sum_sq", "base_sum_sq"):
        assert getattr(actual, field) == pytest.approx(getattr(expected, field), rel=rtol, abs=1e-30), field
    assert actual.rel_change == pytest.approx(expected.rel_change, rel=rtol)


def test_matches_reference(backend, make, size, dtype):
    base = make.tensor(size, dtype)
    expert = make.expert(base)
    [got] = delta_stats([(base.to(backend), expert.to(backend))])
    [want] = delta_stats_reference([(base, expert)])
    assert_stats_close(got, want, RTOL[dtype])


def test_large_tensor_on_cpu_path(cpu_backend, make, dtype):
    base = make.tensor(1000003, dtype)
    expert = make.expert(base)
    [got] = delta_stats([(base, expert)])
    [want] = delta_stats_reference([(base, expert)])
    assert_stats_close(got, want, RTOL[dtype])


def test_batched_pairs_of_mixed_sizes_and_dtypes(backend, gen, make):
    # Small tensors share a launch, a large one (>= PACK_LIMIT) has its own, an empty one gives zeros. The
    # large ones: of 16·k elements (the Triton kernel is told its tiles are aligned) and not.
    shapes = [(3,), (64, 5), (1,), (0,), (PACK_LIMIT + 123,), (17, 3), (2, 2, 2), (PACK_LIMIT + 16 * 7,)]
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float16,
              torch.float32, torch.bfloat16]
    pairs = []
    for shape, dtype in zip(shapes, dtypes):
        base = torch.randn(shape, generator=gen).to(dtype)
        pairs.append((base, make.expert(base, scale=0.1)))
    pairs.append((pairs[0][0].float(), pairs[0][1]))             # mixed dtypes within a pair
    got = delta_stats([(b.to(backend), e.to(backend)) for b, e in pairs])
    want = delta_stats_reference(pairs)
    assert len(got) == len(pairs)
    for g, w in zip(got, want):
        assert_stats_close(g, w, 1e-5)
    assert got[3] == DeltaStats(0, 0.0, 0.0, 0.0, 0.0, 0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter: inf − inf
def test_nonfinite_counted_and_excluded(backend, make):
    base = make.tensor(4099, torch.float32)
    expert = make.expert(base)
    expert[5] = float("nan")
    expert[6] = float("inf")
    base[7] = float("-inf")
    base[8] = expert[8] = float("inf")                           # inf − inf = nan
    [got] = delta_stats([(base.to(backend), expert.to(backend))])
    assert got.nonfinite == 4
    finite = torch.ones(4099, dtype=torch.bool)
    finite[5:9] = False
    [clean] = delta_stats_reference([(base[finite], expert[finite])])
    assert_stats_close(got, DeltaStats(4099, clean.sum_abs, clean.sum_sq, clean.max_abs, clean.base_sum_sq, 4),
                       1e-5)


def test_rel_change_edge_cases():
    assert DeltaStats(4, 0.0, 0.0, 0.0, 0.0, 0).rel_change == 0.0
    assert DeltaStats(4, 1.0, 1.0, 1.0, 0.0, 0).rel_change == math.inf
    assert DeltaStats(4, 2.0, 4.0, 1.0, 16.0, 0).rel_change == 0.5
    assert DeltaStats(4, 2.0, 4.0, 1.0, 16.0, 2).mean_abs == 1.0


def test_shape_mismatch_names_the_pair():
    with pytest.raises(ValueError, match="pair 1"):
        delta_stats([(torch.zeros(3), torch.zeros(3)), (torch.zeros(3), torch.zeros(4))])
