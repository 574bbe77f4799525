"""Time a command as its own process: wall time and peak resident memory (Linux `wait4` rusage).

The command runs under a small Python trampoline that starts it and reads its rusage. Started straight from
this process, the command's ru_maxrss would be at least this process's own resident size: on Linux a child
inherits the high-water mark of the address space it was forked (or vfork-ed) from when it calls exec. A
benchmark that holds torch and has just generated models would then report its own size for every command
(measured: a child running `pass` under a parent holding 1.5 GB reported 1.51 GB).
"""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# Starts argv[2:], waits for it with wait4 and writes "<ru_maxrss KiB> <exit code>" to argv[1]. Its own
# resident size (a bare interpreter, ~10 MB) is the floor its child inherits.
_TRAMPOLINE = ("import os, subprocess, sys\n"
               "child = subprocess.Popen(sys.argv[2:])\n"
               "_, status, usage = os.wait4(child.pid, 0)\n"
               "code = os.waitstatus_to_exitcode(status)\n"
               "open(sys.argv[1], 'w').write(f'{usage.ru_maxrss} {code}')\n"
               "sys.exit(code if 0 <= code < 256 else 1)\n")


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
    """Run `command` and read its own peak RSS (ru_maxrss, KiB on Linux) through the trampoline; output is
    stdout and stderr together. With `timeout` (seconds), the command's whole process group is killed then."""
    with tempfile.TemporaryDirectory() as tmp:
        usage_file = Path(tmp) / "usage"
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(usage_file), *map(str, command)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True,
                                start_new_session=True)
        out_chunks = []
        # Read output while waiting so a chatty process never blocks on a full pipe.
        reader = threading.Thread(target=lambda: out_chunks.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the trampoline and the command
            proc.wait()
        reader.join()
        seconds = time.perf_counter() - started
        if proc.returncode >= 0 and usage_file.is_file():
            rss_kib, code = (int(v) for v in usage_file.read_text().split())
        else:  # killed before its child ended
            rss_kib, code = 0, proc.returncode
    return ProcessRun(command=list(command), seconds=seconds, peak_rss_bytes=rss_kib * 1024, returncode=code,
                      output="".join(out_chunks))


def warm_page_cache(paths):
    """Read the files once so both tools start from a warm page cache (a fair, repeatable start)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * 1024 * 1024):
                pass
