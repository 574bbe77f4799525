"""What a stage key knows of a model or tokenizer directory: enough to notice when it changes.

Small files (config, tokenizer) are hashed whole. Weight files are named by size and modification time
rather than hashed: hashing an 8B model on every run would cost a minute, and a model that comes out of
another stage already sits in a directory whose name is that stage's key.
"""
from pathlib import Path

from workbench.errors import ConfigError
from workbench.pipelines.stage import file_sha256

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def tokenizer_identity(model_dir) -> dict:
    """Content hashes of the tokenizer files in a model (or tokenizer) directory."""
    d = Path(model_dir)
    found = {name: file_sha256(d / name) for name in TOKENIZER_FILES if (d / name).is_file()}
    if not found:
        raise ConfigError(f"{d}: no tokenizer files; expected a Hugging Face model directory with tokenizer.json "
                          f"or tokenizer.model")
    return found


def model_identity(model_dir) -> dict:
    """The model's config and tokenizer hashes, and the size and mtime of each weight file."""
    d = Path(model_dir).resolve()
    if not (d / "config.json").is_file():
        raise ConfigError(f"{d}: not a Hugging Face model directory (no config.json); expected the folder that "
                          f"`save_pretrained` writes")
    weights = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
               for p in sorted(d.iterdir()) if p.suffix in WEIGHT_SUFFIXES and p.is_file()}
    return {"path": str(d), "config": file_sha256(d / "config.json"), "weights": weights,
            "tokenizer": tokenizer_identity(d)}
