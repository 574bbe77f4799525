"""Run a merge: validate → plan → stream tensor by tensor through the kernels into a sharded writer.

Peak memory is about (T + 2) × the largest tensor: each input tensor is a private copy-on-write map of
its file, released as soon as its output is computed (or, where the output is the input, written). On CPU
every output is computed into one of two reusable buffers: writing over a map's pages would copy each page
on first write (docs/benchmarks.md, "Whole merges against mergekit", has the measurement); on GPU the output
may be written over the base's device copy, and copies to and from the GPU overlap its compute
(`staging.Inputs`). A writer thread writes, hashes and fsyncs op i's output while op i + 1 is computed into
the other buffer (`_WriteBehind`).
An interrupted merge resumes from its last finished shard; the output directory appears only when
complete (the writer renames it into place). The output never touches an input, and one merge at a time
writes it (workbench/outputs.py); a failed merge leaves a `.partial` only when a rerun can resume from it.
"""
import math
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from workbench import __version__
from workbench.analysis import expert_delta_stats, extended_label, layer_profile
from workbench.checkpoint import ModelReader, ShardedWriter, check_compatible
from workbench.checkpoint.writer import PART_BYTES
from workbench.config.loader import read_yaml
from workbench.config.schema import Where, parse, to_dict
from workbench.errors import CheckpointError, ConfigError, NonFiniteError
from workbench.kernels.cpu_native import count_nonfinite
from workbench.kernels.dispatch import kernel_backend
from workbench.kernels.layer_swap import lerp_
from workbench.kernels.topk_threshold import topk_select_multi
from workbench.merge.card import build_report, render_card
from workbench.merge.methods import Expert, TensorMerge, merge_tensor, tensor_seed
from workbench.merge.model_card import publication
from workbench.merge.plan import build_plan
from workbench.merge.recipe import MergeRecipe
from workbench.merge.staging import Inputs, overlap_setting
from workbench.outputs import OutputLock, check_apart, writer_paths
from workbench.provenance import file_identity, fingerprint
from workbench.user_files import refuse_special

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Failures whose fix changes what the merge is computed from (the input files, or allow_nonfinite), so the
# rerun's resume key differs and the finished shards of this run could never be used.
_UNRESUMABLE = (NonFiniteError, CheckpointError)


@dataclass
class MergeResult:
    out_dir: Path
    report: dict
    seconds: float


def load_recipe(path) -> tuple[MergeRecipe, Path]:
    """Read and validate a recipe file; model paths in it are relative to its folder."""
    path = Path(path)
    refuse_special(path, ConfigError)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file")
    raw = read_yaml(path, str(path))
    return parse(MergeRecipe, raw, Where(str(path))), path.resolve().parent


def resolve_paths(recipe: MergeRecipe, base_dir: Path, source="recipe") -> dict:
    """{reference: model directory} for a standalone recipe whose references are paths."""
    models = {}
    for ref in recipe.references():
        path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
        if not path.is_dir():
            raise ConfigError(f"{source}: model {ref!r}: no such model directory ({path})")
        models[ref] = path
    return models


def _pick_device(requested):
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for (by the recipe's device key, or workbench merge --device), "
                          "but no CUDA device is available; expected device cpu or auto")
    return torch.device(requested)


