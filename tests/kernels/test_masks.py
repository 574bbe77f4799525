"""topk_masks / pack_bits / unpack_bits: keep and slack masks packed 1 bit per element (little bit order)."""
import numpy as np
import pytest
import torch

from workbench.kernels.masks import pack_bits, topk_masks, unpack_bits
from workbench.kernels.topk_threshold import topk_thresholds
from workbench.kernels.masks import topk_masks_reference
from workbench.kernels.topk_threshold import topk_thresholds_reference

# Tolerance: none (masks are exact for every dtype: the same fp32 |δ| compared with the same fp32 τ).


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
    tau_hi, tau_lo = topk_thresholds_reference(base, expert, [0.2, 0.5])
    keep, slack = topk_masks(base.to(backend), expert.to(backend), tau_hi, tau_lo)
    want_keep, want_slack = topk_masks_reference(base, expert, tau_hi, tau_lo)
    assert torch.equal(keep.cpu(), want_keep) and torch.equal(slack.cpu(), want_slack)
    n = base.numel()
    a = (expert.float() - base.float()).abs().reshape(-1)           # row-major, also for the 2-D view
    assert torch.equal(unpack_bits(keep.cpu(), n), a >= tau_hi)
    assert torch.equal(unpack_bits(slack.cpu(), n), (a >= tau_lo) & (a < tau_hi))


def test_large_tensor_on_cpu_path(cpu_backend, make):
    base = make.tensor(1000003, torch.bfloat16)
    expert = make.expert(base)
    tau_hi, tau_lo = topk_thresholds(base, expert, [0.1, 0.3])
    got = topk_masks(base, expert, tau_hi, tau_lo)
    want = topk_masks_reference(base, expert, tau_hi, tau_lo)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter: inf − inf
def test_no_slack_and_nonfinite(backend, make):
    base = make.tensor(1001, torch.float32)
    expert = make.expert(base)
    expert[3] = float("nan")
    base[4] = float("inf")
    keep, slack = topk_masks(base.to(backend), expert.to(backend), 0.0)       # τ = 0: keep all finite
    expected = torch.ones(1001, dtype=torch.bool)
    expected[3:5] = False
    assert torch.equal(unpack_bits(keep.cpu(), 1001), expected)
    assert not unpack_bits(slack.cpu(), 1001).any()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="tau_lo"):
        topk_masks(torch.zeros(3), torch.ones(3), 0.1, 0.2)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 30)
