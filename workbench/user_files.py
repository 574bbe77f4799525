"""Files the user hands to workbench: only regular files are opened, and JSON is parsed at a bounded cost.

A FIFO or a device in place of `model.safetensors` or `tokenizer.json` would block a read forever (a FIFO
without a writer) or never end (/dev/zero); it is refused from its `stat`, before it is opened, and the
open itself cannot block (O_NONBLOCK, then `fstat` confirms a regular file). JSON nested deeper than the
interpreter's recursion limit (`[[[[...`) is refused naming the file, not reported as Python's RecursionError.
"""
import json
import os
import stat
from pathlib import Path

from workbench.errors import CheckpointError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder ("a FIFO (named pipe)", ...)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def refuse_special(path, error=CheckpointError):
    """Raise `error` when `path` is a FIFO, a device or a socket (also through a symlink)."""
    kind = special_kind(path)
    if kind is not None:
        raise error(f"{path}: is {kind}, not a regular file; workbench reads only regular files here")


def regular_file_exists(path, error=CheckpointError) -> bool:
    """True for a regular file, False when there is none; `error` for a FIFO, device or socket."""
    refuse_special(path, error)
    return Path(path).is_file()


def open_regular(path, error=CheckpointError):
    """Open a regular file for binary reading; `error` for anything else, without ever blocking on it."""
    refuse_special(path, error)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
            raise error(f"{path}: is not a regular file; workbench reads only regular files here")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_text(path, error=CheckpointError) -> str:
    """The UTF-8 text of a regular file; `error` naming the file when it cannot be read or decoded."""
    try:
        with open_regular(path, error) as f:
            data = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_json(text, where: str, error=CheckpointError):
    """`json.loads` whose every failure, nesting too deep included, is `error` naming `where`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: not valid JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{where}: not valid JSON: {e}") from None


def read_json(path, error=CheckpointError):
    """The parsed JSON of a regular file; `error` naming the file for any unreadable or invalid content."""
    return parse_json(read_text(path, error), str(path), error)
