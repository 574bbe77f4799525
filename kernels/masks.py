"""Keep and slack masks packed 1 bit per element, for export (DESIGN §5; the trim of Yadav et al. 2023
and the slack band of Tao et al. 2024).

keep = |δ| ≥ τ_hi, slack = τ_lo ≤ |δ| < τ_hi (both false where δ is not finite), δ = expert − base in
fp32. Packed as uint8, ⌈n/8⌉ bytes, element 8j+i in bit i of byte j: numpy's
``packbits(bitorder="little")`` over the row-major flattening.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import chunks
from .dispatch import LAUNCH_OPTIONS, flat_contiguous, fp32_scalar, jit, kernel_backend, triton_kernels

if TYPE_CHECKING:
    import triton.language as tl

BLOCK = 256   # bytes per program (2048 elements)


@jit
def _masks_kernel(base_ptr, expert_ptr, keep_ptr, slack_ptr, n, nbytes, tau_hi, tau_lo,
                  BLOCK: tl.constexpr):
    # A [BLOCK, 8] tile = 8·BLOCK consecutive elements; row j becomes byte j.
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    offs = byte[:, None] * 8 + bit[None, :]
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(expert_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(e - b)
    ok = mask & (a <= 3.4028234663852886e38)
    keep = ok & (a >= tau_hi)
    slack = ok & (a >= tau_lo) & ~keep
    weights = (1 << bit)[None, :]
    keep_byte = tl.sum(tl.where(keep, weights, 0), axis=1)
    slack_byte = tl.sum(tl.where(slack, weights, 0), axis=1)
    tl.store(keep_ptr + byte, keep_byte.to(tl.uint8), mask=byte < nbytes)
    tl.store(slack_ptr + byte, slack_byte.to(tl.uint8), mask=byte < nbytes)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → uint8, 1 bit per element (little bit order), ⌈n/8⌉ bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 packed bits (little bit order) → the first `n` elements as a 1-D bool tensor."""
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-n // 8):
        raise ValueError(f"unpack_bits: expected {-(-n // 8)} uint8 bytes for n={n}, got "
                         f"{tuple(bits.shape)} {bits.dtype}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)[:n]


def _masks_triton(base, expert, hi, lo):
    kernels = triton_kernels(globals(), base.device)
    n = base.numel()
    nbytes = -(-n // 8)
    keep = torch.empty(nbytes, dtype=torch.uint8, device=base.device)
    slack = torch.empty(nbytes, dtype=torch.uint8, device=base.device)
    if nbytes:
        kernels._masks_kernel[(-(-nbytes // BLOCK),)](flat_contiguous(base), flat_contiguous(expert), keep, slack,
                                                      n, nbytes, hi, lo, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return keep, slack


def _masks_cpu(base, expert, hi, lo):
    nbytes = -(-base.numel() // 8)
    out = [torch.empty(nbytes, dtype=torch.uint8, device=base.device) for _ in range(2)]
    carry = [torch.zeros(0, dtype=torch.bool, device=base.device) for _ in range(2)]
    pos = 0
    for index in chunks.pieces(base.shape):
        a = (chunks.read(expert, index).float() - chunks.read(base, index).float()).abs_()
        ok = a <= 3.4028234663852886e38
        keep = (a >= hi) & ok
        slack = (a >= lo) & ok & ~keep
        # Pieces need not be multiples of 8 elements: carry the tail bits into the next piece.
        full = None
        for j, m in enumerate((keep, slack)):
            m = torch.cat([carry[j], m]) if carry[j].numel() else m
            full = m.numel() // 8 * 8
            out[j][pos:pos + full // 8] = pack_bits(m[:full])
            carry[j] = m[full:]
        pos += full // 8
    for j in range(2):
        if carry[j].numel():
            out[j][pos] = pack_bits(carry[j])[0]
    return out[0], out[1]


def topk_masks_reference(base, expert, tau_hi: float, tau_lo: float | None = None):
    """The masks on materialized |δ|, packed with numpy's packbits."""
    import numpy as np

    hi = fp32_scalar(tau_hi)
    lo = hi if tau_lo is None else fp32_scalar(tau_lo)
    d = (expert.float() - base.float()).reshape(-1)
    ok = torch.isfinite(d)
    keep = ok & (d.abs() >= hi)
    slack = ok & (d.abs() >= lo) & (d.abs() < hi)
    return tuple(torch.from_numpy(np.packbits(m.numpy(), bitorder="little")) for m in (keep, slack))


def topk_masks(base: torch.Tensor, expert: torch.Tensor, tau_hi: float,
               tau_lo: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, slack) masks of |expert − base| against τ_hi and τ_lo, packed 1 bit per element."""
    if base.shape != expert.shape:
        raise ValueError(f"topk_masks: base shape {tuple(base.shape)} != expert shape {tuple(expert.shape)}")
    if tau_lo is not None and tau_lo > tau_hi:
        raise ValueError(f"topk_masks: tau_lo {tau_lo} > tau_hi {tau_hi}")
    backend = kernel_backend(base)
    if backend == "reference":
        return topk_masks_reference(base.cpu(), expert.cpu(), tau_hi, tau_lo)
    hi = fp32_scalar(tau_hi)
    lo = hi if tau_lo is None else fp32_scalar(tau_lo)
    return (_masks_triton if backend == "triton" else _masks_cpu)(base, expert, hi, lo)
