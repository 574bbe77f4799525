"""A merge's input tensors onto its device, and its outputs back to the host (docs/design.md §6.2).

On CPU nothing moves: each input is a copy-on-write map of its file, and an output is already on the host.
On CUDA, by default, four things overlap while the GPU computes op i on the current stream:
- a reader thread reads op i + 1's inputs into pinned host memory and starts their uploads on a copy
  stream (`h2d`); the current stream waits for an event recorded after them before op i + 1 computes;
- op i's output goes back into pinned host memory on a second copy stream (`d2h`), after the compute
  stream's work so far; `to_host` hands back a `ready` that waits for that copy alone, and the writer
  thread calls it before writing, so the engine's loop is not held up by the download;
- the writer thread writes op i − 1 (engine `_WriteBehind`).
A device tensor used on a stream other than the one it was allocated on is recorded on it
(`record_stream`): the caching allocator then never hands its memory to a new tensor before that use ends.
Pinned host blocks come from PyTorch's caching host allocator, which keeps a block until the copies that
read or wrote it have finished.

`WORKBENCH_CUDA_OVERLAP=0` selects the serial path, for comparison and as a way out: the reader thread
still reads one op ahead into pinned memory, but the uploads run on the current stream when the op begins
and each output comes back by a blocking copy.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from workbench.errors import ConfigError

OVERLAP_ENV = "WORKBENCH_CUDA_OVERLAP"


def overlap_setting() -> bool:
    """Whether CUDA merges overlap their copies with compute (WORKBENCH_CUDA_OVERLAP, default 1)."""
    value = os.environ.get(OVERLAP_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ConfigError(f"environment variable {OVERLAP_ENV}={value!r}: expected 1 (overlap a CUDA merge's "
                          f"copies with its compute, the default) or 0 (serial copies)")
    return value == "1"


class Inputs:
    """Input tensors for each op on the merge's device; `to_host` brings an output back."""

    def __init__(self, readers: dict, device: torch.device, overlap: bool):
        """overlap: `overlap_setting()`, read by the caller before any output (it matters on CUDA only)."""
        self.readers, self.device = readers, device
        on_cuda = device.type == "cuda"
        self.overlap = on_cuda and overlap
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-reader") if on_cuda else None
        self.ahead = {}
        if self.overlap:
            self.h2d = torch.cuda.Stream(device=device)
            self.d2h = torch.cuda.Stream(device=device)

    def _read(self, op) -> dict:
        """The op's inputs read into fresh pinned host tensors."""
        out = {}
        for ref in op.inputs():
            reader = self.readers[ref]
            spec = reader.spec(op.name)
            out[ref] = reader.read_into(op.name, torch.empty(spec.shape, dtype=spec.dtype, pin_memory=True))
        return out

    def _load(self, op) -> tuple[dict, object]:
        """(tensors, uploaded): pinned host tensors and None (serial), or device tensors whose uploads were
        started on the copy stream and the event recorded after them (overlapped). Runs on the reader thread."""
        host = self._read(op)
        if not self.overlap:
            return host, None
        with torch.cuda.stream(self.h2d):
            tensors = {ref: t.to(self.device, non_blocking=True) for ref, t in host.items()}
            uploaded = torch.cuda.Event()
            uploaded.record(self.h2d)
        return tensors, uploaded

    def prefetch(self, op):
        """Start reading (and, overlapped, uploading) `op`'s inputs on the reader thread; None: nothing."""
        if self.pool is not None and op is not None and op.name not in self.ahead:
            self.ahead[op.name] = self.pool.submit(self._load, op)

    def take(self, op) -> dict:
        """{reference: tensor} for `op`, on the merge's device, ready for the current stream to use."""
        if self.pool is None:
            return {ref: self.readers[ref].get(op.name) for ref in op.inputs()}
        future = self.ahead.pop(op.name, None)
        tensors, uploaded = future.result() if future is not None else self._load(op)
        if uploaded is None:
            return {ref: t.to(self.device, non_blocking=True) for ref, t in tensors.items()}
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(uploaded)
        for tensor in tensors.values():
            tensor.record_stream(compute)
        return tensors

    def to_host(self, out: torch.Tensor) -> tuple[torch.Tensor, object]:
        """(host tensor, ready): `out` on the host, and a callable that blocks until its bytes are there
        (None: they already are). Call it after every kernel that writes `out` has been queued."""
        if out.device.type == "cpu":
            return out, None
        if not self.overlap:
            return out.cpu(), None
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h):
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        out.record_stream(self.d2h)
        return host, done.synchronize

    def release(self, op):
        for ref in op.inputs():
            self.readers[ref].release(op.name)

    def release_part(self, op, ref, start, end):
        """Drop the pages of bytes [start, end) of input `ref`'s tensor for `op` (read, no longer needed)."""
        self.readers[ref].release(op.name, start, end)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
