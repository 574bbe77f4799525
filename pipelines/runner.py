"""The runner: a graph of stages, each keyed by a hash of its inputs (which include its dependencies' keys),
so a rerun skips finished stages, resumes an interrupted one, and a changed setting reruns only the stages
downstream of it.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workbench.errors import ConfigError, OutputError
from workbench.outputs import OutputLock
from workbench.pipelines.stage import Stage, stage_for, write_json_atomic

LOCK = "run.lock"  # held while a run writes its directory


@dataclass
class StageSpec:
    """One stage of a run: `run(stage, deps)` does the work inside `stage.path` and returns its outputs."""

    name: str  # e.g. "corpus", "merge:ties_sv", "eval:language"
    inputs: dict  # plain data: config section, file hashes, code version (dependency keys are added)
    run: Callable  # (Stage, {dep name: record}) -> outputs dict
    deps: tuple = ()
    describe: str = ""  # one line for --dry-run
    downloads: tuple = ()  # hub ids this stage would fetch (for --dry-run)
    group: str = ""  # the stage kind users name in --from/--only (e.g. "merge" for "merge:ties")

    def __post_init__(self):
        self.group = self.group or self.name.split(":")[0]


@dataclass
class RunGraph:
    run_dir: Path
    specs: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)  # name -> Stage (keys resolved in order)

    def add(self, spec: StageSpec) -> Stage:
        for dep in spec.deps:
            if dep not in self.stages:
                raise ValueError(f"stage {spec.name}: dependency {dep} is not planned before it")
        inputs = dict(spec.inputs, _deps={dep: self.stages[dep].key for dep in spec.deps})
        safe = spec.name.replace(":", "-").replace("/", "-")
        stage = stage_for(self.run_dir / "stages", safe, inputs)
        self.specs.append(spec)
        self.stages[spec.name] = stage
        return stage

    def groups(self) -> list:
        return list(dict.fromkeys(s.group for s in self.specs))

    def _select(self, from_stage, only) -> set:
        """Stages to (re)run regardless of their records: those from `from_stage` on, or only `only`."""
        def matching(key):
            found = [s.name for s in self.specs if key in (s.name, s.group)]
            if not found:
                raise ConfigError(f"no stage {key!r} in this run; stages: {', '.join(self.groups())}")
            return found

        if only:
            return set(matching(only))
        if from_stage:
            first = self.specs.index(next(s for s in self.specs if s.name in matching(from_stage)))
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
        return lines

    def execute(self, *, from_stage=None, only=None, log=print) -> dict:
        """Run the stages in order; returns {name: record}. One run at a time holds the run directory."""
        forced = self._select(from_stage, only)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.run_dir}: cannot create the run directory: {e.strerror or e}") from None
        with OutputLock(self.run_dir / LOCK, f"run directory {self.run_dir}"):
            return self._execute(forced, from_stage, only, log)

    def _execute(self, forced, from_stage, only, log) -> dict:
        records = {}
        total = len(self.specs)
        for i, spec in enumerate(self.specs, 1):
            stage = self.stages[spec.name]
            if only and spec.name not in forced:
                if stage.done:
                    records[spec.name] = stage.record()
                continue
            if stage.done and spec.name not in forced:
                records[spec.name] = stage.record()
                log(f"[{i}/{total}] {spec.name}: done earlier ({stage.path.name}), skipped")
                continue
            missing = [d for d in spec.deps if d not in records]
            if missing:
                raise ConfigError(f"stage {spec.name} needs {', '.join(missing)} first; run without --only, "
                                  f"or with --from {missing[0].split(':')[0]}")
            log(f"[{i}/{total}] {spec.name}: {spec.describe}")
            started = time.perf_counter()
            if stage.done:  # forced: clear the record so an interrupted rerun is not taken as finished
                (stage.path / "stage.json").unlink()
            stage.start()
            outputs = spec.run(stage, {d: records[d] for d in spec.deps})
            seconds = time.perf_counter() - started
            records[spec.name] = stage.finish(outputs, seconds=round(seconds, 2))
            log(f"[{i}/{total}] {spec.name}: finished in {_clock(seconds)}")
        write_json_atomic(self.run_dir / "run.json", {
            "stages": {name: {"key": self.stages[name].key, "path": str(self.stages[name].path)}
                       for name in self.stages}})
        return records


def _clock(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def stage_output(record: dict, key: str) -> Path:
    """An output path of a finished stage (stored relative to its directory)."""
    path = Path(record["outputs"][key])
    return path if path.is_absolute() else Path(record["path"]) / path
