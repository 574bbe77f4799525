"""CT stage on a tiny Llama and real Swahili text: held-out loss falls, the expert is a plain full model,
an interrupted run resumes to the same weights, and `workbench pretrain` chains the stages."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from workbench.cli import main
from workbench.pipelines.corpus import run_corpus
from workbench.pipelines.pretrain import resolve_base_model, run_language_expert, run_pretrain

CT = "language_expert.pretrain"


def ct_config(sw_config, *overrides):
    return sw_config("corpus.max_tokens=12000", f"{CT}.lora.rank=8", f"{CT}.learning_rate=0.01",
                     f"{CT}.warmup_ratio=0.1", *overrides)


def test_lora_ct_lowers_heldout_loss_and_writes_a_plain_tied_model(tmp_path, sw_config, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base", tie=True)  # SmolLM2 ties its embeddings and LM head
    loaded = ct_config(sw_config, f"{CT}.max_steps=24", f"{CT}.eval_steps=12", f"{CT}.save_steps=12",
                       f"{CT}.lora.train_embeddings=true")
    stage = run_language_expert(loaded, base_dir, tmp_path / "run")
    record = stage.record()
    assert record["steps"] == 24 and record["tokens_seen"] == 24 * 4 * 64
    assert record["initial_eval_step"] == 0 and record["tokens_per_second"] > 0
    assert record["final_perplexity"] < 0.6 * record["initial_perplexity"], record
    history = json.loads((stage.path / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [0, 12, 24]
    assert not (stage.path / "checkpoints").exists()  # removed once the model is written

    model_dir = stage.path / "model"
    assert not (model_dir / "adapter_config.json").exists()
    stored = load_file(str(model_dir / "model.safetensors"))
    assert set(stored) == set(base) - {"lm_head.weight"} and not any("lora" in k for k in stored)
    assert not torch.equal(stored["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (model_dir / "tokenizer.json").is_file()

    # Rerunning finds the stage done and trains nothing.
    again = run_language_expert(loaded, base_dir, tmp_path / "run")
    assert again.path == stage.path and again.record()["finished_at"] == record["finished_at"]


def test_full_finetuning_with_gradient_checkpointing_lowers_heldout_loss(tmp_path, sw_config, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base")
    loaded = ct_config(sw_config, f"{CT}.method=full", f"{CT}.learning_rate=0.003", f"{CT}.max_steps=16",
                       f"{CT}.eval_steps=16", f"{CT}.save_steps=16", f"{CT}.gradient_checkpointing=true",
                       "tokenizer.check=false")
    record = run_language_expert(loaded, base_dir, tmp_path / "run").record()
    assert record["trainable_parameters"] == sum(v.numel() for v in base.values())
    assert record["final_perplexity"] < 0.6 * record["initial_perplexity"], record


class Interrupt(Exception):
    pass


class InterruptAfterCheckpoint(TrainerCallback):
    """A crash right after the checkpoint of `step` is on disk."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"interrupted after checkpoint-{self.step}")


def test_resume_after_interruption_gives_the_same_weights(tmp_path, sw_config, tiny_llama_factory):
    """Bitwise equal: the resumed run restores the adapter weights, AdamW moments, scheduler, the RNG state (LoRA
    dropout draws from it) and the data order exactly, and CPU kernels are deterministic, so nothing differs."""
    base_dir, _ = tiny_llama_factory("base")
    loaded = ct_config(sw_config, f"{CT}.max_steps=12", f"{CT}.save_steps=4", f"{CT}.eval_steps=6",
                       f"{CT}.lora.dropout=0.1", "tokenizer.check=false")
    corpus = run_corpus(loaded, base_dir, tmp_path / "data")
    straight = run_pretrain(loaded, base_dir, corpus, tmp_path / "a")

    with pytest.raises(Interrupt):
        run_pretrain(loaded, base_dir, corpus, tmp_path / "b", callbacks=[InterruptAfterCheckpoint(8)])
    partial = next((tmp_path / "b").glob("pretrain-*"))
    assert not (partial / "stage.json").exists() and (partial / "checkpoints" / "checkpoint-8").is_dir()
    # A kill in the middle of writing the next checkpoint leaves it without trainer_state.json: not resumable.
    torn = partial / "checkpoints" / "checkpoint-12"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    resumed = run_pretrain(loaded, base_dir, corpus, tmp_path / "b")
    record = resumed.record()
    assert record["resumed_from"] == "checkpoint-8" and record["steps"] == 12
    assert record["tokens_seen"] == straight.record()["tokens_seen"] == 12 * 4 * 64
    assert record["final_perplexity"] == straight.record()["final_perplexity"]
    assert record["initial_perplexity"] == straight.record()["initial_perplexity"]  # kept in the checkpoint's history
    a = load_file(str(straight.path / "model" / "model.safetensors"))
    b = load_file(str(resumed.path / "model" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_base_path_in_the_profile_resolves_relative_to_the_yaml(tmp_path, sw_config, tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    loaded = sw_config(f"base={{path: {base_dir}}}")
    assert resolve_base_model(loaded, tmp_path) == base_dir.resolve()
    assert resolve_base_model(sw_config(), tmp_path, override=base_dir) == base_dir.resolve()


def test_workbench_pretrain_command(tmp_path, tiny_llama_factory, capsys):
    base_dir, _ = tiny_llama_factory("base")
    argv = ["pretrain", "--lang", "sw", "--fast", "--base", str(base_dir), "--run-dir", str(tmp_path / "runs"),
            "--set", "corpus.block_size=64", "--set", "corpus.max_tokens=4000",
            "--set", "language_expert.pretrain.batch_size=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokenizer fertility" in out and "corpus (" in out and "training blocks of 64 tokens" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("language expert (sw, profile micro; held-out perplexity ")
    model_dir = last.rsplit(": ", 1)[1]
    assert (tmp_path / "runs").as_posix() in model_dir and (tmp_path / "runs" / model_dir).exists()
    assert main(argv) == 0  # everything cached
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
