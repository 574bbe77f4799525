"""The radix histogram passes of the exact top-k selection (topk_threshold.py; docs/design.md §5.3), one
per backend, and the count of elements equal to a threshold.

A pass histograms one digit of the key (the bits of |δ| = |θ_expert − θ_base| in fp32, non-finite as 0)
over the elements whose higher bits equal one of the given prefixes (all elements in the first pass).
- Triton: 8-bit digits. One program per segment of `segment_size(n)` elements builds its 256-bin
  histogram on chip (`tl.histogram`) and writes it once as a row: no global atomic per element. The
  rows come back per program, so the last pass also says how many elements of each segment equal τ.
- C (cpu_native.c): any digit; one histogram per thread-range, returned per range.
- PyTorch pieces: any digit; `torch.bincount` per piece, summed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import chunks
from .dispatch import FLT_MAX, LAUNCH_OPTIONS, flat_contiguous, jit, triton_kernels

if TYPE_CHECKING:
    import triton.language as tl

BLOCK = 1024                  # elements per Triton loop step
TRITON_DIGITS = ((24, 8), (16, 8), (8, 8), (0, 8))   # (shift, width), most significant first
CPU_DIGITS = ((16, 15), (0, 16))                     # high halves of finite non-negative floats are <= 0x7F7F
MAX_SEGMENT = 1 << 16         # elements per Triton program at most ...
TARGET_PROGRAMS = 1024        # ... and enough programs to fill a GPU on mid-sized tensors


def segment_size(n: int) -> int:
    """Elements per Triton program for a tensor of n elements: a power of two, BLOCK to MAX_SEGMENT."""
    s = BLOCK
    while s < MAX_SEGMENT and s * TARGET_PROGRAMS < n:
        s *= 2
    return s


# ----------------------------------------------------------------------------------------------- Triton

@jit
def _abs_delta_key(base_ptr, expert_ptr, offs, live):
    # |δ| in fp32 as int32 bits; non-finite → 0 (ranked as magnitude 0).
    b = tl.load(base_ptr + offs, mask=live, other=0.0).to(tl.float32)
    e = tl.load(expert_ptr + offs, mask=live, other=0.0).to(tl.float32)
    a = tl.abs(e - b)
    a = tl.where(a <= FLT_MAX, a, 0.0)
    return a.to(tl.int32, bitcast=True)


@jit
def _digit_histogram_kernel(base_ptr, expert_ptr, prefixes_ptr, rows_ptr, n, segment,
                            SHIFT: tl.constexpr, NUM_PREFIXES: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK: tl.constexpr):
    # One program per segment: a 256-bin histogram of the digit (key >> SHIFT) & 0xFF per prefix, built on
    # chip and written once to rows [programs, ROWS, 256] int32. With prefixes, an element counts in row k
    # only if its bits above the digit equal prefixes[k] (the digits chosen by the earlier passes).
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * segment
    end = tl.minimum(start + segment, n)
    row_ids = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, 256], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        live = offs < end
        key = _abs_delta_key(base_ptr, expert_ptr, offs, live)
        digit = (key >> SHIFT) & 0xFF
        if NUM_PREFIXES == 0:
            acc += tl.histogram(digit, 256, mask=live)[None, :]
        else:
            for k in tl.static_range(NUM_PREFIXES):
                hit = live & ((key >> (SHIFT + 8)) == tl.load(prefixes_ptr + k))
                acc += tl.where(row_ids[:, None] == k, tl.histogram(digit, 256, mask=hit)[None, :], 0)
    tl.store(rows_ptr + (pid * ROWS + row_ids[:, None]) * 256 + tl.arange(0, 256)[None, :], acc)


@jit
def _count_equal_kernel(base_ptr, expert_ptr, key_ptr, counts_ptr, n, segment, BLOCK: tl.constexpr):
    # counts[program] = elements of the program's segment whose key equals the key at key_ptr (τ's bits).
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * segment
    end = tl.minimum(start + segment, n)
    target = tl.load(key_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        live = offs < end
        acc += (live & (_abs_delta_key(base_ptr, expert_ptr, offs, live) == target)).to(tl.int32)
    tl.store(counts_ptr + pid, tl.sum(acc, axis=0))


def triton_pass(base, expert, shift, width, prefixes):
    """int32 [programs, max(1, len(prefixes)), 256] on the tensors' device."""
    assert width == 8
    kernels = triton_kernels(globals(), base.device)
    b, e = flat_contiguous(base), flat_contiguous(expert)
    n, seg = b.numel(), segment_size(b.numel())
    programs = -(-n // seg)
    rows = 1 << max(0, len(prefixes) - 1).bit_length()     # a power of two, at least 1
    out = torch.empty((programs, rows, 256), dtype=torch.int32, device=base.device)
    wanted = torch.tensor(list(prefixes) or [0], dtype=torch.int32, device=base.device)
    kernels._digit_histogram_kernel[(programs,)](b, e, wanted, out, n, seg, SHIFT=shift, NUM_PREFIXES=len(prefixes),
                                                 ROWS=rows, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return out[:, :max(1, len(prefixes))]


def triton_count_equal(base, expert, tau: float) -> torch.Tensor:
    kernels = triton_kernels(globals(), base.device)
    b, e = flat_contiguous(base), flat_contiguous(expert)
    n, seg = b.numel(), segment_size(b.numel())
    key = torch.tensor([tau], dtype=torch.float32, device=base.device).view(torch.int32)
    counts = torch.empty(-(-n // seg), dtype=torch.int32, device=base.device)
    kernels._count_equal_kernel[(counts.numel(),)](b, e, key, counts, n, seg, BLOCK=BLOCK, **LAUNCH_OPTIONS)
    return counts.to(torch.int64)


# ------------------------------------------------------------------------------------- PyTorch pieces

def abs_delta_key(b: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """|e − b| in fp32 with non-finite as 0, viewed as int32 bits (the ranking key), for one piece."""
    a = e.float().sub_(b.float()) if e.dtype != torch.float32 else e - b.float()
    a.abs_().nan_to_num_(nan=0.0, posinf=0.0)
    return a.view(torch.int32)


def torch_pass(base, expert, shift, width, prefixes):
    """int64 [1, max(1, len(prefixes)), 2**width]: the pieces' histograms, summed."""
    rows = torch.zeros((1, max(1, len(prefixes)), 1 << width), dtype=torch.int64)
    mask = (1 << width) - 1
    for index in chunks.pieces(base.shape):
        key = abs_delta_key(chunks.read(base, index), chunks.read(expert, index))
        digit = (key >> shift) & mask
        if not prefixes:
            rows[0, 0] += torch.bincount(digit, minlength=1 << width)
            continue
        high = key >> (shift + width)
        for k, prefix in enumerate(prefixes):
            rows[0, k] += torch.bincount(digit[high == prefix], minlength=1 << width)
    return rows


def torch_count_equal(base, expert, tau: float) -> int:
    target = int(torch.tensor(tau, dtype=torch.float32).view(torch.int32))
    return sum(int((abs_delta_key(chunks.read(base, i), chunks.read(expert, i)) == target).count_nonzero())
               for i in chunks.pieces(base.shape))
