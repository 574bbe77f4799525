"""ShardedWriter: stream tensors into a sharded safetensors model directory that appears only when complete.

Everything is written into `<out_dir>.partial/` beside the final path and renamed into place by
`finalize()`. A manifest of finished shards (`.manifest.json`, keyed by a hash of the shard headers) lets
a rerun with the same plan resume where an interrupted one stopped; the bytes are the same either way.
While it works the writer holds `<out_dir>.lock` (workbench/outputs.py), and it deletes only folders that
carry the tool's marker: a `.partial` or `.replaced` folder of the user's own is refused, never emptied.
"""
import ctypes
import hashlib
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.checkpoint.safetensors_format import code_from_dtype, layout, tensor_nbytes
from workbench.errors import CheckpointError, ConfigError, OutputError
from workbench.outputs import (MARKER, OutputLock, check_apart, check_removable, make_owned_dir, mark_owned,
                               remove_owned, writer_paths)

MANIFEST = ".manifest.json"
SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "chat_template.json")
_HASH_CHUNK = 8 * 1024 * 1024
_HASH_BESIDE = 4 * 1024 * 1024   # a tensor at least this big is hashed on a second thread while it is written
PART_BYTES = 8 * 1024 * 1024          # write(..., written=) writes and reports a tensor in parts of this many bytes


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
    An existing `out_dir` is an error unless `overwrite`, and then it must be a model folder (or empty).

    `resume_key` names what the output was computed from (recipe, input files): a rerun with another key
    starts fresh even when the plan is the same; it is not written into the shards, so equal tensors give
    equal bytes whatever produced them. `write(name, tensor, record)` may attach a small JSON-able record
    to a tensor (per-tensor report entries); records are saved with their shard and survive a resume:
    `records()` returns them all, in plan order.

    The writer holds `<out_dir>.lock` from construction to `finalize()` or `close()`, unless given the
    `lock` its caller already holds.
    """

    def __init__(self, out_dir, plan, *, max_shard_bytes=2 * 1024**3, source_dir=None, metadata=None,
                 extra_files=None, overwrite=False, resume_key: str | None = None, lock: OutputLock | None = None):
        paths = writer_paths(out_dir)
        self.out_dir, self.partial_dir = paths["output"], paths["temporary folder"]
        self.replaced_dir = paths["replaced folder"]
        self.plan = _normalize_plan(plan)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self.extra_files = dict(extra_files or {})
        self.overwrite = overwrite
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        if self.source_dir is not None:
            check_apart(paths, {"config and tokenizer source": self.source_dir})
        self._open = None  # (shard, file object, tensors written so far)
        self._own_lock = lock is None  # a caller that locked the output earlier keeps its lock
        self._lock = lock or OutputLock(paths["lock file"], f"output {self.out_dir}").acquire()
        try:
            self._check_out_dir()
            check_removable(self.partial_dir)
            if self.source_dir is not None and not self.source_dir.is_dir():
                raise CheckpointError(f"source directory for config and tokenizer files not found: "
                                      f"{self.source_dir}")
            self.shards = _assign_shards(self.plan, max_shard_bytes, metadata)
            self._check_extra_names()
            self.plan_hash = _plan_hash(self.shards, resume_key)
            self._records = {}  # shard file -> {name: record}, saved in the manifest with the shard
            self._shard_of = {name: shard for shard in self.shards for name in shard.names}
            self._spec = {name: (shape, dtype) for name, shape, dtype in self.plan}
            self._finished = self._resume()
            self._pending = [name for name, _, _ in self.plan if self._shard_of[name].file not in self._finished]
            self._next = 0
            self._digest, self._hashed = None, 0  # the open shard's sha256 so far, and how many bytes it covers
            self._finalized = False
            for shard in self.shards:  # a plan whose shards are all empty has nothing to wait for
                if not shard.names and shard.file not in self._finished:
                    self._start(shard)
                    self._finish()
        except BaseException:
            self.close()
            raise

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
        elif os.path.lexists(self.partial_dir):
            remove_owned(self.partial_dir)  # another plan's leftovers (or no manifest): start fresh
        with _writing(self.partial_dir, "create"):
            make_owned_dir(self.partial_dir)
            for path in self.partial_dir.iterdir():  # unfinished shards, *.tmp, files of a died finalize()
                if path.name not in finished and path.name not in (MANIFEST, MARKER):
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

    def write(self, name, tensor: torch.Tensor, record: dict | None = None, written=None):
        """Write the next pending tensor; its name, shape and dtype must match the plan.

        written: called as written(start, end) after each part [start, end) of the tensor's bytes is written
        and hashed, parts of `PART_BYTES` bytes (e.g. to drop the pages of an input map the tensor is, while the
        rest is still being written)."""
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
            # The file's next bytes are hashed now, not read back at the end; a big tensor's on a second
            # thread while this one writes it (hashlib and the write both release the GIL).
            in_order = offset == self._hashed
            step = PART_BYTES if written is not None else len(view)
            path = self.partial_dir / (shard.file + ".tmp")
            for start in range(0, len(view), step):
                part = view[start:start + step]
                beside = None
                if in_order and len(part) >= _HASH_BESIDE:
                    beside = threading.Thread(target=self._digest.update, args=(part,), name="writer-sha256")
                    beside.start()
                try:
                    with _writing(path, "write"):
                        f.seek(offset + start)
                        f.write(part)
                        f.flush()
                        _start_writeback(f.fileno(), offset + start, len(part))
                finally:
                    if beside is not None:
                        beside.join()
                if in_order and beside is None:
                    self._digest.update(part)
                if written is not None:
                    written(start, start + len(part))
            if in_order:
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
        tmp = self.partial_dir / (shard.file + ".tmp")
        with _writing(tmp, "write"):
            f = open(tmp, "wb")
            self._open = (shard, f, 0)
            f.write(shard.header)
        # The shard's sha256 is taken as its bytes are written in file order (tensors of one item size are
        # laid out in plan order); whatever was written out of that order is read back at the end.
        self._digest = hashlib.sha256(shard.header)
        self._hashed = len(shard.header)
        self._open = (shard, f, 0)

    def _finish(self):
        """Flush and fsync the open shard, rename it to its final name and record it in the manifest."""
        shard, f, _ = self._open
        tmp = self.partial_dir / (shard.file + ".tmp")
        with _writing(tmp, "write"):
            f.truncate(shard.size)  # only grows the file, for a shard whose last tensors are empty
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._open = None
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
        try:
            self._check_out_dir()
            with _writing(self.partial_dir, "write into"):
                self._complete()
                self._rename_into_place()
        finally:
            self.close()
        self._finalized = True
        return self.out_dir

    def _complete(self):
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

    def _rename_into_place(self):
        out = self.out_dir
        if not os.path.lexists(out):
            os.rename(self.partial_dir, out)
        else:
            # Rename the old one aside, the new one in, then delete the old: the final path is never partial.
            aside = self.replaced_dir
            remove_owned(aside)
            os.rename(out, aside)
            mark_owned(aside)
            try:
                os.rename(self.partial_dir, out)
            except OSError:
                os.rename(aside, out)
                (out / MARKER).unlink()
                raise
            remove_owned(aside)
        (out / MARKER).unlink()  # after the rename: a crash before it leaves a marked, removable `.partial`
        _fsync_dir(out.parent)

    def _check_out_dir(self):
        """An existing output needs `overwrite`, and may then be only a folder of files with a model (or
        nothing) in it: `--overwrite` replaces an earlier result, not a folder of other things."""
        out = self.out_dir
        if not os.path.lexists(out):
            return
        if not self.overwrite:
            raise ConfigError(f"output directory {out} already exists: choose another, or pass "
                              f"overwrite=True (--overwrite) to replace it")
        entries = list(out.iterdir()) if out.is_dir() and not out.is_symlink() else None
        if entries is None:
            raise ConfigError(f"{out} exists and is not a folder: overwrite replaces only a model folder that an "
                              f"earlier run wrote; move or delete it yourself")
        folders = [p.name for p in entries if p.is_dir() and not p.is_symlink()]
        model = any(p.name == "config.json" or p.name.endswith(".safetensors") for p in entries)
        if folders or (entries and not model):
            what = f"holds folders ({', '.join(sorted(folders)[:3])})" if folders else \
                "holds no model (no config.json or *.safetensors)"
            raise ConfigError(f"{out} {what}: overwrite replaces only a model folder that an earlier run wrote; "
                              f"move or delete it yourself, or choose another output")
        check_removable(self.replaced_dir)

    def _check_extra_names(self):
        reserved = {shard.file for shard in self.shards} | {"model.safetensors.index.json", MANIFEST}
        for fname in self.extra_files:
            if Path(fname).name != fname or fname in ("", ".", ".."):
                raise ValueError(f"extra file {fname!r}: expected a plain file name inside {self.out_dir}")
            if fname in reserved or fname.endswith(".tmp"):
                raise ValueError(f"extra file {fname!r} would replace a file the writer itself writes")

    def close(self):
        """Stop without finalizing: the open shard's temporary file goes (a rerun rewrites that shard from
        its start anyway, and on a full disk it holds the space), finished shards stay for a rerun with the
        same plan, and the lock is released."""
        if self._open is not None:
            shard, f, _ = self._open
            self._open = None
            try:
                f.close()
            except OSError:
                pass  # the bytes that could not be flushed belong to a file deleted now
            (self.partial_dir / (shard.file + ".tmp")).unlink(missing_ok=True)
        if self._own_lock:
            self._lock.release()

    def abandon(self, keep: bool = True) -> Path | None:
        """After a failed run: `close()`, then delete the `.partial` folder unless `keep` and it holds a
        finished shard that a rerun can resume from. Returns the folder when it is kept."""
        self.close()
        if keep and self._finished_count() and self.partial_dir.is_dir():
            return self.partial_dir
        if self.partial_dir.is_dir():
            try:
                remove_owned(self.partial_dir)
            except (OSError, ConfigError):
                return self.partial_dir
        return None

    def _finished_count(self) -> int:
        return len(getattr(self, "_finished", {}))

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        return None
    return manifest


def _libc_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, n: int):
    """Ask Linux to start writing [offset, offset + n) to disk now, without waiting (sync_file_range with
    SYNC_FILE_RANGE_WRITE): the shard's closing fsync then waits only for the last bytes, not for all of
    them. Durability still comes from that fsync. Elsewhere, or if the call fails, nothing happens."""
    if _sync_file_range is not None and n:
        _sync_file_range(fd, offset, n, _SYNC_FILE_RANGE_WRITE)


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
    with _writing(tmp, "write"):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not stay full of a half-written file
            raise


class _writing:
    """Turn an OSError (disk full, read-only folder, ...) into an OutputError naming the path."""

    def __init__(self, path, action: str):
        self.path, self.action = path, action

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError):
            raise OutputError(f"{self.path}: cannot {self.action}: {error.strerror or error}") from error
        return False


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
