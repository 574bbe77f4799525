"""Stage directories keyed by a hash of their inputs, so that a rerun skips what is done.

A stage's inputs are plain data: its config section, the keys of the stages it consumes, hashes of local
files it reads, and the stage's own code version. The same inputs give the same key, hence the same
directory (`<run_dir>/stages/<name>-<key>/`, see runner.py); a stage is finished when its `stage.json` record
exists. The directory holds everything the stage makes, and its work in progress (trainer checkpoints,
partial shards), so an interrupted stage resumes where it stopped.
"""
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from workbench.provenance import canonical as _canonical, fingerprint

RECORD = "stage.json"


def write_json_atomic(path, data):
    """Write JSON to a temporary sibling, fsync, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # on a full disk, the half-written file must not keep the space
        raise


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

    def start(self, *, fresh: bool = False) -> Path:
        """Make the directory (keeping work in progress to resume from, or emptied when `fresh`: a forced rerun
        starts over); the stage is unfinished until `finish`."""
        if fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RECORD).unlink(missing_ok=True)
        return self.path

    def finish(self, outputs: dict, **info) -> dict:
        """Mark the stage finished; `outputs` are paths relative to the stage dir or plain values."""
        record = {"stage": self.name, "key": self.key, "path": str(self.path), "inputs": _canonical(self.inputs),
                  "outputs": _canonical(outputs), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        write_json_atomic(self.path / RECORD, record)
        return record


def stage_for(run_dir, name: str, inputs: dict) -> Stage:
    """The stage directory for these inputs (not created until `start`)."""
    key = fingerprint(inputs)
    return Stage(name=name, key=key, path=Path(run_dir) / f"{name}-{key}", inputs=inputs)
