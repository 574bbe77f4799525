"""fp32 → storage dtype in Triton kernels, rounded to nearest even on every backend.

Compiled Triton rounds fp32 → bf16 to nearest even, but Triton's interpreter truncates; the bits are
rounded here by hand with PyTorch's formula (add 0x7FFF plus the lowest kept bit, keep the high half;
NaN stays a quiet NaN) so that the interpreter, the GPU and PyTorch write the same bits. fp16 and fp32
use the ordinary conversion, which rounds to nearest even everywhere.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .dispatch import jit

if TYPE_CHECKING:
    import triton.language as tl


@jit
def store_rounded(out_ptr, offs, x, mask):
    """Store fp32 `x` at `out_ptr + offs` (where `mask`) in the pointer's dtype."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)
