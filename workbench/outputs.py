"""Output folders: never over an input, one writer at a time, and only the tool's own leftovers deleted.

- `check_apart`: an output, with the `.partial`, `.replaced` and `.lock` siblings its writer uses, may not
  equal, contain or sit inside any input (models, tokenizers, data, the recipe), compared after resolving
  symlinks, and checked before anything is written: `--out <base model> --overwrite` must not replace the
  base, and `--out <folder holding the models> --overwrite` must not delete them.
- `OutputLock`: an exclusive `flock` on a lock file holding the writer's PID. The kernel drops a lock when
  its process dies, so a lock left by a killed run is taken over without asking; a live one is reported
  with its PID.
- Owned folders: the temporary folders the tool makes carry a marker file; a folder without one (the
  user's own `out.partial`, say) is never emptied or deleted.
"""
import fcntl
import json
import os
import shutil
from pathlib import Path

from workbench.errors import ConfigError, OutputError

MARKER = ".workbench-owned"
LEGACY_MANIFEST = ".manifest.json"  # what a `.partial` of an earlier version holds instead of the marker


def sibling(out_dir, suffix: str) -> Path:
    """`<out_dir><suffix>` beside it (`.partial`, `.replaced`, `.lock`)."""
    out = Path(os.path.abspath(out_dir))
    if not out.name:
        raise ConfigError(f"output {out_dir}: expected a folder with a name, not the file system root")
    return out.with_name(out.name + suffix)


def writer_paths(out_dir) -> dict[str, Path]:
    """Every path a writer of `out_dir` creates, renames or deletes."""
    out = Path(os.path.abspath(out_dir))
    return {"output": out, "temporary folder": sibling(out, ".partial"),
            "replaced folder": sibling(out, ".replaced"), "lock file": sibling(out, ".lock")}


def input_paths(path) -> list[Path]:
    """An input as the paths it occupies: itself and, for a folder, where its symlinked files really are
    (a Hugging Face cache snapshot links every file into a `blobs/` folder elsewhere)."""
    path = Path(path)
    found = [Path(os.path.realpath(path))]
    if path.is_dir():
        try:
            found += [Path(os.path.realpath(p)) for p in path.iterdir() if p.is_symlink()]
        except OSError:
            pass
    return found


def check_apart(outputs: dict, inputs: dict, option: str = "--out"):
    """ConfigError when an output path ({what: path}) equals, contains or sits inside an input ({label: path})."""
    for label, given in inputs.items():
        for held in input_paths(given):
            for what, out in outputs.items():
                real = Path(os.path.realpath(out))
                if real == held:
                    relation = "is"
                elif held.is_relative_to(real):
                    relation = "contains"
                elif real.is_relative_to(held):
                    relation = "is inside"
                else:
                    continue
                shown = f"{label} ({given})" if str(label) != str(given) else str(given)
                raise ConfigError(f"{option} {out}: the {what} {relation} the input {shown}; workbench never "
                                  f"writes over its inputs: choose a {option} outside every input")


# ----- folders the tool owns

def make_owned_dir(path: Path):
    """Create `path` (and its parents) and mark it as the tool's."""
    path.mkdir(parents=True, exist_ok=True)
    mark_owned(path)


def mark_owned(path: Path):
    with open(path / MARKER, "w", encoding="utf-8") as f:
        json.dump({"tool": "workbench", "pid": os.getpid()}, f)


def is_owned(path: Path) -> bool:
    """A folder the tool made: it holds the marker (or an earlier version's manifest)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return (path / MARKER).is_file() or _legacy_manifest(path / LEGACY_MANIFEST)


def _legacy_manifest(file: Path) -> bool:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"version", "plan_hash", "shards"} <= data.keys()


def check_removable(path: Path):
    """ConfigError unless `path` is absent, empty, or the tool's own folder."""
    if not os.path.lexists(path) or is_owned(path):
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    raise ConfigError(f"{path} exists and was not made by workbench (no {MARKER} inside), so it is left "
                      f"alone: move or delete it yourself, or write the output elsewhere")


def remove_owned(path: Path):
    """Delete the tool's folder `path` (an empty folder too); anything else is refused, never deleted."""
    check_removable(path)
    if not os.path.lexists(path):
        return
    if is_owned(path):
        shutil.rmtree(path)
    else:
        path.rmdir()


# ----- the lock

class OutputLock:
    """An exclusive lock on `path` for the output `what`, taken with `acquire()` (or `with`).

    Not re-entrant: a second lock on the same path, in this process or another, is refused."""

    def __init__(self, path, what: str):
        self.path = Path(os.path.abspath(path))
        self.what = what
        self.fd = None

    def acquire(self) -> "OutputLock":
        if self.fd is not None:
            return self
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise OutputError(f"{self.path}: cannot create the lock file for {self.what}: "
                                  f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise OutputError(f"{self.what} is in use by {holder} (lock {self.path}): wait for it to "
                                  f"finish, or stop it and rerun") from None
            except OSError:
                # A file system without flock (some network mounts): no lock rather than no run.
                self.fd = fd
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)  # the holder removed the file after we opened it: lock the new one

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked, so no other process locks a file about to go
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "another process"
