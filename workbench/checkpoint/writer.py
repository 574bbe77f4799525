"""ShardedWriter: stream tensors into a sharded safetensors model directory that appears only when complete.

Everything is written into `<out_dir>.partial/` beside the final path and renamed into place by
`finalize()`. A manifest of finished shards (`.manifest.json`, keyed by a hash of the shard headers) lets
a rerun with the same plan resume where an interrupted one stopped; the bytes are the same either way.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.checkpoint.safetensors_format import code_from_dtype, layout, tensor_nbytes
from workbench.errors import CheckpointError, ConfigError

MANIFEST = ".manifest.json"
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "chat_template.json")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass
class _Shard:
    file: str
    names: list[str]
    header: bytes
    offsets: dict[str, int]
    size: int


class ShardedWriter:
    """Write the tensors of `plan` = [(name, shape, dtype), ...] in plan order, shard by shard.

    Shards are filled greedily in plan order up to `max_shard_bytes` (a bigger tensor gets a shard of its
    own) and named as transformers names them. `metadata` (str -> str) goes into every shard header.
    `finalize()` copies config and tokenizer files from `source_dir`, writes `extra_files` ({name: str or
    bytes}, written last, so they may replace a copied config) and renames the directory into place.
    An existing `out_dir` is an error unless `overwrite`.

    `resume_key` names what the output was computed from (recipe, input files): a rerun with another key
    starts fresh even when the plan is the same; it is not written into the shards, so equal tensors give
    equal bytes whatever produced them. `write(name, tensor, record)` may attach a small JSON-able record
    to a tensor (per-tensor report entries); records are saved with their shard and survive a resume:
    `records()` returns them all, in plan order.
    """

    def __init__(self, out_dir, plan, *, max_shard_bytes=2 * 1024**3, source_dir=None, metadata=None,
                 extra_files=None, overwrite=False, resume_key: str | None = None):
        self.out_dir = Path(os.path.abspath(out_dir))
        self.partial_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.plan = _normalize_plan(plan)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.extra_files = dict(extra_files or {})
        self.overwrite = overwrite
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        self._check_out_dir()
        if self.source_dir is not None and not self.source_dir.is_dir():
            raise CheckpointError(f"source directory for config and tokenizer files not found: {self.source_dir}")
        self.shards = _assign_shards(self.plan, max_shard_bytes, metadata)
        self._check_extra_names()
        self.plan_hash = _plan_hash(self.shards, resume_key)
        self._records = {}  # shard file -> {name: record}, saved in the manifest with the shard
        self._shard_of = {name: shard for shard in self.shards for name in shard.names}
        self._spec = {name: (shape, dtype) for name, shape, dtype in self.plan}
        self._finished = self._resume()
        self._pending = [name for name, _, _ in self.plan if self._shard_of[name].file not in self._finished]
        self._next = 0
        self._open = None  # (shard, file object, tensors written so far)
        self._digest, self._hashed = None, 0  # the open shard's sha256 so far, and how many bytes it covers
        self._finalized = False
        for shard in self.shards:  # a plan whose shards are all empty has nothing to wait for
            if not shard.names and shard.file not in self._finished:
                self._start(shard)
                self._finish()

    # ----- resuming
    def _resume(self) -> dict:
        """Finished shards ({file: sha256}) kept from an earlier run of the same plan; the rest is cleared."""
        finished = {}
        manifest = _read_manifest(self.partial_dir / MANIFEST)
        if manifest is not None and manifest.get("plan_hash") == self.plan_hash:
            for shard in self.shards:
                entry = manifest["shards"].get(shard.file)
                path = self.partial_dir / shard.file
                if (isinstance(entry, dict) and path.is_file() and path.stat().st_size == shard.size
                        and _sha256(path) == entry.get("sha256")):
                    finished[shard.file] = entry["sha256"]
                    self._records[shard.file] = entry.get("records") or {}
        elif self.partial_dir.exists():
            _remove(self.partial_dir)  # another plan's leftovers (or no manifest): start fresh
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        for path in self.partial_dir.iterdir():  # unfinished shards, *.tmp, files of a died finalize()
            if path.name not in finished and path.name != MANIFEST:
                _remove(path)
        self._write_manifest(finished)
        return finished

    def pending(self) -> list[str]:
        """Names still to be written, in plan order: every tensor of each shard not finished by an earlier run."""
        return list(self._pending)

    # ----- writing
    def records(self) -> dict:
        """Records attached to written tensors ({name: record}), in plan order."""
        merged = {}
        for shard in self.shards:
            merged.update(self._records.get(shard.file, {}))
        return {name: merged[name] for name, _, _ in self.plan if name in merged}

    def write(self, name, tensor: torch.Tensor, record: dict | None = None):
        """Write the next pending tensor; its name, shape and dtype must match the plan."""
        if self._finalized:
            raise ValueError(f"write({name!r}): the writer for {self.out_dir} is already finalized")
        if self._next >= len(self._pending):
            raise ValueError(f"write({name!r}): every tensor of the plan has been written; call finalize()")
        expected = self._pending[self._next]
        if name != expected:
            where = "not in the plan" if name not in self._spec else "out of order"
            raise ValueError(f"write({name!r}): {where}; expected {expected!r} next (pending tensor "
                             f"{self._next + 1} of {len(self._pending)}; write the names of pending() in order)")
        shape, dtype = self._spec[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"write({name!r}): got shape {list(tensor.shape)} {tensor.dtype}, the plan says "
                             f"shape {list(shape)} {dtype}")
        shard = self._shard_of[name]
        if self._open is None:
            self._start(shard)
        _, f, _ = self._open
        data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        if data.numel():
            view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            offset = shard.offsets[name]
            f.seek(offset)
            f.write(view)
            if offset == self._hashed:  # the file's next bytes: hash them now, not by reading them back
                self._digest.update(view)
                self._hashed += len(view)
        if record is not None:
            self._records.setdefault(shard.file, {})[name] = record
        self._open = (shard, f, self._open[2] + 1)
        self._next += 1
        if self._open[2] == len(shard.names):
            self._finish()

    def _start(self, shard):
        """Open the shard's temporary file from its start and write the header computed from the plan."""
        self._records[shard.file] = {}  # a shard is rewritten from its start, records too
        f = open(self.partial_dir / (shard.file + ".tmp"), "wb")
        f.write(shard.header)
        # The shard's sha256 is taken as its bytes are written in file order (tensors of one item size are
        # laid out in plan order); whatever was written out of that order is read back at the end.
        self._digest = hashlib.sha256(shard.header)
        self._hashed = len(shard.header)
        self._open = (shard, f, 0)

    def _finish(self):
        """Flush and fsync the open shard, rename it to its final name and record it in the manifest."""
        shard, f, _ = self._open
        f.truncate(shard.size)  # only grows the file, for a shard whose last tensors are empty
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._open = None
        tmp = self.partial_dir / (shard.file + ".tmp")
        digest = _sha256(tmp, self._digest, self._hashed)
        os.replace(tmp, self.partial_dir / shard.file)
        self._finished[shard.file] = digest
        self._write_manifest(self._finished)

    def _write_manifest(self, finished):
        body = {"version": 1, "plan_hash": self.plan_hash,
                "shards": {file: {"sha256": digest, "records": self._records.get(file, {})}
                           for file, digest in finished.items()}}
        _atomic_write(self.partial_dir / MANIFEST, json.dumps(body, indent=1).encode())

    # ----- completing
    def finalize(self) -> Path:
        """Write the index, config, tokenizer and extra files, then rename the directory into place."""
        if self._finalized:
            return self.out_dir
        if self._next < len(self._pending):
            raise ValueError(f"finalize(): {len(self._pending) - self._next} tensor(s) not written yet, "
                             f"the next is {self._pending[self._next]!r}")
        self._check_out_dir()
        part = self.partial_dir
        if len(self.shards) > 1:
            weight_map = {name: shard.file for shard in self.shards for name in shard.names}
            total = sum(tensor_nbytes(shape, dtype) for _, shape, dtype in self.plan)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _atomic_write(part / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
        if self.source_dir is not None:
            for fname in SOURCE_FILES:
                if (self.source_dir / fname).is_file():
                    _atomic_write(part / fname, (self.source_dir / fname).read_bytes())
        for fname, content in self.extra_files.items():
            _atomic_write(part / fname, content.encode("utf-8") if isinstance(content, str) else bytes(content))
        (part / MANIFEST).unlink()
        _fsync_dir(part)
        self._rename_into_place()
        self._finalized = True
        return self.out_dir

    def _rename_into_place(self):
        out = self.out_dir
        if not out.exists():
            os.rename(self.partial_dir, out)
        else:
            # Rename the old one aside, the new one in, then delete the old: the final path is never partial.
            aside = out.with_name(out.name + ".replaced")
            _remove(aside)
            os.rename(out, aside)
            try:
                os.rename(self.partial_dir, out)
            except OSError:
                os.rename(aside, out)
                raise
            _remove(aside)
        _fsync_dir(out.parent)

    def _check_out_dir(self):
        if self.out_dir.exists() and not self.overwrite:
            raise ConfigError(f"output directory {self.out_dir} already exists: choose another, or pass "
                              f"overwrite=True (--overwrite) to replace it")

    def _check_extra_names(self):
        reserved = {shard.file for shard in self.shards} | {"model.safetensors.index.json", MANIFEST}
        for fname in self.extra_files:
            if Path(fname).name != fname or fname in ("", ".", ".."):
                raise ValueError(f"extra file {fname!r}: expected a plain file name inside {self.out_dir}")
            if fname in reserved or fname.endswith(".tmp"):
                raise ValueError(f"extra file {fname!r} would replace a file the writer itself writes")

    def close(self):
        """Close an open shard file without finalizing; a rerun with the same plan resumes."""
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_state_dict(out_dir, tensors: dict, **kwargs) -> Path:
    """Write a small {name: tensor} model in one call (same options as ShardedWriter); return `out_dir`."""
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with ShardedWriter(out_dir, plan, **kwargs) as writer:
        for name in writer.pending():
            writer.write(name, tensors[name])
        return writer.finalize()


def _normalize_plan(plan) -> list[tuple]:
    out, seen = [], set()
    for entry in plan:
        name, shape, dtype = entry
        if name in seen:
            raise ValueError(f"plan: tensor {name!r} appears twice")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"plan: tensor {name!r} has dtype {dtype!r}, expected a torch.dtype")
        code_from_dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"plan: tensor {name!r} has a negative dimension in shape {list(shape)}")
        seen.add(name)
        out.append((name, shape, dtype))
    return out


def _assign_shards(plan, max_shard_bytes, metadata) -> list[_Shard]:
    """Greedy in plan order: start a new shard when the next tensor would push this one past the limit."""
    groups, current, size = [], [], 0
    for entry in plan:
        nbytes = tensor_nbytes(entry[1], entry[2])
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current or not groups:
        groups.append(current)
    n = len(groups)
    shards = []
    for i, group in enumerate(groups, 1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        header, offsets = layout(group, metadata)
        size = len(header) + sum(tensor_nbytes(shape, dtype) for _, shape, dtype in group)
        shards.append(_Shard(file, [name for name, _, _ in group], header, offsets, size))
    return shards


def _plan_hash(shards, resume_key=None) -> str:
    """The headers fix every byte that is not tensor data (names, shapes, dtypes, sharding, metadata);
    the resume key, what the tensors were computed from."""
    digest = hashlib.sha256((resume_key or "").encode() + b"\0")
    for shard in shards:
        digest.update(shard.file.encode() + b"\0" + shard.header)
    return digest.hexdigest()


def _read_manifest(path: Path):
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        return None
    return manifest


def _sha256(path, digest=None, start=0) -> str:
    """sha256 of the file; with `digest` holding its first `start` bytes already, only the rest is read."""
    digest = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
