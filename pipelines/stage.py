"""Stage directories keyed by a hash of their inputs, so that a rerun skips what is done.

A stage's inputs are plain data: its config section, the keys of the stages it consumes, hashes of local
files it reads, and the stage's own code version. The same inputs give the same key, hence the same
directory (`<run_dir>/<name>-<key>/`); a stage is finished when its `stage.json` record exists. Work in
progress (trainer checkpoints, partial shards) lives inside the directory, so an interrupted stage resumes
where it stopped.
"""
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

RECORD = "stage.json"


def _canonical(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        from workbench.config.schema import to_dict

        return _canonical(to_dict(obj))
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 1.0 and 1 in YAML mean the same setting
    return obj


def fingerprint(obj, length=12) -> str:
    """A short stable hash of plain data (dicts in any key order hash alike)."""
    text = json.dumps(_canonical(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def file_sha256(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path, data):
    """Write JSON to a temporary sibling, fsync, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Stage:
    """One stage's directory under a run directory."""

    name: str
    key: str
    path: Path
    inputs: dict

    @property
    def done(self) -> bool:
        return (self.path / RECORD).is_file()

    def record(self) -> dict:
        """The finished stage's record: its inputs, outputs and timings."""
        return json.loads((self.path / RECORD).read_text(encoding="utf-8"))

    def start(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def finish(self, outputs: dict, **info) -> dict:
        """Mark the stage finished; `outputs` are paths relative to the stage dir or plain values."""
        record = {"stage": self.name, "key": self.key, "inputs": _canonical(self.inputs),
                  "outputs": _canonical(outputs), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        write_json_atomic(self.path / RECORD, record)
        return record


def stage_for(run_dir, name: str, inputs: dict) -> Stage:
    """The stage directory for these inputs (not created until `start`)."""
    key = fingerprint(inputs)
    return Stage(name=name, key=key, path=Path(run_dir) / f"{name}-{key}", inputs=inputs)


def cache_dir() -> Path:
    """Cross-run cache (converted GGUF models, downloaded experts): $WORKBENCH_CACHE or ~/.cache/workbench."""
    root = os.environ.get("WORKBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "workbench")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
