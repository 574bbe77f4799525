"""The runner: a graph of stages, each keyed by a hash of its inputs (which include its dependencies' keys),
so a rerun skips finished stages, resumes an interrupted one, and a changed setting reruns only the stages
downstream of it.

One folder scheme for a run: every stage lives in `<run>/stages/<name>-<key>/` (`merge:ties` is
`merge-ties-<key>`), which holds its record `stage.json` and everything it makes. What to run again although
finished (`--from`, `--only`) is an argument of `execute`, never state kept between runs.

Under `accelerate launch` every process runs the same graph: the main process runs the stages and writes the
records, the others wait and read them, except for stages marked `all_processes` (training), which every
process runs together.
"""
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workbench.errors import ConfigError, OutputError
from workbench.outputs import OutputLock
from workbench.pipelines.processes import barrier, is_main_process
from workbench.pipelines.stage import Stage, stage_for, write_json_atomic

STAGES = "stages"  # <run>/stages/<name>-<key>/
LOCK = "run.lock"  # held by the main process while a run writes its directory


@dataclass
class StageSpec:
    """One stage of a run: `run(stage, deps)` does the work inside `stage.path` and returns its outputs."""

    name: str  # e.g. "corpus", "merge:ties_sv"
    inputs: dict  # plain data: config section, file hashes, code version (dependency keys are added)
    run: Callable  # (Stage, {dep name: record}) -> outputs dict
    deps: tuple = ()
    describe: str = ""  # one line for --dry-run
    downloads: tuple = ()  # hub ids this stage would fetch (for --dry-run)
    notes: tuple = ()  # more lines for --dry-run (a training stage's memory per GPU)
    group: str = ""  # the stage kind users name in --from/--only (e.g. "merge" for "merge:ties")
    all_processes: bool = False  # under accelerate, every process runs it (training); else the main one alone

    def __post_init__(self):
        self.group = self.group or self.name.split(":")[0]


@dataclass
class RunGraph:
    run_dir: Path
    specs: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)  # name -> Stage (keys resolved in order)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()  # records name absolute paths, whatever the working directory

    def add(self, spec: StageSpec) -> Stage:
        for dep in spec.deps:
            if dep not in self.stages:
                raise ValueError(f"stage {spec.name}: dependency {dep} is not planned before it")
        inputs = dict(spec.inputs, _deps={dep: self.stages[dep].key for dep in spec.deps})
        safe = spec.name.replace(":", "-").replace("/", "-")
        stage = stage_for(self.run_dir / STAGES, safe, inputs)
        self.specs.append(spec)
        self.stages[spec.name] = stage
        return stage

    def groups(self) -> list:
        return list(dict.fromkeys(s.group for s in self.specs))

    def matching(self, key: str) -> list:
        """The stages a user's name means: a stage (`merge:ties`) or a group (`merge`)."""
        found = [s.name for s in self.specs if key in (s.name, s.group)]
        if not found:
            raise ConfigError(f"no stage {key!r} in this run; stages: {', '.join(self.groups())}")
        return found

    def upstream(self, names) -> set:
        """These stages and every stage they depend on."""
        deps = {s.name: s.deps for s in self.specs}
        todo, found = list(names), set()
        while todo:
            name = todo.pop()
            if name not in found:
                found.add(name)
                todo.extend(deps[name])
        return found

    def forced(self, from_stage=None, only=None) -> set:
        """Stages to run again although finished: those from `from_stage` on, or only `only`."""
        if only:
            return set(self.matching(only))
        if from_stage:
            first = self.specs.index(next(s for s in self.specs if s.name in self.matching(from_stage)))
            return {s.name for s in self.specs[first:]}
        return set()

    def plan_lines(self) -> list:
        """What a run would do: each stage, cached or not, and what it downloads."""
        lines = []
        for i, spec in enumerate(self.specs, 1):
            stage = self.stages[spec.name]
            state = "cached" if stage.done else "to run"
            lines.append(f"{i:>2}. {spec.name:<24} [{state}] {spec.describe}")
            for hub_id in spec.downloads:
                lines.append(f"      would download: {hub_id}")
            lines.extend(f"      {note}" for note in spec.notes)
        return lines

    def execute(self, *, from_stage=None, only=None, until=None, log=print) -> dict:
        """Run the stages in order; returns {name: record} of every stage run or found finished.

        `from_stage`: run that stage and everything after it again; `only`: only that stage (its inputs must be
        finished); `until`: only that stage and what it depends on (finished ones skipped), e.g. the CT stages
        for `workbench pretrain`. One run at a time holds the run directory (its main process takes the lock;
        the other processes of an `accelerate launch` run work under it).
        """
        main = is_main_process()
        if main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{self.run_dir}: cannot create the run directory: {e.strerror or e}") from None
        lock = OutputLock(self.run_dir / LOCK, f"run directory {self.run_dir}") if main else contextlib.nullcontext()
        with lock:
            return self._execute(from_stage, only, until, log, main)

    def _execute(self, from_stage, only, until, log, main) -> dict:
        forced = self.forced(from_stage, only)
        wanted = self.upstream(self.matching(until)) if until else {s.name for s in self.specs}
        say = log if main else (lambda *_: None)
        # Every process decides the same plan before any of them writes (the barrier), so they meet at the
        # same barriers below.
        to_run = forced if only else {s.name for s in self.specs
                                      if s.name in wanted and (s.name in forced or not self.stages[s.name].done)}
        barrier()
        records = {}
        total = len(self.specs)
        for i, spec in enumerate(self.specs, 1):
            stage = self.stages[spec.name]
            if spec.name not in to_run:
                if spec.name in wanted and stage.done:
                    records[spec.name] = stage.record()
                    if not only:
                        say(f"[{i}/{total}] {spec.name}: done earlier ({stage.path.name}), skipped")
                continue
            missing = [d for d in spec.deps if d not in records]
            if missing:
                raise ConfigError(f"stage {spec.name} needs {', '.join(missing)} first; run without --only, "
                                  f"or with --from {missing[0].split(':')[0]}")
            records[spec.name] = self._run(spec, stage, records, fresh=spec.name in forced, main=main,
                                           say=lambda text: say(f"[{i}/{total}] {spec.name}: {text}"))
        if main:
            write_json_atomic(self.run_dir / "run.json", {
                "stages": {name: {"key": self.stages[name].key, "path": str(self.stages[name].path)}
                           for name in self.stages}})
        return records

    def _run(self, spec: StageSpec, stage: Stage, records: dict, *, fresh: bool, main: bool, say) -> dict:
        """Run one stage (in the main process, or in all of them for `all_processes`); returns its record."""
        say(spec.describe)
        for note in spec.notes:  # what --dry-run warned of (e.g. a training stage that cannot fit its GPUs)
            if note.strip().startswith("warning:"):
                say(note.strip())
        started = time.perf_counter()
        if main:
            stage.start(fresh=fresh)
        if spec.all_processes:
            barrier()  # the folder exists (and a forced one is empty) before any process works in it
        if main or spec.all_processes:
            outputs = spec.run(stage, {d: records[d] for d in spec.deps})
        if main:
            seconds = time.perf_counter() - started
            record = stage.finish(outputs, seconds=round(seconds, 2))
            say(f"finished in {clock(seconds)}")
        barrier()
        return record if main else stage.record()


def clock(seconds: float) -> str:
    """A duration for progress lines: seconds up to two minutes, then minutes."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def stage_output(record: dict, key: str) -> Path:
    """An output path of a finished stage (stored relative to its directory, or as a path)."""
    path = Path(record["outputs"][key])
    return path if path.is_absolute() else Path(record["path"]) / path

