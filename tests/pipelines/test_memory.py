"""The per-GPU memory estimate: its arithmetic against numbers worked out by hand for Llama 3.1 8B, its
activation count against the tensors a real (tiny) Llama saves for backward, and the plan lines `--dry-run`
prints."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workbench.config.language import LoraSettings, TrainConfig
from workbench.config.loader import load_language
from workbench.errors import ConfigError
from workbench.pipelines.adapt import build_graph
from workbench.pipelines.memory import (GIB, KNOWN_CONFIGS, Gpus, ModelShape, layer_activation_bytes,
                                        outer_activation_bytes, parse_gpus, trainable_parameters, training_memory)

LLAMA_3_1_8B = ModelShape.from_config(KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"])
# The Layer Swapping profiles' SFT: full, bf16, 8 sequences of 1024 tokens per GPU, gradient checkpointing.
PAPER_SFT = TrainConfig(method="full", batch_size=8, precision="bf16", gradient_checkpointing=True)


def test_llama_3_1_8b_parameters():
    # embeddings and head 2 x 128256 x 4096, final norm 4096; per layer q, o 4096^2 each, k, v 4096 x 1024
    # each, MLP 3 x 4096 x 14336, two norms 2 x 4096: 218,112,000; 32 layers.
    assert LLAMA_3_1_8B.layer_parameters() == 218_112_000
    assert LLAMA_3_1_8B.parameters() == 32 * 218_112_000 + 2 * 128256 * 4096 + 4096 == 8_030_261_248


def test_lora_trains_only_the_adapters():
    # rank 16 on the seven projections: 16 x (8192 + 5120 + 5120 + 8192 + 3 x 18432) = 1,310,720 per layer
    lora = TrainConfig(method="lora", lora=LoraSettings(rank=16))
    assert trainable_parameters(LLAMA_3_1_8B, lora) == 32 * 1_310_720 == 41_943_040
    embeddings = TrainConfig(method="lora", lora=LoraSettings(rank=16, train_embeddings=True))
    assert trainable_parameters(LLAMA_3_1_8B, embeddings) == 41_943_040 + 2 * 128256 * 4096


def test_full_fine_tuning_of_llama_3_1_8b_by_hand():
    p = 8_030_261_248
    # Activations per token (bytes), bf16 autocast with gradient checkpointing: 32 layer inputs in fp32
    # (32 x 4 x 4096 = 524,288), one layer recomputed (30 x 4096 + 4 x 1024 + 8 x 14336 + 4 x 32 + 8 = 241,800),
    # outside the layers 10 x 4096 + 4 x 128256 = 553,984, the logits at the loss 6 x 128256 = 769,536:
    # 2,089,608 bytes, for 8 x 1024 tokens.
    activations = 2_089_608 * 8192
    ddp = training_memory(LLAMA_3_1_8B, PAPER_SFT, seq_len=1024, processes=8, strategy="ddp")
    # fp32 master weights + their bf16 copies 6P; fp32 gradients + DDP's buckets 8P; AdamW 8P.
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.activations) == (6 * p, 8 * p, 8 * p, activations)
    assert round(ddp.total / GIB, 1) == 180.5 and not ddp.fits(80 * GIB)

    fsdp = training_memory(LLAMA_3_1_8B, PAPER_SFT, seq_len=1024, processes=8, strategy="fsdp")
    root, layer = 2 * 128256 * 4096 + 4096, 218_112_000
    assert fsdp.weights == 4 * p // 8 + 2 * (root + 2 * layer) == 6_988_933_120
    assert fsdp.gradients == 4 * p // 8 + 4 * (root + layer) == 9_090_287_616
    assert fsdp.optimizer == p and fsdp.activations == activations
    assert round(fsdp.total / GIB, 1) == 38.4 and fsdp.fits(80 * GIB)

    alone = training_memory(LLAMA_3_1_8B, PAPER_SFT, seq_len=1024, processes=1, strategy="ddp")
    assert alone.gradients == 4 * p  # one process: no reduction buckets


def _saved_bytes_per_token(shape, *, half, checkpointing):
    """Bytes of the distinct tensors (not parameters) autograd saves in one training forward, per token:
    measured at 2 and 4 sequences and differenced, so that per-batch tensors (autocast's weight copies, the
    rotary tables) cancel."""
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=shape.tied, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(batch, seq=32):
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in parameters:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, shape.vocab, (batch, seq))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                model(input_ids=ids, labels=ids)
        return sum(storages.values())

    return (saved(4) - saved(2)) / (2 * 32)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "bf16-autocast"])
def test_activation_count_matches_what_a_llama_saves(half):
    # A shape apart from the ones the counts were read from: 3 layers, 6 heads of 16, 2 KV heads, odd vocab.
    shape = ModelShape(vocab=300, hidden=96, intermediate=256, layers=3, heads=6, kv_heads=2, head_dim=16,
                       tied=False)
    outer = outer_activation_bytes(shape, half=half)
    counted = shape.layers * layer_activation_bytes(shape, half=half) + outer
    assert _saved_bytes_per_token(shape, half=half, checkpointing=False) == pytest.approx(counted, abs=32)
    checkpointed = shape.layers * 4 * shape.hidden + outer  # each layer keeps its fp32 input
    assert _saved_bytes_per_token(shape, half=half, checkpointing=True) == pytest.approx(checkpointed, abs=32)


def test_parse_gpus():
    assert parse_gpus("8x80") == Gpus(8, 80 * GIB, "stated")
    assert parse_gpus("2X24GiB").bytes == 24 * GIB
    for bad in ("8", "x80", "0x80", "8x0", "eight"):
        with pytest.raises(ConfigError, match="--gpus: expected COUNTxGIB"):
            parse_gpus(bad)


def _notes(graph, stage):
    return next(s for s in graph.specs if s.name == stage).notes


def test_the_plan_names_fsdp_for_the_paper_profile(tmp_path):
    loaded = load_language("sw", profile="paper-layer-swap")
    notes = _notes(build_graph(loaded, tmp_path / "run", gpus=Gpus(8, 80 * GIB, "stated")), "expert:math")
    text = "\n".join(notes)
    assert "batch 8 x 1024 tokens, with gradient checkpointing; 8 x 80 GiB, stated" in text
    assert "DDP, each GPU the whole model: 180.5 GiB" in text and "-> does not fit" in text
    assert "FSDP full shard over 8: 38.4 GiB" in text and "-> fits" in text
    assert "warning: expert:math needs FSDP: accelerate launch --config_file " \
           "configs/accelerate/fsdp_1node_8gpu.yaml" in text
    assert "the hub config of meta-llama/Llama-3.1-8B" in text
    one = "\n".join(_notes(build_graph(loaded, tmp_path / "run", gpus=Gpus(1, 80 * GIB, "stated")), "expert:math"))
    assert "FSDP" not in one.split("warning:")[0] and "fix: method: lora, or more GPUs with FSDP" in one
    assert not (tmp_path / "run").exists()


def test_the_plan_reads_a_local_base_config(tmp_path, tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    loaded = load_language("sw", profile="micro", overrides=[f"base={{path: {base_dir}}}"])
    notes = _notes(build_graph(loaded, tmp_path / "run", gpus=Gpus(1, 80 * GIB, "stated")), "language_expert")
    assert notes[1].strip().startswith("DDP, each GPU the whole model:") and notes[1].endswith("-> fits")
    assert notes[-1].strip() == f"model shape from {base_dir / 'config.json'}"


def test_an_unknown_base_waits_for_the_fetch(tmp_path):
    loaded = load_language("sw", profile="paper-layer-swap", overrides=["base={hub: someone/unknown-7b}"])
    notes = _notes(build_graph(loaded, tmp_path / "run"), "language_expert")
    assert notes == ("memory per GPU: shape unknown until the base is fetched",)


def test_under_an_fsdp_launch_the_plan_does_not_warn(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    loaded = load_language("sw", profile="paper-layer-swap")
    text = "\n".join(_notes(build_graph(loaded, tmp_path / "run", gpus=Gpus(8, 80 * GIB, "stated")), "expert:math"))
    assert "FSDP full shard over 8 (this launch): 38.4 GiB" in text and "warning" not in text
