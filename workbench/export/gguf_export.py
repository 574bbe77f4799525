"""`workbench export`: a safetensors model folder to one GGUF file for llama.cpp, Ollama and LM Studio.

validate (output path, architecture, tensors, tokenizer) → write header, metadata and tensor table →
stream the tensors one at a time (read, permute, convert) → fsync, hash, rename into place → manifest.

Nothing is written until the whole plan is checked. The file is written as a hidden temporary sibling and
renamed when complete, so an interrupted or failed export leaves no partial `.gguf` where the finished one
is expected; `<out>.json` beside it records its sha256, size, type and the source folder's weight hashes.
"""
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench import __version__
from workbench.checkpoint import ModelReader
from workbench.errors import ConfigError
from workbench.export.gguf_model import add_hyperparameters, plan_model, tensor_data
from workbench.export.gguf_vocab import add_vocabulary, read_vocabulary
from workbench.merge.engine import _progress_bar

_HASH_CHUNK = 8 * 1024 * 1024


@dataclass
class ExportResult:
    path: Path
    manifest: Path
    out_type: str
    bytes: int
    sha256: str
    tensors: int
    seconds: float
    chat_template: str | None = None
    bos_token: str = ""
    stop_tokens: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def check_output(out, *, force: bool) -> Path:
    """The output path, refused before any work when it is not a .gguf file name or exists without `force`."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: expected an output file name ending in .gguf")
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; expected the path of the .gguf file to write")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it")
    return out


def export_gguf(model_dir, out, *, out_type: str = "f16", force: bool = False, name: str | None = None,
                license: str | None = None, progress: bool = True) -> ExportResult:
    """Write the model in `model_dir` to the GGUF file `out` (`out_type`: f16, bf16 or q8_0)."""
    import gguf

    started = time.perf_counter()
    out = check_output(out, force=force)
    model_dir = Path(model_dir)
    with ModelReader(model_dir) as reader:
        plan = plan_model(model_dir, reader, out_type)
        vocab = read_vocabulary(model_dir, plan.embedding_rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            writer = gguf.GGUFWriter(tmp, plan.arch)
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name or model_dir.name)
            if license:
                writer.add_license(license)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_hyperparameters(writer, plan)
            add_vocabulary(writer, vocab)
            _write_tensors(writer, plan, reader, progress, f"export {out_type}")
            digest = _fsync_and_hash(tmp)
            weights = reader.file_hashes()
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    result = ExportResult(path=out, manifest=manifest_path(out), out_type=out_type, bytes=out.stat().st_size,
                          sha256=digest, tensors=len(plan.tensors), seconds=time.perf_counter() - started,
                          chat_template=vocab.chat_template, stop_tokens=_stop_tokens(vocab),
                          bos_token=vocab.tokens[bos] if (bos := vocab.token_id("bos")) is not None else "",
                          notes=plan.notes + vocab.notes)
    _write_manifest(result, model_dir, weights, vocab)
    return result


def _write_tensors(writer, plan, reader, progress: bool, desc: str):
    """Tensor table first, then each tensor converted and written on its own: one tensor in memory at a time."""
    import numpy as np

    for t in plan.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = _progress_bar(sum(t.nbytes for t in plan.tensors), desc, progress)
    try:
        for i, t in enumerate(plan.tensors):
            writer.write_tensor_data(tensor_data(t, reader, plan))
            bar.set_postfix_str(f"{i + 1}/{len(plan.tensors)} tensors", refresh=False)
            bar.update(t.nbytes)
    finally:
        bar.close()
        writer.close()


def _fsync_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        while block := f.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stop_tokens(vocab) -> list:
    """Tokens that end a turn: the eos token and, for chat formats, the end-of-turn marker if distinct."""
    out = []
    eos = vocab.token_id("eos")
    if eos is not None:
        out.append(vocab.tokens[eos])
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
        if marker in vocab.tokens and marker not in out and (vocab.chat_template or "").find(marker) >= 0:
            out.append(marker)
    return out


def _write_manifest(result: ExportResult, model_dir: Path, weights: dict, vocab):
    data = {
        "file": result.path.name, "sha256": result.sha256, "bytes": result.bytes, "type": result.out_type,
        "tensors": result.tensors, "seconds": round(result.seconds, 2), "workbench_version": __version__,
        "source": {"folder": model_dir.name, "weights_sha256": weights},
        "tokenizer": {"model": vocab.model, "pre": vocab.pre, "tokens": len(vocab.tokens), "padded": vocab.padded,
                      "chat_template": vocab.chat_template is not None},
        "stop_tokens": result.stop_tokens, "notes": result.notes,
    }
    tmp = result.manifest.with_name(f".{result.manifest.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, result.manifest)