class _Scratch:
    """Two CPU output buffers used in turn, one op each, grown to the largest: their pages are faulted in once.

    The writer thread writes op i's output while op i + 1 is computed into the other buffer, so a view
    handed out for an op stays valid until the op after next begins (`next_op`); the engine waits for op i's
    write before op i + 2 starts. One `take` per op. On other devices each output is a fresh tensor (the
    caching allocator reuses memory itself).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bufs = [None, None]
        self.slot, self.taken = 0, False

    def next_op(self):
        self.slot, self.taken = 1 - self.slot, False

    def take(self, shape, dtype) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=self.device)
        if self.taken:
            raise RuntimeError("internal error: a second scratch output in one op would overwrite the first")
        self.taken = True
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self.bufs[self.slot]
        if buf is None or buf.numel() < nbytes:
            self.bufs[self.slot] = buf = None  # the old buffer goes before the bigger one is allocated
            self.bufs[self.slot] = buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` lies in a scratch buffer (else it may be an input's map, as a copy op's output is)."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(b is not None and b.untyped_storage().data_ptr() == ptr for b in self.bufs)


class _Executor:
    """Compute one output tensor from its op and input tensors."""

    def __init__(self, plan, selections: dict, allow_nonfinite: bool, seed: int, device: torch.device,
                 nonfinite_option: str | None = "--allow-nonfinite"):
        self.plan, self.selections = plan, selections
        self.allow_nonfinite, self.seed = allow_nonfinite, seed
        self.fix = "fix the model" + (f", or pass {nonfinite_option} to merge anyway (non-finite deltas count "
                                      f"as 0)" if nonfinite_option else "")
        self.scratch = _Scratch(device)
        self.inplace = device.type != "cpu"  # a device copy of the base may become the output

    def extended_tail(self, op, inputs):
        """The extended model's tensor, whose rows [V, V') this output takes (docs/design.md §4.6a), or None."""
        return inputs[self.plan.extended] if op.extra else None

    def check_finite(self, op, ref, tensor, release=None):
        """NaN/Inf count of input `ref`'s tensor (an error unless allow_nonfinite). With `release`, a big
        tensor is counted in parts of PART_BYTES bytes, each handed to release(start, end) once counted, so a
        copied tensor is never resident whole (its writer reads it again, part by part)."""
        if release is None or tensor.nbytes <= PART_BYTES:
            bad = count_nonfinite(tensor)
        else:
            flat, size = tensor.reshape(-1), tensor.element_size()
            step, bad = PART_BYTES // size, 0
            for start in range(0, flat.numel(), step):
                part = flat[start:start + step]
                bad += count_nonfinite(part)
                release(start * size, (start + part.numel()) * size)
        if bad and not self.allow_nonfinite:
            raise NonFiniteError(f"tensor {op.name} of model {ref}: {bad} NaN/Inf value(s); {self.fix}")
        return bad

    def compute(self, op, inputs: dict, release=None) -> tuple[torch.Tensor, dict]:
        """The op's output and its record. release(ref, start, end), where given, drops the pages of bytes
        [start, end) of input `ref`'s map that a copy op has read (`check_finite`)."""
        if op.kind == "copy":
            src = inputs[op.source]
            bad = self.check_finite(op, op.source, src,
                                    release=None if release is None else partial(release, op.source))
            out = self._assemble(op, inputs, src.to(op.dtype))
            record = {"op": "copy", "source": op.source}
            if bad:
                record["nonfinite"] = bad
            return out, record
        if op.kind == "merge":
            out, info = self._merge(op, inputs)
            return out, {"op": "merge", **info}
        # swap: (1 − α)·middle + α·language, in the middle tensor's buffer (a private one)
        if op.recipe is not None:
            middle, info = self._merge(op, inputs)
        else:
            middle, info = inputs[op.source], {"source": op.source}
            self.check_finite(op, op.source, middle)
            if not self.inplace or middle.dtype != op.dtype:
                middle = self.scratch.take(middle.shape, op.dtype).copy_(middle)
        language = inputs[op.language]
        self.check_finite(op, op.language, language)
        lerp_(middle, language, op.alpha)
        return middle, {"op": "swap", "alpha": op.alpha, "language": op.language, **info,
                        "kernels": kernel_backend(middle, language)}

    def _assemble(self, op, inputs, shared):
        """Add the extended model's new rows to a tensor of the shared rows (docs/design.md §4.6a)."""
        tail = self.extended_tail(op, inputs)
        if tail is None or shared.shape[0] == op.shape[0]:
            return shared
        out = torch.empty(op.shape, dtype=op.dtype, device=shared.device)
        out[: shared.shape[0]] = shared
        out[shared.shape[0]:] = tail[shared.shape[0]:].to(op.dtype)
        return out

    def _merge(self, op, inputs):
        recipe = op.recipe
        base = inputs[recipe.base] if recipe.base else None
        experts = [inputs[e.model] for e in recipe.models]
        rows = self.plan.shared_rows if self.extended_tail(op, inputs) is not None else None
        if rows is not None:
            base = base[:rows] if base is not None else None
            experts = [e[:rows] for e in experts]
        if self.inplace and base is not None and base.dtype == op.dtype and rows is None:
            out = base  # in place: the base's device copy becomes the output
        else:
            shape = (rows,) + tuple(op.shape[1:]) if rows is not None else op.shape
            out = self.scratch.take(shape, op.dtype)
        scoped = self.selections.get(op.name) if recipe.scope == "model" else None
        job = TensorMerge(name=op.name, base=base, out=out, lam=recipe.lam, normalize=recipe.normalize,
                          consensus=recipe.consensus, trim_ties=recipe.trim_ties,
                          seed=tensor_seed(self.seed, zlib.crc32(op.name.encode())),
                          experts=[Expert(tensor, weight=e.weight, density=e.density, slack=e.slack,
                                          selection=scoped[i] if scoped else None)
                                   for i, (tensor, e) in enumerate(zip(experts, recipe.models))])
        result, info = merge_tensor(recipe.method, job)
        if any(info.nonfinite) and not self.allow_nonfinite:
            which = ", ".join(f"{e.model} ({n})" for e, n in zip(recipe.models, info.nonfinite) if n)
            raise NonFiniteError(f"tensor {op.name}: NaN/Inf in the delta of {which} (in the expert or in the base "
                                 f"{recipe.base}); {self.fix}")
        return self._assemble(op, inputs, result), info.as_record()


