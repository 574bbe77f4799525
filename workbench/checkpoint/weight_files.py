"""Which files of a model directory hold its weights, and the one guarded way to read a pickle."""
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import CheckpointError, UnsafeCheckpointError
from workbench.user_files import read_json, special_kind

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Files a training run leaves beside the weights; they are pickles too, but not weights.
# Every file of a model directory that workbench may read or copy: weights, config, tokenizer files.
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".gguf", ".model", ".txt", ".jinja") + PICKLE_SUFFIXES
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")


@dataclass
class WeightFiles:
    """The weight files of a model directory: `format` is "safetensors", "pickle" or "gguf"."""

    format: str
    files: list[Path]
    index: Path | None = None
    weight_map: dict[str, str] | None = field(default=None, repr=False)


def find_weight_files(path) -> WeightFiles:
    """Locate the weights of the model directory `path`, safetensors first; CheckpointError if there are none.

    Order of preference: `model.safetensors.index.json`, `model.safetensors`, any other `*.safetensors`
    (PEFT's `adapter_model.safetensors` excepted), then pickles (`pytorch_model.bin.index.json`,
    `pytorch_model.bin`, `*.bin`, `*.pt`, `*.pth`), then `*.gguf`. Pickles are reported, never loaded here.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected a Hugging Face model directory "
                              f"with config.json and model*.safetensors)")
    _refuse_special_files(path)
    if (path / SAFETENSORS_INDEX).is_file():
        return _from_index(path / SAFETENSORS_INDEX, "safetensors")
    if (path / SAFETENSORS_SINGLE).is_file():
        return WeightFiles("safetensors", [path / SAFETENSORS_SINGLE])
    others = sorted(p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if others:
        return WeightFiles("safetensors", others)
    if (path / PICKLE_INDEX).is_file():
        return _from_index(path / PICKLE_INDEX, "pickle")
    if (path / PICKLE_SINGLE).is_file():
        return WeightFiles("pickle", [path / PICKLE_SINGLE])
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                     and p.name not in NOT_WEIGHTS and not p.name.startswith("rng_state"))
    if pickles:
        return WeightFiles("pickle", pickles)
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return WeightFiles("gguf", ggufs)
    if (path / "adapter_model.safetensors").is_file():
        raise CheckpointError(f"{path} holds a PEFT adapter (adapter_model.safetensors), not a full model: "
                              f"merge the adapter into its base and save the result (merge_and_unload, "
                              f"save_pretrained) first")
    raise CheckpointError(f"{path}: no model weights found (expected model.safetensors or "
                          f"model-*-of-*.safetensors with {SAFETENSORS_INDEX})")


def _refuse_special_files(path: Path):
    """A FIFO or a device named like a model file would block or never end when read: refused unopened."""
    for entry in path.iterdir():
        if entry.name.endswith(MODEL_FILE_SUFFIXES):
            kind = special_kind(entry)
            if kind is not None:
                raise CheckpointError(f"{entry}: is {kind}, not a regular file; expected the model's weights, "
                                      f"config and tokenizer in regular files")


def _from_index(index: Path, fmt: str) -> WeightFiles:
    """Shard files named by an index's weight_map, in order of their names; each must exist."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: corrupt shard index (expected a \"weight_map\" of tensor name -> file)")
    files = []
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        if Path(name).name != name:
            raise CheckpointError(f"{index}: shard {name!r} is not a plain file name in the model directory")
        kind = special_kind(shard)
        if kind is not None:
            raise CheckpointError(f"{shard}: is {kind}, not a regular file; expected a safetensors shard")
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard file listed in {index.name} is missing")
        files.append(shard)
    return WeightFiles(fmt, files, index, weight_map)


def load_pickle_checkpoint(file) -> dict[str, torch.Tensor]:
    """Read a pickled state dict with `torch.load(weights_only=True)`, memory-mapped when the format allows.

    weights_only refuses every pickle opcode that could run code (only tensors, containers and primitive
    types load). Call only when the user passed allow_pickle.
    """
    file = Path(file)
    try:
        try:
            obj = torch.load(file, weights_only=True, mmap=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # The legacy (pre-zip) torch.save format cannot be memory-mapped: read it whole.
            obj = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's own message suggests weights_only=False; that is exactly what must not be done here.
        reason = next((line.strip() for line in str(e).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line), "").rstrip(".")
        raise UnsafeCheckpointError(f"{file}: refused by torch.load(weights_only=True): the pickle holds objects "
                              f"other than tensors (loading it could run code){': ' + reason if reason else ''}. "
                              f"Do not load it unless you trust its source") from None
    except Exception as e:  # torch raises RuntimeError, EOFError ... for truncated or foreign files
        raise CheckpointError(f"{file}: cannot load with torch.load(weights_only=True): {e}") from None
    # Some training scripts nest the weights one level down.
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{file}: expected a state dict (tensor name -> tensor), "
                              f"got {type(obj).__name__}")
    return obj
