"""Row-major pieces of about CHUNK elements, the unit of work of the CPU path.

The PyTorch pieces never build a whole-tensor temporary: each operation walks its inputs piece by piece,
so fp32 temporaries stay cache-sized (docs/benchmarks.md records how the piece size was chosen). Pieces
are cut from the shape alone, so tensors of one shape are cut identically whatever their strides; a piece
of a contiguous tensor is a view, a piece of a non-contiguous tensor is a small copy.
"""
from __future__ import annotations

from typing import Iterator

import torch

CHUNK = 1 << 17


def pieces(shape: torch.Size | tuple[int, ...], chunk: int = CHUNK) -> Iterator[tuple]:
    """Indices (for ``t[index]``) of consecutive row-major pieces of about `chunk` elements covering `shape`."""
    shape = tuple(shape)
    if len(shape) == 0:
        yield ()
        return
    if 0 in shape:
        return
    yield from _pieces(shape, chunk, ())


def _pieces(shape: tuple[int, ...], chunk: int, prefix: tuple) -> Iterator[tuple]:
    row = 1
    for s in shape[1:]:
        row *= s
    if row <= chunk:
        step = max(1, chunk // row)
        for i in range(0, shape[0], step):
            yield prefix + (slice(i, min(i + step, shape[0])),)
    else:
        for i in range(shape[0]):
            yield from _pieces(shape[1:], chunk, prefix + (i,))


def read(t: torch.Tensor, index: tuple) -> torch.Tensor:
    """The piece of `t` at `index` as a 1-D contiguous tensor (a view when `t` is contiguous)."""
    return t[index].reshape(-1)


def write(t: torch.Tensor, index: tuple, values: torch.Tensor) -> None:
    """Store 1-D `values` (any float dtype) into the piece of `t` at `index`, rounding to `t`'s dtype."""
    target = t[index]
    target.copy_(values.view(target.shape))