def _scope_selections(recipe, readers, names) -> tuple[dict, list]:
    """Model scope (docs/design.md §4.2): each expert's exact selections over every trimmed tensor together.

    Returns ({tensor name: [(keep, protect or None) per expert]}, [(keep, protect) over the whole pool per
    expert]); ties at a threshold are taken in pool order, then flat index order.
    """
    if recipe.scope != "model":
        return {}, []
    pool = [n for n in names if not any(part in n for part in recipe.scope_exclude)]
    base = readers[recipe.base]
    per_tensor = {name: [] for name in pool}
    wholes = []
    for entry in recipe.models:
        expert = readers[entry.model]

        def pairs(expert=expert):
            for name in pool:
                b, e = base.get(name), expert.get(name)
                if e.shape != b.shape:
                    e = e[: b.shape[0]]
                yield b, e
                base.release(name)
                expert.release(name)

        fractions = [entry.density] + ([entry.slack] if entry.slack > 0 else [])
        found = topk_select_multi(pairs, fractions, ties=recipe.trim_ties)
        keep, protect = found[0], (found[1] if entry.slack > 0 else None)
        for i, name in enumerate(pool):
            per_tensor[name].append((keep.parts[i], protect.parts[i] if protect else None))
        wholes.append((keep.whole, protect.whole if protect else None))
    return per_tensor, wholes


def _auto_profiles(recipe, readers, names, progress) -> dict | None:
    cfg = recipe.layer_swap
    if cfg is None or "auto" not in (cfg.bottom, cfg.top):
        return None
    base = readers[recipe.base]
    return {ref: layer_profile(expert_delta_stats(base, readers[ref], names)) for ref in (cfg.language, cfg.task)}


def run_merge(recipe: MergeRecipe, models: dict, out_dir, *, device=None, allow_nonfinite=False, overwrite=False,
              max_shard_bytes=DEFAULT_SHARD_BYTES, progress=True, source="recipe", protected=None,
              nonfinite_option="--allow-nonfinite", card=None) -> MergeResult:
    """Merge `models` ({reference in the recipe: model directory}) by `recipe` into `out_dir`.

    `protected` ({label: path}) names more inputs the output must stay apart from (the recipe file);
    `nonfinite_option` is the caller's switch for allow_nonfinite, named in errors (None: there is none);
    `card`: what the caller knows for the model card (see `model_card.publication`): input origins,
    languages, datasets, how the merge was made.
    """
    started = time.perf_counter()
    missing = [ref for ref in recipe.references() if ref not in models]
    if missing:
        raise ConfigError(f"{source}: no model directory for {', '.join(map(repr, missing))}")
    paths = writer_paths(out_dir)
    check_apart(paths, {**{ref: models[ref] for ref in recipe.references()}, **(protected or {})})
    device = _pick_device(device or recipe.device)
    overlap = overlap_setting()  # a bad WORKBENCH_CUDA_OVERLAP fails here, before any output
    with OutputLock(paths["lock file"], f"output {paths['output']}") as lock:
        return _merge_locked(recipe, models, out_dir, device, allow_nonfinite, overwrite, max_shard_bytes,
                             progress, nonfinite_option, started, lock, card, overlap)


def _merge_locked(recipe, models, out_dir, device, allow_nonfinite, overwrite, max_shard_bytes, progress,
                  nonfinite_option, started, lock, card, overlap) -> MergeResult:
    readers = {ref: ModelReader(models[ref]) for ref in recipe.references()}
    inputs = Inputs(readers, device, overlap)
    writer = None
    try:
        compat = check_compatible(readers, extended_vocab=extended_label(readers))
        dtypes = {ref: {n: r.spec(n).dtype for n in r.names} for ref, r in readers.items()}
        profiles = _auto_profiles(recipe, readers, compat.names, progress)
        plan = build_plan(recipe, compat, dtypes, profiles)
        selections, scope_wholes = _scope_selections(recipe, readers, compat.names)
        identity = {ref: [file_identity(f) for f in sorted(r.files)] for ref, r in readers.items()}
        resume_key = fingerprint({"recipe": to_dict(recipe), "inputs": identity, "allow_nonfinite": allow_nonfinite,
                                  "version": __version__}, length=32)
        writer = ShardedWriter(out_dir, [(op.name, op.shape, op.dtype) for op in plan.ops],
                               max_shard_bytes=max_shard_bytes, source_dir=models[plan.config_source],
                               resume_key=resume_key, overwrite=overwrite, lock=lock)
        ops = {op.name: op for op in plan.ops}
        pending = [ops[name] for name in writer.pending()]
        executor = _Executor(plan, selections, allow_nonfinite, recipe.seed, device, nonfinite_option)
        _stream(pending, inputs, executor, writer, recipe, progress)
        elapsed = time.perf_counter() - started
        report = build_report(recipe, models, readers, plan, compat, writer.records(), scope_wholes,
                              profiles, elapsed, device)
        report["publication"] = publication(report, card)
        writer.extra_files.update({"merge_report.json": _json(report), "README.md": render_card(report)})
        if recipe.dtype != "auto":
            writer.extra_files["config.json"] = _config_with_dtype(models[plan.config_source], recipe.dtype)
        out = writer.finalize()
        return MergeResult(out_dir=out, report=report, seconds=time.perf_counter() - started)
    except BaseException as error:
        if writer is not None:
            kept = writer.abandon(keep=not isinstance(error, _UNRESUMABLE))
            if kept is not None:
                error.add_note(f"the finished shards are kept in {kept}: rerun the same command to resume, "
                               f"or delete it")
        raise
    finally:
        inputs.close()
        for reader in readers.values():
            reader.close()


