"""topk_masks / pack_bits / unpack_bits: keep and protect masks (the merge's exact selections) packed 1 bit
per element (little bit order)."""
import numpy as np
import pytest
import torch

from workbench.kernels.masks import pack_bits, topk_masks, unpack_bits
from workbench.kernels.masks import topk_masks_reference
from workbench.kernels.topk_threshold import TopK, topk_select, topk_select_reference

# Tolerance: none (masks are exact for every dtype: the same fp32 |δ|, the same τ, the same tie order).


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 4099, 100003])
def test_pack_unpack_round_trip_matches_numpy(gen, n):
    mask = torch.rand(n, generator=gen) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(unpack_bits(packed, n), mask)


def test_bit_layout():
    mask = torch.zeros(11, dtype=torch.bool)
    mask[0] = mask[9] = mask[10] = True
    assert pack_bits(mask).tolist() == [0b00000001, 0b00000110]     # element 8j+i is bit i of byte j


def test_matches_reference(backend, make, size, dtype):
    base = make.tensor(size, dtype)
    expert = make.expert(base)
    keep, protect = topk_select_reference(base, expert, [0.5, 0.2])
    got = topk_masks(base.to(backend), expert.to(backend), keep, protect)
    want = topk_masks_reference(base, expert, keep, protect)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    n = base.numel()
    a = (expert.float() - base.float()).abs().reshape(-1)           # row-major, also for the 2-D view
    for bits, sel in zip(got, (keep, protect)):
        member = unpack_bits(bits.cpu(), n)
        assert int(member.sum()) == sel.count and bool((a[member] >= sel.tau).all())


def test_the_masks_are_the_merges_selection_with_ties(backend, gen):
    # Deltas from a few values: both selections keep only some of their ties, the first ones in flat order.
    values = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.5])
    base = torch.randn(4099, generator=gen).bfloat16()
    expert = (base.float() + values[torch.randint(5, (4099,), generator=gen)]).bfloat16()
    # The selection on the backend under test (on a GPU machine, Triton takes CUDA tensors only).
    keep, protect = topk_select(base.to(backend), expert.to(backend), [0.5, 0.2])
    assert keep.partial and protect.partial
    got = topk_masks(base.to(backend), expert.to(backend), keep, protect)
    want = topk_masks_reference(base, expert, keep, protect)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
    assert int(unpack_bits(got[0].cpu(), 4099).sum()) == keep.count
    assert int(unpack_bits(got[1].cpu(), 4099).sum()) == protect.count


def test_large_tensor_on_cpu_path(cpu_backend, make):
    base = make.tensor(1000003, torch.bfloat16)
    expert = make.expert(base)
    keep, protect = topk_select(base, expert, [0.3, 0.1])
    got = topk_masks(base, expert, keep, protect)
    want = topk_masks_reference(base, expert, keep, protect)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter: inf − inf
def test_no_protection_and_nonfinite(backend, make):
    base = make.tensor(1001, torch.float32)
    expert = make.expert(base)
    expert[3] = float("nan")
    base[4] = float("inf")
    keep, protect = topk_masks(base.to(backend), expert.to(backend), TopK(0.0))      # every finite element
    expected = torch.ones(1001, dtype=torch.bool)
    expected[3:5] = False
    assert torch.equal(unpack_bits(keep.cpu(), 1001), expected)
    assert not unpack_bits(protect.cpu(), 1001).any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="reaches below"):
        topk_masks(torch.zeros(3), torch.ones(3), TopK(0.1), TopK(0.05))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 30)
