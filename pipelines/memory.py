"""Memory per GPU of a training stage, from the model's shape and its `TrainConfig` alone (no model is loaded):
weights, gradients, optimizer state and activations, for one process per GPU holding the whole model (DDP)
and for FSDP full shard. `workbench adapt --dry-run` prints it for each training stage and names the fix
when a stage cannot fit.

What is counted is what `training.py` builds: the Trainer's AdamW (two fp32 states per trained parameter),
full fine-tuning on fp32 weights (the master copy) under bf16 autocast, LoRA on a frozen bf16 base with fp32
adapters. Activations are the tensors a Llama decoder layer saves for backward with SDPA attention, counted
per token (`tests/pipelines/test_memory.py` measures them on a real model), plus the logits at the loss.
It is an estimate: it leaves out the CUDA context, the allocator's fragmentation and communication
buffers (hence `FIT_SHARE`), and errs high for LoRA, whose bf16 residual stream is smaller than counted.
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from workbench.config.language import ModelSource
from workbench.errors import CheckpointError, ConfigError, MissingDependencyError
from workbench.pipelines.fetch import cached_hub_snapshot, gguf_path
from workbench.pipelines.training import fsdp_launched
from workbench.provenance import cache_dir

GIB = 2**30
FIT_SHARE = 0.9  # of a GPU's memory a stage may plan for: the rest is the CUDA context, fragmentation, NCCL
LLAMA_TYPES = ("llama", "mistral")  # decoder layers of this shape: attention q/k/v/o, SwiGLU MLP, two RMSNorms
FSDP_CONFIGS = ("configs/accelerate/fsdp_1node_8gpu.yaml", "configs/accelerate/fsdp_multinode.yaml")
GPUS_PER_NODE = 8  # beyond this many GPUs the plan names the multi-node config

# The hub config shapes of the bases the shipped profiles name, for planning before the download.
_LLAMA_3_1_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "tie_word_embeddings": False}
KNOWN_CONFIGS = {
    "meta-llama/Llama-3.1-8B": _LLAMA_3_1_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_3_1_8B,
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                                 "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                                 "num_key_value_heads": 32, "tie_word_embeddings": False},
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family causal LM that its memory depends on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        """From a config.json's fields; a model type whose layers are not Llama-shaped is refused."""
        kind = config.get("model_type")
        if kind not in LLAMA_TYPES:
            raise ConfigError(f"model_type {kind!r}: no memory estimate; expected one of {', '.join(LLAMA_TYPES)}")
        heads = config["num_attention_heads"]
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"],
                   intermediate=config["intermediate_size"], layers=config["num_hidden_layers"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   tied=bool(config.get("tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one decoder layer, by its module name."""
        h, a, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, a), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (a, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameters(self) -> int:
        return sum(n * m for n, m in self.linears().values()) + 2 * self.hidden  # + the two RMSNorm weights

    def outer_parameters(self) -> int:
        """Embeddings, LM head (unless tied) and final norm: what FSDP's root unit holds."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.outer_parameters()


@dataclass(frozen=True)
class Gpus:
    count: int
    bytes: int
    origin: str  # "visible" or "stated"

    def label(self) -> str:
        return f"{self.count} x {self.bytes / GIB:.0f} GiB, {self.origin}"


def parse_gpus(text: str) -> Gpus:
    """`8x80`: 8 GPUs of 80 GiB each (all nodes together)."""
    found = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+(?:\.\d+)?)\s*(?:GiB|GB|G)?\s*", text or "")
    if not found or int(found[1]) < 1 or float(found[2]) <= 0:
        raise ConfigError(f"--gpus: expected COUNTxGIB such as 8x80 (8 GPUs of 80 GiB), got {text!r}")
    return Gpus(int(found[1]), int(float(found[2]) * GIB), "stated")


def visible_gpus() -> Gpus | None:
    """The CUDA devices this process sees (the smallest one's memory), or None. Under `accelerate launch` on
    several nodes the count is the launch's processes (WORLD_SIZE), one GPU each."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return Gpus(max(len(sizes), int(os.environ.get("WORLD_SIZE", "1"))), min(sizes), "visible")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU holds at the peak of a training step."""

    strategy: str  # "ddp" (every process holds the whole model; one process is the same) or "fsdp"
    processes: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= FIT_SHARE * gpu_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.1f}"
                          for name in ("weights", "gradients", "optimizer", "activations"))
        return f"{self.total / GIB:.1f} GiB ({parts})"


def half_precision(precision: str) -> bool:
    """bf16/fp16 compute; `auto` is bf16 on a GPU, which is what the estimate is for."""
    return precision in ("auto", "bf16", "fp16")


def trainable_parameters(shape: ModelShape, train) -> int:
    """All parameters (full), or LoRA's A and B of every target module (+ the embedding and head copies)."""
    if train.method == "full":
        return shape.parameters()
    rank = train.lora.rank
    per_layer = sum(rank * (n + m) for name, (n, m) in shape.linears().items() if name in train.lora.target_modules)
    copies = shape.vocab * shape.hidden * (1 if shape.tied else 2) if train.lora.train_embeddings else 0
    return shape.layers * per_layer + copies


def layer_activation_bytes(shape: ModelShape, *, half: bool) -> int:
    """Bytes one decoder layer saves for backward per token, with SDPA attention (no score matrix, a
    log-sum-exp per head): with fp32 weights 8h + 2kv + 4I + heads + 2 fp32 elements; under bf16 autocast
    30h + 4kv + 8I + 4 heads + 8 bytes (the residual stream and the RMSNorm internals stay fp32, the
    projections' outputs are bf16)."""
    h, kv, i, heads = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate, shape.heads
    return 30 * h + 4 * kv + 8 * i + 4 * heads + 8 if half else 4 * (8 * h + 2 * kv + 4 * i + heads + 2)


def outer_activation_bytes(shape: ModelShape, *, half: bool) -> int:
    """Bytes saved per token outside the layers: the final norm's and the fp32 log-probabilities."""
    return (10 if half else 12) * shape.hidden + 4 * shape.vocab


def activation_bytes_per_token(shape: ModelShape, *, half: bool, checkpointing: bool) -> int:
    """Saved activations per token, plus the logits live at the loss (4V bytes in fp32; 6V under autocast:
    bf16 and their fp32 copy). With gradient checkpointing a layer keeps only its fp32 input (4h bytes) and
    one layer at a time is recomputed in full."""
    layer = layer_activation_bytes(shape, half=half)
    layers = shape.layers * 4 * shape.hidden + layer if checkpointing else shape.layers * layer
    return layers + outer_activation_bytes(shape, half=half) + (6 if half else 4) * shape.vocab


def training_memory(shape: ModelShape, train, *, seq_len: int, processes: int, strategy: str) -> MemoryEstimate:
    """Per-GPU memory of training `shape` per `train` (a TrainConfig) on `processes` GPUs with `strategy`.

    Bytes per parameter P (full) or per trained parameter T: fp32 weights 4 (full: the master copy; LoRA: a
    bf16 base, 2 per P, and fp32 adapters), their bf16 autocast copies 2 per P (kept for backward), fp32
    gradients 4 per T (and as much again in DDP's reduction buckets when there are several processes), AdamW
    8 per T. FSDP full shard divides the weights, gradients and optimizer state by the processes, and holds
    the unsharded root (embeddings, head) and two decoder layers' parameters in the compute dtype, and the
    root's and one layer's fp32 gradients before they are reduce-scattered.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy: expected ddp or fsdp, got {strategy!r}")
    half = half_precision(train.precision)
    p, t = shape.parameters(), trainable_parameters(shape, train)
    full = train.method == "full"
    weights = 4 * p if full else (2 if half else 4) * p + 4 * t
    gradients, optimizer = 4 * t, 8 * t
    if strategy == "fsdp":
        n = processes
        unsharded = shape.outer_parameters() + 2 * shape.layer_parameters()
        weights = weights // n + (2 if half else 4) * unsharded
        gradients //= n
        if full:
            gradients += 4 * (shape.outer_parameters() + shape.layer_parameters())
        optimizer //= n
    else:
        weights += 2 * p if (full and half) else 0
        gradients *= 2 if processes > 1 else 1
    tokens = train.batch_size * seq_len
    per_token = activation_bytes_per_token(shape, half=half, checkpointing=train.gradient_checkpointing)
    return MemoryEstimate(strategy, processes, weights, gradients, optimizer, tokens * per_token)


# ----- the base's shape, without fetching it

def local_config(source: ModelSource, base_dir: Path) -> Path | None:
    """The config.json of `source` when it is on this machine already (a path, the hub cache, a converted
    GGUF); None otherwise. No network, no hashing, no conversion."""
    if source.path:
        path = Path(source.path).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        found = [path / "config.json"]
    elif source.hub:
        snapshot = cached_hub_snapshot(source)
        found = [snapshot / "config.json"] if snapshot else []
    else:
        try:
            gguf = gguf_path(source, base_dir)
        except (CheckpointError, MissingDependencyError):  # the fetch plan reports it; here there is no shape
            return None
        found = sorted((cache_dir() / "gguf").glob(f"{gguf.stem}-*/config.json"))
    return next((f for f in found if f.is_file()), None)


def base_shape(source: ModelSource, base_dir: Path) -> tuple[ModelShape | None, str]:
    """(shape, where it came from) of a base model, or (None, why not)."""
    config = local_config(source, base_dir)
    try:
        if config is not None:
            return ModelShape.from_config(json.loads(config.read_text(encoding="utf-8"))), str(config)
        if source.hub in KNOWN_CONFIGS:
            return ModelShape.from_config(KNOWN_CONFIGS[source.hub]), f"the hub config of {source.hub}"
    except ConfigError as e:
        return None, str(e)
    return None, "shape unknown until the base is fetched"


def stage_memory_lines(shape: ModelShape, train, *, seq_len: int, gpus: Gpus | None, stage: str) -> list[str]:
    """The plan's lines for one training stage: per-GPU memory for DDP and FSDP, and a warning with the fix
    when it cannot fit (without GPUs: one process, no verdict)."""
    ckpt = "with" if train.gradient_checkpointing else "without"
    head = f"memory per GPU ({train.method}, batch {train.batch_size} x {seq_len} tokens, {ckpt} gradient checkpointing"
    if gpus is None:
        one = training_memory(shape, train, seq_len=seq_len, processes=1, strategy="ddp")
        return [f"{head}): one process {one.describe()}; no GPU visible, --gpus COUNTxGIB for a verdict"]
    ddp = training_memory(shape, train, seq_len=seq_len, processes=gpus.count, strategy="ddp")
    lines = [f"{head}; {gpus.label()}):",
             f"  DDP, each GPU the whole model: {ddp.describe()} -> {_verdict(ddp, gpus)}"]
    fsdp = None
    launched = " (this launch)" if fsdp_launched() else ""
    if gpus.count > 1:
        fsdp = training_memory(shape, train, seq_len=seq_len, processes=gpus.count, strategy="fsdp")
        lines.append(f"  FSDP full shard over {gpus.count}{launched}: {fsdp.describe()} -> {_verdict(fsdp, gpus)}")
    if not ddp.fits(gpus.bytes) and not (launched and fsdp is not None and fsdp.fits(gpus.bytes)):
        lines.append(f"  warning: {stage} {_fix(shape, train, seq_len, gpus, fsdp)}")
    return lines


def _verdict(estimate: MemoryEstimate, gpus: Gpus) -> str:
    return "fits" if estimate.fits(gpus.bytes) else f"does not fit ({FIT_SHARE:.0%} of {gpus.bytes / GIB:.0f} GiB)"


def _fix(shape, train, seq_len, gpus, fsdp) -> str:
    """The changes that make the stage fit: FSDP when it is enough; else smaller activations when the model
    state fits, LoRA, and more GPUs to shard over."""
    if fsdp is not None and fsdp.fits(gpus.bytes):
        config = FSDP_CONFIGS[gpus.count > GPUS_PER_NODE]
        return (f"needs FSDP: accelerate launch --config_file {config} -m workbench adapt ... "
                f"(README, 'Full fine-tuning on several GPUs')")
    best = fsdp or training_memory(shape, train, seq_len=seq_len, processes=1, strategy="ddp")
    options = []
    if best.total - best.activations <= FIT_SHARE * gpus.bytes:  # the activations are the excess
        if not train.gradient_checkpointing:
            options.append("gradient_checkpointing: true")
        if train.batch_size > 1:
            options.append("a smaller batch_size (a larger grad_accum keeps the tokens per step)")
    if train.method == "full":
        options.append("method: lora")
    options.append("more GPUs with FSDP" if train.method == "full" else "larger GPUs")
    return f"does not fit{' with FSDP' if fsdp is not None else ''}; fix: " + ", or ".join(options)