LOG_INTERVAL_S = 15.0  # a log (stderr not a terminal) gets a progress line at most this often


class _LogProgress:
    """The progress bar's stand-in where stderr is not a terminal: plain lines, no carriage returns,
    at most one per LOG_INTERVAL_S (so a short merge writes none; the command's summary follows)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.postfix = total, desc, 0, ""
        self.last = time.monotonic()

    def update(self, n: int):
        self.done += n
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL_S and self.done < self.total:
            self.last = now
            percent = 100 * self.done // self.total if self.total else 100
            print(f"{self.desc}: {percent}% of {self.total / 1e6:.1f} MB ({self.postfix})", file=sys.stderr,
                  flush=True)

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.postfix = text

    def close(self):
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return _LogProgress(total, desc)
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)


class _WriteBehind:
    """The writer's work (file writes, sha256, each shard's fsync) on one thread, one output behind the
    compute: op i is written while op i + 1 is computed. At most one write is in flight; an error in it is
    raised in the engine's thread at the next `submit` or at `drain`. `ready`, where given, is called on the
    writer thread before the write (it waits for the output's download from the GPU)."""

    def __init__(self, writer):
        self.writer = writer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")
        self.future = None

    def wait(self):
        future, self.future = self.future, None
        if future is not None:
            future.result()

    def submit(self, name, tensor, record, then=None, written=None, ready=None):
        self.wait()

        def work():
            if ready is not None:
                ready()
            self.writer.write(name, tensor, record, written=written)
            if then is not None:
                then()

        self.future = self.pool.submit(work)

    def drain(self):
        """Wait for the last write (raising its error) and stop the thread."""
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _stream(pending, inputs, executor, writer, recipe, progress):
    total = sum(op.dtype.itemsize * math.prod(op.shape) for op in pending)
    bar = _progress_bar(total, f"merge {recipe.method}", progress)
    behind = _WriteBehind(writer)
    on_cpu = inputs.device.type == "cpu"
    try:
        for i, op in enumerate(pending):
            inputs.prefetch(pending[i + 1] if i + 1 < len(pending) else None)
            executor.scratch.next_op()
            tensors = inputs.take(op)
            out, record = executor.compute(op, tensors, release=partial(inputs.release_part, op) if on_cpu else None)
            copied = op.kind == "copy" and out.data_ptr() == tensors[op.source].data_ptr()
            del tensors
            if not on_cpu:
                out, ready = inputs.to_host(out)
                behind.submit(op.name, out, record, ready=ready)
                inputs.release(op)
            elif executor.scratch.owns(out):
                behind.submit(op.name, out, record)
                inputs.release(op)
            else:  # the output may be an input's map (a copy op's is): the op's pages go once it is written,
                # a copy's part by part as the writer goes (a big embedding is never resident whole)
                written = partial(inputs.release_part, op, op.source) if copied else None
                behind.submit(op.name, out, record, then=lambda op=op: inputs.release(op), written=written)
            del out
            bar.set_postfix_str(f"{i + 1}/{len(pending)} tensors", refresh=False)  # redrawn at tqdm's own pace
            bar.update(op.dtype.itemsize * math.prod(op.shape))
        behind.drain()
    finally:
        try:
            behind.drain()  # an error stops the loop with a write in flight: it ends before the writer closes
        except BaseException:
            pass  # the loop's own error is the one raised
        bar.close()
        writer.close()



def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"


def _config_with_dtype(source_dir, dtype: str) -> str:
    import json

    config = json.loads((Path(source_dir) / "config.json").read_text(encoding="utf-8"))
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = dtype
    return json.dumps(config, indent=2) + "\n"
