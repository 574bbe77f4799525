"""run_measured: a command's own peak RSS, whatever the measuring process holds; output; exit code; timeout."""
import sys

from workbench.pipelines.bench.processes import run_measured

TOUCH = "b = bytearray({n})\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('done', flush=True)\nraise SystemExit({code})"


def test_peak_rss_is_the_commands_own_not_the_measuring_process():
    held = bytearray(400_000_000)  # what a benchmark holds after generating models
    for i in range(0, len(held), 4096):
        held[i] = 1
    idle = run_measured([sys.executable, "-c", "pass"])
    # Started straight from this process it would report at least our own 400 MB.
    assert idle.returncode == 0 and idle.peak_rss_bytes < 100_000_000
    busy = run_measured([sys.executable, "-c", TOUCH.format(n=200_000_000, code=3)])
    assert 200_000_000 < busy.peak_rss_bytes < 300_000_000
    assert busy.returncode == 3 and busy.output == "done\n"
    assert len(held) == 400_000_000


def test_a_command_past_its_timeout_is_killed():
    run = run_measured([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                       timeout=2)
    assert run.returncode == -9 and run.seconds < 30 and run.output == "started\n"
