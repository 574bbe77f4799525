"""A Llama-family model folder as llama.cpp's `llama` architecture: hyperparameters, rope settings, and the
plan of tensors (GGUF name, shape, storage type) with the conversion each one needs.

Tensor names come from gguf-py's mapping (`gguf.get_tensor_name_map`). Two layouts differ from the Hugging
Face checkpoint and are converted as llama.cpp's own converter does:
- q_proj and k_proj rows are permuted per head from Hugging Face's rotate-half order to the interleaved
  pairs that llama.cpp's rope expects (transformers' GGUF reader undoes exactly this permutation);
- a tied LM head is not written: llama.cpp (and transformers) use `token_embd.weight` when `output.weight`
  is absent.
Llama 3 rope scaling becomes a `rope_freqs` tensor of per-frequency divisors, computed from transformers'
own rope functions; linear scaling becomes the `rope.scaling.*` keys.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.errors import CheckpointError, UnsupportedModelError

# Hugging Face architecture -> llama.cpp architecture. Mistral's dense models are Llama-shaped; llama.cpp's
# own converter writes them as `llama` too.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
OUTPUT_TYPES = ("f16", "bf16", "q8_0")
ROPE_TYPES = ("default", "linear", "llama3")
Q8_0_BLOCK = 32


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from and how it is stored."""

    source: str | None  # Hugging Face tensor name (None: computed, e.g. rope_freqs)
    name: str  # GGUF tensor name
    shape: tuple  # numpy order (rows, columns)
    qtype: object  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: rope row permutation with this many heads

    @property
    def nbytes(self) -> int:
        import gguf

        byte_shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
        return int(np.prod(byte_shape)) if byte_shape else 0


@dataclass
class ModelPlan:
    """Everything about the model (not the tokenizer) that goes into the file."""

    arch: str
    config: object  # transformers PretrainedConfig
    tensors: list
    rope: dict
    file_type: int  # gguf.LlamaFileType
    notes: list

    @property
    def embedding_rows(self) -> int:
        return next(t.shape[0] for t in self.tensors if t.name == "token_embd.weight")


def read_config(model_dir):
    """The model's transformers config, or an error naming what is wrong with the folder."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: not a config transformers can read ({e})") from None
    names = list(getattr(config, "architectures", None) or [])
    supported = [n for n in names if n in ARCHITECTURES]
    if not supported:
        raise UnsupportedModelError(
            f"{model_dir / 'config.json'}: architecture {', '.join(names) or config.model_type} cannot be "
            f"exported to GGUF by workbench; expected one of: {', '.join(ARCHITECTURES)}")
    return config


def rope_settings(config, where) -> dict:
    """{"type", "theta", ...} from a config of any transformers version (rope_parameters or rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"{where}: rope type {rope_type!r} cannot be written for llama.cpp's llama "
                                    f"architecture by workbench; expected one of: {', '.join(ROPE_TYPES)}")
    return {**params, "type": rope_type, "theta": float(params["rope_theta"])}


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def plan_model(model_dir, reader, out_type: str) -> ModelPlan:
    """Check the folder and plan every tensor, before anything is written."""
    import gguf

    if out_type not in OUTPUT_TYPES:
        raise UnsupportedModelError(f"output type {out_type!r}; expected one of: {', '.join(OUTPUT_TYPES)}")
    config = read_config(model_dir)
    rope = rope_settings(config, Path(model_dir) / "config.json")
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = reader.is_tied
    tensors, notes = [], []
    for source in reader.names:
        if source.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every runtime from the rope settings
        if source == "lm_head.weight" and tied:
            continue
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"{model_dir}: tensor {source!r} has no place in llama.cpp's llama "
                                        f"architecture; expected only Llama tensors")
        shape = tuple(reader.spec(source).shape)
        permute = 0
        if ".attn_q." in name:
            permute = heads
        elif ".attn_k." in name:
            permute = kv_heads
        tensors.append(TensorPlan(source, name, shape, _storage(name, shape, out_type, notes), permute))
    if not tied and "lm_head.weight" not in reader:
        raise CheckpointError(f"{model_dir}: config.json says tie_word_embeddings: false, but no lm_head.weight "
                              f"is stored; expected the LM head")
    if not any(t.name == "token_embd.weight" for t in tensors):
        raise CheckpointError(f"{model_dir}: no model.embed_tokens.weight; expected a Llama checkpoint")
    if rope["type"] == "llama3":
        tensors.append(TensorPlan(None, "rope_freqs.weight", (head_dim(config) // 2,), gguf.GGMLQuantizationType.F32))
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        notes.append(f"sliding_window {window} is not a llama-architecture setting: llama.cpp attends to the whole "
                     f"context")
    return ModelPlan(arch=ARCHITECTURES[config.architectures[0]], config=config, tensors=tensors, rope=rope,
                     file_type=int(file_type), notes=notes)


def _storage(name: str, shape: tuple, out_type: str, notes: list):
    """Norms and biases stay F32 (as in llama.cpp's converter); matrices take the requested type. Q8_0 needs
    rows that are whole blocks of 32; a matrix whose rows are not is stored as F16 instead."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if out_type == "q8_0":
        if shape[-1] % Q8_0_BLOCK == 0:
            return gguf.GGMLQuantizationType.Q8_0
        notes.append(f"{name}: rows of {shape[-1]} are not whole Q8_0 blocks of {Q8_0_BLOCK}; stored as F16")
        return gguf.GGMLQuantizationType.F16
    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}[out_type]


def add_hyperparameters(writer, plan: ModelPlan):
    """The `llama.*` keys: sizes, attention, norm epsilon and rope."""
    import gguf

    config = plan.config
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(plan.embedding_rows)
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_rope_freq_base(plan.rope["theta"])
    if plan.rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(plan.rope["factor"]))
    writer.add_file_type(plan.file_type)


def tensor_data(plan: TensorPlan, reader, model: ModelPlan) -> np.ndarray:
    """The bytes (as a numpy array) of one planned tensor, in its storage type."""
    import gguf

    if plan.source is None:  # rope_freqs
        return llama3_rope_divisors(model.config).astype(np.float32)
    values = reader.get(plan.source).to(torch.float32).numpy()
    try:
        if plan.permute_heads:
            values = permute_for_rope(values, plan.permute_heads)
        return gguf.quants.quantize(np.ascontiguousarray(values), plan.qtype)
    finally:
        reader.release(plan.source)


def permute_for_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Per head, rows [first half; second half] (rotate-half) -> interleaved pairs (llama.cpp's rope layout)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_divisors(config) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3 scaling: default frequency / scaled frequency, per frequency."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, dim = rope_settings(config, "config.json")["theta"], head_dim(config)
    default = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    divisors = default / scaled.double().numpy()
    if not np.all(np.isfinite(divisors)) or math.isclose(float(divisors.min()), 0.0):
        raise UnsupportedModelError(f"llama3 rope settings {config.rope_parameters!r} give invalid frequencies")
    return divisors
