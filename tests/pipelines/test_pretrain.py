"""CT on a tiny Llama and real Swahili text: held-out loss falls, the expert is a plain full model, an
interrupted run resumes to the same weights, and `workbench pretrain` runs the adapt graph until the language
expert."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from workbench.cli import main
from workbench.pipelines.adapt import build_graph
from workbench.pipelines.pretrain import train_language_expert

CT = "language_expert.pretrain"


def ct_config(sw_config, *overrides):
    return sw_config("corpus.max_tokens=12000", f"{CT}.lora.rank=8", f"{CT}.learning_rate=0.01",
                     f"{CT}.warmup_ratio=0.1", *overrides)


def pretrain(loaded, run_dir, callbacks=()) -> dict:
    """The language expert's record after running the adapt graph until it (what `workbench pretrain` does)."""
    return build_graph(loaded, run_dir, callbacks=callbacks).execute(until="language_expert",
                                                                     log=lambda *_: None)["language_expert"]


def test_lora_ct_lowers_heldout_loss_and_writes_a_plain_tied_model(tmp_path, sw_config, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base", tie=True)  # SmolLM2 ties its embeddings and LM head
    loaded = ct_config(sw_config, f"base={{path: {base_dir}}}", f"{CT}.max_steps=24", f"{CT}.eval_steps=12",
                       f"{CT}.save_steps=12", f"{CT}.lora.train_embeddings=true")
    record = pretrain(loaded, tmp_path / "run")
    summary, folder = record["outputs"]["summary"], Path(record["path"])
    assert folder.parent == tmp_path / "run" / "stages" and folder.name.startswith("language_expert-")
    assert summary["steps"] == 24 and summary["tokens_seen"] == 24 * 4 * 64
    assert summary["initial_eval_step"] == 0 and summary["tokens_per_second"] > 0
    assert summary["final_perplexity"] < 0.6 * summary["initial_perplexity"], summary
    history = json.loads((folder / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [0, 12, 24]
    assert not (folder / "checkpoints").exists()  # removed once the model is written
    assert sorted(p.name for p in folder.iterdir()) == ["log_history.json", "model", "stage.json"]

    model_dir = Path(record["outputs"]["model"])
    assert model_dir == folder / "model" and not (model_dir / "adapter_config.json").exists()
    stored = load_file(str(model_dir / "model.safetensors"))
    assert set(stored) == set(base) - {"lm_head.weight"} and not any("lora" in k for k in stored)
    assert not torch.equal(stored["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(stored["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (model_dir / "tokenizer.json").is_file()

    # Rerunning finds the stage done and trains nothing.
    assert pretrain(loaded, tmp_path / "run") == record


def test_full_finetuning_with_gradient_checkpointing_lowers_heldout_loss(tmp_path, sw_config, tiny_llama_factory):
    base_dir, base = tiny_llama_factory("base")
    loaded = ct_config(sw_config, f"base={{path: {base_dir}}}", f"{CT}.method=full", f"{CT}.learning_rate=0.003",
                       f"{CT}.max_steps=16", f"{CT}.eval_steps=16", f"{CT}.save_steps=16",
                       f"{CT}.gradient_checkpointing=true", "tokenizer.check=false")
    summary = pretrain(loaded, tmp_path / "run")["outputs"]["summary"]
    assert summary["trainable_parameters"] == sum(v.numel() for v in base.values())
    assert summary["final_perplexity"] < 0.6 * summary["initial_perplexity"], summary


class Interrupt(Exception):
    pass


class InterruptAfterCheckpoint(TrainerCallback):
    """A crash right after the checkpoint of `step` is on disk."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"interrupted after checkpoint-{self.step}")


def test_resume_after_interruption_gives_the_same_weights(tmp_path, sw_config, tiny_llama_factory, corpus_blocks):
    """Bitwise equal: the resumed run restores the adapter weights, AdamW moments, scheduler, the RNG state (LoRA
    dropout draws from it) and the data order exactly, and CPU kernels are deterministic, so nothing differs."""
    base_dir, _ = tiny_llama_factory("base")
    loaded = ct_config(sw_config, f"base={{path: {base_dir}}}", f"{CT}.max_steps=12", f"{CT}.save_steps=4",
                       f"{CT}.eval_steps=6", f"{CT}.lora.dropout=0.1", "tokenizer.check=false")
    _, blocks = corpus_blocks(loaded, base_dir, tmp_path / "data")
    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    straight = train_language_expert(loaded.profile.language_expert.pretrain, base_dir, blocks, straight_dir)

    # The same CT as a stage of the graph, killed after its checkpoint at step 8, then run again.
    with pytest.raises(Interrupt):
        pretrain(loaded, tmp_path / "run", callbacks=[InterruptAfterCheckpoint(8)])
    partial = build_graph(loaded, tmp_path / "run").stages["language_expert"].path
    assert not (partial / "stage.json").exists() and (partial / "checkpoints" / "checkpoint-8").is_dir()
    # A kill in the middle of writing the next checkpoint leaves it without trainer_state.json: not resumable.
    torn = partial / "checkpoints" / "checkpoint-12"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    resumed = pretrain(loaded, tmp_path / "run")["outputs"]["summary"]
    assert resumed["resumed_from"] == "checkpoint-8" and resumed["steps"] == 12
    assert resumed["tokens_seen"] == straight["tokens_seen"] == 12 * 4 * 64
    assert resumed["final_perplexity"] == straight["final_perplexity"]
    assert resumed["initial_perplexity"] == straight["initial_perplexity"]  # kept in the checkpoint's history
    a = load_file(str(straight_dir / "model" / "model.safetensors"))
    b = load_file(str(partial / "model" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


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
    model_dir = Path(last.rsplit(": ", 1)[1])
    assert model_dir.parent.parent == tmp_path / "runs" / "stages" and (model_dir / "config.json").is_file()
    # Only the CT stages ran, with the given base.
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "runs" / "stages").iterdir())
    assert stages == ["blocks", "corpus", "fetch", "language_expert", "tokenizer"]
    fetch = json.loads(next((tmp_path / "runs" / "stages").glob("fetch-*/stage.json")).read_text())
    assert fetch["outputs"]["models"]["base"] == str(base_dir.resolve())
    assert main(argv) == 0  # everything cached
    again = capsys.readouterr().out
    assert again.strip().splitlines()[-1] == last and "language_expert: done earlier" in again

    # `workbench adapt` on the same run directory and settings finds the language expert done.
    adapt = ["adapt", "--dry-run", "--set", f"base={{path: {base_dir.resolve()}}}",
             *[a for i, a in enumerate(argv[1:], 1) if "--base" not in (a, argv[i - 1])]]
    assert main(adapt) == 0
    plan = capsys.readouterr().out
    assert "language_expert          [cached]" in plan and "expert:math              [to run]" in plan
