"""Does a model agree with itself? config.json against the tensors' shapes, dtype labels against each other,
layer indices against the layer count: checked from the headers, before any size read from them allocates.

A config that disagrees with the weights gives a merged model that transformers refuses to load; a BF16
tensor relabelled I16 merges its bytes as integers; a tensor named `model.layers.10000000....` makes every
per-layer table ten million rows long. Each is refused here, naming the file, key or tensor and the value.
"""
import torch

from workbench.checkpoint.reader import EMBED, LM_HEAD, ModelReader
from workbench.checkpoint.safetensors_format import DTYPE_CODES
from workbench.errors import InvalidModelError
from workbench.merge.layers import place_of


# Weights a merge computes on: floats of 2 to 8 bytes. An integer, boolean or 1-byte float label among
# them changes what the bytes mean (a relabelled BF16 tensor read as I16 reaches values of 10^4).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (config key, tensor, dimension) for the names Llama-family models use in transformers.
MODEL_DIMS = (("vocab_size", EMBED, 0), ("vocab_size", LM_HEAD, 0), ("hidden_size", EMBED, 1),
              ("hidden_size", "model.norm.weight", 0))
LAYER_DIMS = (("intermediate_size", "mlp.gate_proj.weight", 0), ("intermediate_size", "mlp.up_proj.weight", 0),
              ("intermediate_size", "mlp.down_proj.weight", 1), ("hidden_size", "input_layernorm.weight", 0),
              ("hidden_size", "self_attn.q_proj.weight", 1), ("hidden_size", "mlp.down_proj.weight", 0))


def check_consistent(model: ModelReader, label: str | None = None):
    """Raise InvalidModelError listing every way `model`'s config, dtypes and layer names contradict it."""
    problems = _dtype_problems(model) + _config_problems(model) + _layer_problems(model)
    if problems:
        who = f"{label} ({model.path})" if label and label != str(model.path) else str(model.path)
        raise InvalidModelError(f"{who}: the model contradicts itself: " + "; ".join(problems[:5])
                                + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def _dtype_problems(model) -> list[str]:
    specs = [model.spec(n) for n in model.names]
    weights = {s.dtype for s in specs if s.dtype in WEIGHT_DTYPES}
    if not weights:
        return []
    shown = "/".join(sorted(str(d).replace("torch.", "") for d in weights))
    return [f"tensor {s.name!r} in {s.file.name} is labelled {_code(s.dtype)}, but the model's other tensors are "
            f"floating point ({shown}); a label that changes what the bytes mean is a corrupt header"
            for s in specs if s.dtype not in WEIGHT_DTYPES]


def _config_problems(model) -> list[str]:
    config = model.config
    out = []
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        value = config.get(key)
        if value is not None and not (type(value) is int and value > 0):
            out.append(f"config.json {key} = {value!r}, expected a positive integer")
    if out:
        return out
    for key, name, dim in MODEL_DIMS:
        out += _dim_problem(model, key, name, dim)
    layers = sorted({p.layer for p in map(place_of, model.names) if p.layer is not None})
    for layer in layers[:1] + layers[-1:]:  # the first and last layer stand for the rest; shapes are compared
        for key, suffix, dim in LAYER_DIMS:
            out += _dim_problem(model, key, f"model.layers.{layer}.{suffix}", dim)
        out += _heads_problems(model, layer)
    return out


def _dim_problem(model, key, name, dim) -> list[str]:
    value = model.config.get(key)
    if value is None or name not in model:
        return []
    shape = model.spec(name).shape
    if len(shape) <= dim or shape[dim] == value:
        return []
    return [f"config.json {key} = {value}, but tensor {name!r} has shape {list(shape)} (dimension {dim} is "
            f"{shape[dim]})"]


def _heads_problems(model, layer) -> list[str]:
    config = model.config
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if heads is None or hidden is None:
        return []
    head_dim = config.get("head_dim") or hidden // heads
    out = []
    for key, proj in (("num_attention_heads", "q_proj"), ("num_key_value_heads", "k_proj"),
                      ("num_key_value_heads", "v_proj")):
        n, name = config.get(key), f"model.layers.{layer}.self_attn.{proj}.weight"
        if n is None or name not in model:
            continue
        rows = model.spec(name).shape[0]
        if rows != n * head_dim:
            out.append(f"config.json {key} = {n} (x head_dim {head_dim} = {n * head_dim} rows), but tensor "
                       f"{name!r} has {rows} rows")
    return out


def _layer_problems(model) -> list[str]:
    """Layer indices must be 0 .. L-1 with none missing, L the config's num_hidden_layers when it says."""
    by_layer = {}
    for name in model.names:
        layer = place_of(name).layer
        if layer is not None:
            by_layer.setdefault(layer, name)
    if not by_layer:
        return []
    declared = model.config.get("num_hidden_layers")
    count = declared if type(declared) is int else len(by_layer)
    source = f"config.json num_hidden_layers = {declared}" if type(declared) is int else \
        f"the model stores {len(by_layer)} layers"
    outside = sorted(layer for layer in by_layer if layer >= count)
    if outside:
        layer = outside[-1]
        return [f"tensor {by_layer[layer]!r} has layer index {layer}, but {source} (layers 0 to {count - 1})"]
    if len(by_layer) < count:  # every index is below count, so some are missing: name the first
        first = next((i for i, layer in enumerate(sorted(by_layer)) if i != layer), len(by_layer))
        return [f"{source}, but no tensor of layer {first} is stored ({count - len(by_layer)} layer(s) missing)"]
    return []


def _code(dtype) -> str:
    return DTYPE_CODES.get(dtype, str(dtype))
