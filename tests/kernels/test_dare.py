"""dare_: drop each δ element with probability p, rescale the rest by 1/(1 − p) (Yu et al. 2024)."""
import math

import pytest
import torch

from workbench.kernels.dare import dare_
from workbench.kernels.dare import dare_keep_mask, dare_reference

# Tolerance against the reference: zero for every dtype (the same hash, the same fp32 operations).


def test_same_seed_same_result_on_every_backend(backend, make, size, dtype):
    base = make.tensor(size, dtype)
    expert = make.expert(base, scale=0.1)
    want = dare_reference(expert.clone(), base, 0.3, seed=20240607)
    flat = expert.reshape(-1).clone()
    mine = expert.to(backend)                                        # on CPU: expert itself
    assert dare_(mine, base.to(backend), 0.3, seed=20240607) is mine
    torch.testing.assert_close(mine.cpu(), want, rtol=0, atol=0)
    # The mask is the hash of the row-major index: the same for a view and for its contiguous copy.
    flat = flat.to(backend)
    dare_(flat, base.reshape(-1).to(backend), 0.3, seed=20240607)
    torch.testing.assert_close(flat.cpu(), want.reshape(-1), rtol=0, atol=0)


def test_drop_rate_and_rescale(cpu_backend, make):
    n, p = 1000003, 0.9
    base = make.tensor(n, torch.float32)
    delta = make.tensor(n, torch.float32).abs() + 0.5               # never 0: a drop is visible
    expert = base + delta
    delta = expert - base                                            # δ as dare_ computes it
    dare_(expert, base, p, seed=7)
    dropped = expert == base
    rate = dropped.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)           # within 5 standard deviations
    assert torch.equal(dropped, ~dare_keep_mask(0, n, seed=7, p=p))
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    survivors = ~dropped
    assert torch.equal(expert[survivors], base[survivors] + delta[survivors] * scale)


def test_seeds_give_independent_masks():
    a, b = dare_keep_mask(0, 100000, seed=1, p=0.5), dare_keep_mask(0, 100000, seed=2, p=0.5)
    agreement = (a == b).double().mean().item()
    assert abs(agreement - 0.5) < 0.01
    assert torch.equal(dare_keep_mask(40000, 100, seed=1, p=0.5), a[40000:40100])   # position-only


def test_p_zero_does_not_write(backend, make):
    base = make.tensor(4099, torch.bfloat16).to(backend)
    expert = base + 1
    version = expert._version
    dare_(expert, base, 0.0, seed=3)
    assert expert._version == version


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="outside"):
        dare_(torch.zeros(3), torch.zeros(3), 1.0, seed=0)
    with pytest.raises(ValueError, match="shape"):
        dare_(torch.zeros(3), torch.zeros(4), 0.5, seed=0)


@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_dare_ties_merge_equals_dare_then_ties_references(backend, make, size, dtype, consensus):
    # One fused pass on the C kernels (drop on the fly), dare_ then ties_merge elsewhere: the bits of the
    # references applied in that order.
    from workbench.kernels.dare import dare_ties_merge
    from workbench.kernels.dare import KEEP_NONZERO
    from workbench.kernels.ties import ties_merge_reference

    base = make.tensor(size, dtype)
    experts = [make.expert(base, scale=0.02 * (1 + t)) for t in range(3)]
    drops, seeds, weights = [0.7, 0.0, 0.5], [11, 12, 2**31 - 1], [1.0, 0.6, 1.4]
    dev = [base.to(backend)] + [e.to(backend).clone() for e in experts]  # (dare_ may drop in place)
    got, counts = dare_ties_merge(dev[0], dev[1:], drops, seeds, weights=weights, lam=0.9, consensus=consensus)
    dropped = [dare_reference(e.clone(), base, p, s) for e, p, s in zip(experts, drops, seeds)]
    want, want_counts = ties_merge_reference(base, dropped, weights=weights, keep=[KEEP_NONZERO] * 3, lam=0.9,
                                             consensus=consensus)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(got.cpu().contiguous().view(bits), want.contiguous().view(bits))
    assert counts == want_counts
