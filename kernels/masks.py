"""Keep and protect masks packed 1 bit per element, for export (docs/design.md §5; the trim of Yadav et al.
2023 and the protection of TIES-SV, Tao et al. 2024, §4.5).

keep = the exact top-k selection at density k, protect = the one at slack s (topk_threshold.TopK: every
|δ| above τ, ties at τ in flat order while the selection's quota lasts), both false where δ is not finite;
δ = expert − base in fp32. The same selection as the merge, so the masks show exactly what it kept. Packed
as uint8, ⌈n/8⌉ bytes, element 8j+i in bit i of byte j: numpy's ``packbits(bitorder="little")`` over the
row-major flattening.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import chunks
from .dispatch import FLT_MAX, LAUNCH_OPTIONS, flat_contiguous, fp32_scalar, jit, kernel_backend, triton_kernels
from .radix_passes import segment_size
from .topk_threshold import (NO_ELEMENTS, PieceSelection, TopK, segment_quotas, topk_member,
                             topk_member_reference)

if TYPE_CHECKING:
    import triton.language as tl

BLOCK = 1024   # elements per Triton loop step (a multiple of 8: whole bytes)


@jit
def _masks_kernel(base_ptr, expert_ptr, keep_ptr, protect_ptr, quotas_ptr, n, nbytes, segment, keep_tau,
                  protect_tau, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    # One program per segment (a multiple of 8 elements), BLOCK elements at a time; quotas: [programs, 2]
    # int64, the ties at τ the keep and the protect selections take in this segment.
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * segment
    end = tl.minimum(start + segment, n)
    keep_quota = tl.load(quotas_ptr + 2 * pid)
    protect_quota = tl.load(quotas_ptr + 2 * pid + 1)
    weights = (1 << tl.arange(0, 8))[None, :]
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        live = offs < end
        b = tl.load(base_ptr + offs, mask=live, other=0.0).to(tl.float32)
        e = tl.load(expert_ptr + offs, mask=live, other=0.0).to(tl.float32)
        a = tl.abs(e - b)
        ok = live & (a <= FLT_MAX)
        a = tl.where(ok, a, 0.0)
        keep, keep_quota = topk_member(a, ok, live, keep_tau, keep_quota, EXACT)
        protect, protect_quota = topk_member(a, ok, live, protect_tau, protect_quota, EXACT)
        byte = off // 8 + tl.arange(0, BLOCK // 8)
        keep_byte = tl.sum(tl.reshape(keep.to(tl.int32), [BLOCK // 8, 8]) * weights, axis=1)
        protect_byte = tl.sum(tl.reshape(protect.to(tl.int32), [BLOCK // 8, 8]) * weights, axis=1)
        tl.store(keep_ptr + byte, keep_byte.to(tl.uint8), mask=byte < nbytes)
        tl.store(protect_ptr + byte, protect_byte.to(tl.uint8), mask=byte < nbytes)


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


def _masks_triton(base, expert, keep: TopK, protect: TopK):
    kernels = triton_kernels(globals(), base.device)
    b, e = flat_contiguous(base), flat_contiguous(expert)
    n = b.numel()
    nbytes, seg = -(-n // 8), segment_size(n)
    programs = max(1, -(-n // seg))
    keep_bits = torch.empty(nbytes, dtype=torch.uint8, device=base.device)
    protect_bits = torch.empty(nbytes, dtype=torch.uint8, device=base.device)
    quotas = torch.stack([segment_quotas(keep, b, e, "triton", seg), segment_quotas(protect, b, e, "triton", seg)], 1)
    if n:
        kernels._masks_kernel[(programs,)](b, e, keep_bits, protect_bits, quotas.contiguous(), n, nbytes, seg,
                                           keep.tau, protect.tau, EXACT=keep.partial or protect.partial,
                                           BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return keep_bits, protect_bits


def _masks_torch(base, expert, keep: TopK, protect: TopK):
    nbytes = -(-base.numel() // 8)
    out = [torch.empty(nbytes, dtype=torch.uint8, device=base.device) for _ in range(2)]
    carry = [torch.zeros(0, dtype=torch.bool, device=base.device) for _ in range(2)]
    quotas = [PieceSelection(keep), PieceSelection(protect)]
    pos = 0
    for index in chunks.pieces(base.shape):
        a = (chunks.read(expert, index).float() - chunks.read(base, index).float()).abs_()
        ok = a <= FLT_MAX
        a = torch.where(ok, a, 0.0)
        # Pieces need not be multiples of 8 elements: carry the tail bits into the next piece.
        full = None
        for j, quota in enumerate(quotas):
            m = quota.member(a, ok)
            m = torch.cat([carry[j], m]) if carry[j].numel() else m
            full = m.numel() // 8 * 8
            out[j][pos:pos + full // 8] = pack_bits(m[:full])
            carry[j] = m[full:]
        pos += full // 8
    for j in range(2):
        if carry[j].numel():
            out[j][pos] = pack_bits(carry[j])[0]
    return out[0], out[1]


def topk_masks_reference(base, expert, keep: TopK, protect: TopK | None = None):
    """The masks on materialized |δ| (whole-tensor ranks of the ties), packed with numpy's packbits."""
    import numpy as np

    d = (expert.float() - base.float()).reshape(-1)
    ok = torch.isfinite(d)
    a = torch.where(ok, d.abs(), 0.0)
    masks = [topk_member_reference(a, ok, sel) for sel in (keep, protect or NO_ELEMENTS)]
    return tuple(torch.from_numpy(np.packbits(m.numpy(), bitorder="little")) for m in masks)


def topk_masks(base: torch.Tensor, expert: torch.Tensor, keep: TopK,
               protect: TopK | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, protect) masks of |expert − base| for the selections `keep` and `protect` (`topk_select`
    at density and slack; protect None: an empty mask), packed 1 bit per element."""
    if base.shape != expert.shape:
        raise ValueError(f"topk_masks: base shape {tuple(base.shape)} != expert shape {tuple(expert.shape)}")
    protect = NO_ELEMENTS if protect is None else protect
    if protect.tau < keep.tau:
        raise ValueError(f"topk_masks: the protection (tau {protect.tau}) reaches below the trim (tau {keep.tau})")
    keep = TopK(fp32_scalar(keep.tau), keep.take, keep.ties, keep.count, keep.segment, keep.segment_ties)
    protect = TopK(fp32_scalar(protect.tau), protect.take, protect.ties, protect.count, protect.segment,
                   protect.segment_ties)
    backend = kernel_backend(base, expert)
    if backend == "reference":
        return topk_masks_reference(base.cpu(), expert.cpu(), keep, protect)
    return (_masks_triton if backend == "triton" else _masks_torch)(base, expert, keep, protect)
