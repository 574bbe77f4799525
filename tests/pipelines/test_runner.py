"""The stage graph: keys chain through dependencies, reruns skip, --from, --only and until select, changes
propagate; one folder per stage under <run>/stages; one run at a time holds a run directory."""
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.errors import ConfigError, OutputError
from workbench.pipelines.runner import RunGraph, StageSpec, stage_output


def build(run_dir, calls, settings):
    graph = RunGraph(run_dir)

    def step(name):
        def run(stage, deps):
            calls.append(name)
            (stage.path / "out.txt").write_text(f"{name} {sorted(deps)}")
            return {"file": "out.txt"}
        return run

    graph.add(StageSpec("corpus", {"block": settings["block"]}, step("corpus")))
    graph.add(StageSpec("pretrain", {"steps": settings["steps"]}, step("pretrain"), deps=("corpus",)))
    graph.add(StageSpec("merge:ties", {"density": settings["ties"]}, step("merge:ties"), deps=("pretrain",)))
    graph.add(StageSpec("merge:ta", {}, step("merge:ta"), deps=("pretrain",)))
    graph.add(StageSpec("report", {}, step("report"), deps=("merge:ties", "merge:ta")))
    return graph


def test_rerun_skips_and_a_change_reruns_only_downstream(tmp_path):
    settings = {"block": 256, "steps": 10, "ties": 0.3}
    calls = []
    records = build(tmp_path, calls, settings).execute(log=lambda *_: None)
    assert calls == ["corpus", "pretrain", "merge:ties", "merge:ta", "report"]
    assert stage_output(records["corpus"], "file").read_text() == "corpus []"
    calls.clear()
    build(tmp_path, calls, settings).execute(log=lambda *_: None)
    assert calls == []
    build(tmp_path, calls, dict(settings, ties=0.4)).execute(log=lambda *_: None)
    assert calls == ["merge:ties", "report"]
    calls.clear()
    build(tmp_path, calls, dict(settings, ties=0.4, steps=20)).execute(log=lambda *_: None)
    assert calls == ["pretrain", "merge:ties", "merge:ta", "report"]


def test_from_and_only(tmp_path):
    settings = {"block": 256, "steps": 10, "ties": 0.3}
    calls = []
    build(tmp_path, calls, settings).execute(log=lambda *_: None)
    calls.clear()
    build(tmp_path, calls, settings).execute(from_stage="merge", log=lambda *_: None)
    assert calls == ["merge:ties", "merge:ta", "report"]
    calls.clear()
    build(tmp_path, calls, settings).execute(only="merge:ta", log=lambda *_: None)
    assert calls == ["merge:ta"]
    with pytest.raises(ConfigError, match="no stage 'nope' in this run; stages: corpus, pretrain, merge, report"):
        build(tmp_path, calls, settings).execute(only="nope", log=lambda *_: None)
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="stage report needs merge:ties, merge:ta first"):
        build(fresh, [], settings).execute(only="report", log=lambda *_: None)


def test_plan_lines_show_cached_state(tmp_path):
    settings = {"block": 256, "steps": 10, "ties": 0.3}
    graph = build(tmp_path, [], settings)
    assert all("[to run]" in line for line in graph.plan_lines())
    graph.execute(log=lambda *_: None)
    assert all("[cached]" in line for line in build(tmp_path, [], settings).plan_lines())


HOLD_RUN_DIR = """
import sys, time
from workbench.pipelines.runner import LOCK
from workbench.outputs import OutputLock
OutputLock(sys.argv[1] + "/" + LOCK, "test").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_one_run_at_a_time_holds_a_run_directory(tmp_path):
    settings = {"block": 256, "steps": 10, "ties": 0.3}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_DIR, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        calls = []
        with pytest.raises(OutputError, match=rf"run directory {tmp_path} is in use by PID {holder.pid}"):
            build(tmp_path, calls, settings).execute(log=lambda *_: None)
        assert calls == []
    finally:
        holder.kill()
        holder.wait()
    calls = []
    build(tmp_path, calls, settings).execute(log=lambda *_: None)  # the killed run's lock is taken over
    assert calls == ["corpus", "pretrain", "merge:ties", "merge:ta", "report"]
    assert not (tmp_path / "run.lock").exists()


def test_until_runs_a_stage_and_what_it_needs_and_skips_finished_ones(tmp_path):
    settings = {"block": 256, "steps": 10, "ties": 0.3}
    calls = []
    records = build(tmp_path, calls, settings).execute(until="pretrain", log=lambda *_: None)
    assert calls == ["corpus", "pretrain"] and set(records) == {"corpus", "pretrain"}
    calls.clear()
    build(tmp_path, calls, settings).execute(log=lambda *_: None)
    assert calls == ["merge:ties", "merge:ta", "report"]  # the full run finds the CT stages done
    calls.clear()
    build(tmp_path, calls, settings).execute(until="merge:ties", from_stage="pretrain", log=lambda *_: None)
    assert calls == ["pretrain", "merge:ties"]


def test_every_stage_lives_in_one_folder_under_stages(tmp_path):
    records = build(tmp_path, [], {"block": 256, "steps": 10, "ties": 0.3}).execute(log=lambda *_: None)
    for name, record in records.items():
        folder = Path(record["path"])
        assert folder.parent == tmp_path / "stages" and folder.name.startswith(name.replace(":", "-") + "-")
        assert sorted(p.name for p in folder.iterdir()) == ["out.txt", "stage.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "stages"]


def test_a_forced_stage_starts_from_an_empty_folder(tmp_path):
    settings = {"block": 256, "steps": 10, "ties": 0.3}
    records = build(tmp_path, [], settings).execute(log=lambda *_: None)
    leftover = Path(records["pretrain"]["path"]) / "leftover.txt"
    leftover.write_text("from the last run")
    build(tmp_path, [], settings).execute(from_stage="pretrain", log=lambda *_: None)
    assert not leftover.exists()
