"""In-place weighted lerp for layer swapping (docs/design.md §4.6; Bandarkar et al., 2024, "Layer Swapping for
Zero-Shot Cross-Lingual Transfer in Large Language Models").

buf ← (1 − α)·buf + α·other, computed in fp32 as c0·buf + c1·other with c0 = fp32(1 − α) and c1 = fp32(α)
(two products, one sum, each rounded: the same bits on every backend), stored in buf's dtype. The swap
works on the resident task-expert tensor, so a swap never holds a second copy of the model.
α = 1 is a plain ``buf.copy_(other)`` (bitwise when the dtypes match; otherwise PyTorch's cast to buf's
dtype, round to nearest even); α = 0 returns buf without writing it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import chunks
from .dispatch import LAUNCH_OPTIONS, flat_contiguous, fp32_scalar, jit, kernel_backend, triton_kernels
from .rounding import store_rounded

if TYPE_CHECKING:
    import triton.language as tl

BLOCK = 1024


@jit
def _lerp_kernel(buf_ptr, other_ptr, n, c0, c1, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(other_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    store_rounded(buf_ptr, offs, x * c0 + y * c1, mask)


def _lerp_triton(buf, other, c0, c1):
    kernels = triton_kernels(globals(), buf.device)
    target = buf.view(-1) if buf.is_contiguous() else buf.contiguous().view(-1)
    n = target.numel()
    kernels._lerp_kernel[(-(-n // BLOCK),)](target, flat_contiguous(other), n, c0, c1, BLOCK=BLOCK,
                                            **LAUNCH_OPTIONS)
    if target.data_ptr() != buf.data_ptr() or not buf.is_contiguous():
        buf.copy_(target.view(buf.shape))


def _lerp_cpu(buf, other, c0, c1):
    for index in chunks.pieces(buf.shape):
        x = chunks.read(buf, index)
        y = chunks.read(other, index)
        if x.dtype == torch.float32 and buf.is_contiguous():
            x.mul_(c0).add_(y.float() * c1)      # a view of buf: done in place (add_ without alpha: no FMA)
        else:
            chunks.write(buf, index, x.float().mul_(c0).add_(y.float() * c1))


def lerp_reference(buf: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """The formula on materialized fp32 tensors, written back into buf."""
    if alpha == 0.0:
        return buf
    if alpha == 1.0:
        return buf.copy_(other)
    c0, c1 = fp32_scalar(1.0 - alpha), fp32_scalar(alpha)
    buf.copy_(buf.float() * c0 + other.float() * c1)
    return buf


def lerp_(buf: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place buf = (1 − α)·buf + α·other; α = 1 copies `other`, α = 0 leaves buf untouched."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"lerp_: alpha {alpha} is not finite")
    if buf.shape != other.shape:
        raise ValueError(f"lerp_: buf shape {tuple(buf.shape)} != other shape {tuple(other.shape)}")
    if alpha == 0.0 or buf.numel() == 0:
        return buf
    if alpha == 1.0:
        return buf.copy_(other)
    backend = kernel_backend(buf)
    if backend == "reference":
        return lerp_reference(buf, other, alpha)
    c0, c1 = fp32_scalar(1.0 - alpha), fp32_scalar(alpha)
    (_lerp_triton if backend == "triton" else _lerp_cpu)(buf, other, c0, c1)
    return buf
