"""Time a command as its own process: wall time and peak resident memory (Linux `wait4` rusage)."""
import os
import subprocess
import time
from dataclasses import dataclass


@dataclass
class ProcessRun:
    command: list
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str

    @property
    def peak_rss_gb(self) -> float:
        return self.peak_rss_bytes / 1e9


def run_measured(command, *, env=None, cwd=None, timeout=None) -> ProcessRun:
    """Run `command`, wait for it with `os.wait4` to read its own peak RSS (ru_maxrss, KiB on Linux)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
    out_chunks = []
    deadline = None if timeout is None else started + timeout
    # Read output while waiting so a chatty process never blocks on a full pipe.
    for line in proc.stdout:
        out_chunks.append(line)
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            break
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ProcessRun(command=list(command), seconds=seconds, peak_rss_bytes=usage.ru_maxrss * 1024,
                      returncode=proc.returncode, output="".join(out_chunks))


def warm_page_cache(paths):
    """Read the files once so both tools start from a warm page cache (a fair, repeatable start)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * 1024 * 1024):
                pass
