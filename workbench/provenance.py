"""What an output was computed from: stable fingerprints of settings, and (cached) hashes of input files."""
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from workbench.config.schema import to_dict

_HASH_CHUNK = 8 * 1024 * 1024
_lock = threading.Lock()


def canonical(obj):
    """Plain JSON-able data with a fixed form: dicts sorted, paths as text, 1.0 written as 1."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):

        return canonical(to_dict(obj))
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 1.0 and 1 in YAML mean the same setting
    return obj


def fingerprint(obj, length=12) -> str:
    """A short stable hash of plain data (dicts in any key order hash alike)."""
    text = json.dumps(canonical(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def cache_dir() -> Path:
    """Cross-run cache (converted GGUF models, downloads, file hashes): $WORKBENCH_CACHE or ~/.cache/workbench."""
    root = os.environ.get("WORKBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "workbench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_identity(path) -> list:
    """(path, size, mtime): cheap, and changes whenever the file is rewritten."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cached_file_sha256(path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a big checkpoint is hashed once."""
    key = json.dumps(file_identity(path))
    store = cache_dir() / "sha256.json"
    with _lock:
        try:
            known = json.loads(store.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        if key in known:
            return known[key]
    digest = file_sha256(path)
    with _lock:
        try:
            known = json.loads(store.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        known[key] = digest
        tmp = store.with_name(f".sha256.json.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(known, indent=0), encoding="utf-8")
            os.replace(tmp, store)
        except OSError:
            tmp.unlink(missing_ok=True)  # a cache that cannot be written is only slower next time
    return digest
