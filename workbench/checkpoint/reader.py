"""ModelReader: a lazy, memory-mapped view of a Hugging Face model directory, one tensor at a time."""
import ctypes
import hashlib
import mmap
import os
import threading
from math import prod
from pathlib import Path

import torch

from workbench.checkpoint.safetensors_format import TensorSpec, read_header
from workbench.checkpoint.weight_files import find_weight_files, load_pickle_checkpoint
from workbench.errors import CheckpointError, UnsafeCheckpointError
from workbench.user_files import read_json, regular_file_exists

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_HASH_CHUNK = 8 * 1024 * 1024


class ModelReader:
    """Read a model directory (single or sharded safetensors) tensor by tensor, never the whole model.

    Every header is parsed and validated at open time, so a truncated or corrupt file fails here with a
    CheckpointError naming it, before any output exists. Tensors come from a private copy-on-write memory
    map: writable (a merge may write its output over them) without ever changing the file.

    Tied embeddings: a model with `tie_word_embeddings` stores no `lm_head.weight`; `names` lists what is
    stored, and `is_tied` says whether the LM head is the embedding.

    Pickled weights (.bin, .pt, .pth) are refused with UnsafeCheckpointError unless `allow_pickle`; then
    they are read with `torch.load(weights_only=True, mmap=True)`. Remote code is never run.
    """

    def __init__(self, path, *, allow_pickle=False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        found = find_weight_files(self.path)
        if found.format == "gguf":
            raise CheckpointError(f"{self.path} holds only GGUF weights ({', '.join(f.name for f in found.files)}):"
                                  f" convert it to a safetensors model directory with `workbench fetch` first")
        if found.format == "pickle" and not allow_pickle:
            raise UnsafeCheckpointError(_pickle_refusal(self.path, found.files))
        self.format = found.format
        self.files = found.files
        self.config = _read_config(self.path)
        self._specs: dict[str, TensorSpec] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # a prefetch thread may open a shard while the main thread does
        self._closed = False
        if self.format == "safetensors":
            self._index_safetensors(found.weight_map, found.index)
        else:
            self._index_pickles()

    def _index_safetensors(self, weight_map, index):
        for file in self.files:
            specs, _ = read_header(file)
            for spec in specs:
                if spec.name in self._specs:
                    raise CheckpointError(f"{file}: tensor {spec.name!r} is also stored in "
                                          f"{self._specs[spec.name].file.name}")
                if weight_map is not None and weight_map.get(spec.name) != file.name:
                    where = f"places in {weight_map[spec.name]}" if spec.name in weight_map else "does not list"
                    raise CheckpointError(f"{file}: holds tensor {spec.name!r}, which {index.name} {where}")
                self._specs[spec.name] = spec
        missing = sorted(set(weight_map or ()) - self._specs.keys())
        if missing:
            raise CheckpointError(f"{index}: lists {len(missing)} tensor(s) not found in their shard, "
                                  f"e.g. {missing[0]!r} (expected in {weight_map[missing[0]]})")

    def _index_pickles(self):
        for file in self.files:
            for name, tensor in load_pickle_checkpoint(file).items():
                if name in self._specs:
                    raise CheckpointError(f"{file}: tensor {name!r} is also stored in "
                                          f"{self._specs[name].file.name}")
                tensor = tensor.contiguous()
                self._pickled[name] = tensor
                self._specs[name] = TensorSpec(name, tuple(tensor.shape), tensor.dtype, file, None,
                                               tensor.numel() * tensor.element_size())

    # ----- what is stored
    @property
    def names(self) -> list[str]:
        """Stored tensor names, in file order (shard by shard)."""
        return list(self._specs)

    @property
    def is_tied(self) -> bool:
        """Whether the LM head is the input embedding (config's tie_word_embeddings, else what is stored)."""
        if "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        return EMBED in self._specs and LM_HEAD not in self._specs

    def spec(self, name) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} is stored") from None

    def __contains__(self, name):
        return name in self._specs

    def __len__(self):
        return len(self._specs)

    def __iter__(self):
        return iter(self._specs)

    def __repr__(self):
        return f"ModelReader({str(self.path)!r}, {len(self._specs)} tensors, {self.format})"

    # ----- reading
    def get(self, name) -> torch.Tensor:
        """The tensor `name` on the CPU, backed by a private copy-on-write map: writable, the file never changes.

        Two calls for the same name share memory. Use `release(name)` when done with it.
        """
        spec = self.spec(name)
        self._check_open()
        if name in self._pickled:
            return self._pickled[name]
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        if spec.offset % spec.dtype.itemsize:
            # A misaligned tensor (a foreign writer's layout): a copy is safer than an unaligned view.
            return self.read_into(name, torch.empty(spec.shape, dtype=spec.dtype))
        buf = self._mmap(spec.file)
        return torch.frombuffer(buf, dtype=spec.dtype, count=prod(spec.shape), offset=spec.offset).view(spec.shape)

    def release(self, name, start: int = 0, end: int | None = None):
        """Drop the resident pages of tensor `name` (madvise MADV_DONTNEED), so streaming keeps RSS flat;
        with `start`/`end`, only those of its bytes [start, end) (a part already read and no longer needed).

        The caller must not use tensors from `get(name)` afterwards (or, for a part, must not rely on what
        was written over those bytes): the pages, including anything written over them, are discarded, and a
        later read of them reads the file afresh. Only pages lying wholly inside the range are dropped, so a
        neighbour's in-place writes sharing a boundary page are never lost.
        A no-op for pickles and on systems without madvise.
        """
        spec = self.spec(name)
        buf = self._maps.get(spec.file)
        if buf is None or spec.offset is None or not hasattr(buf, "madvise"):
            return
        end = spec.nbytes if end is None else min(end, spec.nbytes)
        page = mmap.PAGESIZE
        first = -(-(spec.offset + max(start, 0)) // page) * page
        last = (spec.offset + end) // page * page
        if last > first:
            buf.madvise(mmap.MADV_DONTNEED, first, last - first)

    def read_into(self, name, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `name` into the preallocated contiguous CPU tensor `out` (e.g. pinned memory); return it."""
        spec = self.spec(name)
        self._check_open()
        if out.dtype != spec.dtype or out.numel() * out.element_size() != spec.nbytes:
            raise ValueError(f"read_into({name!r}): `out` is {out.dtype} with {out.numel()} elements, "
                             f"expected {spec.dtype} with {prod(spec.shape)} (shape {list(spec.shape)})")
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"read_into({name!r}): `out` must be a contiguous CPU tensor")
        if name in self._pickled:
            return out.copy_(self._pickled[name].reshape(out.shape))
        if spec.nbytes == 0:
            return out
        view = memoryview((ctypes.c_char * spec.nbytes).from_address(out.data_ptr())).cast("B")
        pos = 0
        while pos < spec.nbytes:
            n = self._pread(spec.file, view[pos:], spec.offset + pos)
            if n <= 0:
                raise CheckpointError(f"{spec.file}: tensor {name!r} ends past the end of the file "
                                      f"(was the file truncated after it was opened?)")
            pos += n
        return out

    def _pread(self, file, view, offset) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self._fd(file), [view], offset)
        with open(file, "rb") as f:
            f.seek(offset)
            return f.readinto(view)

    def file_hashes(self) -> dict[str, str]:
        """{file name: sha256 hex} of every weight file, streamed in chunks."""
        out = {}
        for file in self.files:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
            out[file.name] = digest.hexdigest()
        return out

    # ----- resources
    def _fd(self, file) -> int:
        with self._lock:
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{file}: cannot open: {e.strerror}") from e
            return self._fds[file]

    def _mmap(self, file) -> mmap.mmap:
        fd = self._fd(file)
        with self._lock:
            if file not in self._maps:
                self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            return self._maps[file]

    def _check_open(self):
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    def close(self):
        """Close the file descriptors and forget the maps; tensors from get() stay valid while they live.

        A map is never closed explicitly: torch.frombuffer keeps a reference to it but no buffer export,
        so closing it under a live tensor would unmap that tensor's memory. It goes with its last tensor.
        """
        for fd in self._fds.values():
            os.close(fd)
        self._maps.clear()
        self._fds.clear()
        self._pickled.clear()
        self._closed = True

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not regular_file_exists(file):
        return {}
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def _pickle_refusal(path, files) -> str:
    names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return (f"{path} holds only pickled weights ({names}): unpickling can execute arbitrary code, so "
            f"workbench reads only safetensors. Convert it once, in an environment you trust: load it with "
            f"torch.load(file, weights_only=True) or transformers' from_pretrained and save it with "
            f"save_pretrained(out_dir, safe_serialization=True), and use that folder instead")
