"""CT stage: continual pretraining of the base on the packed corpus blocks -> the language expert.

`run_language_expert` chains corpus text -> tokenizer check (-> vocabulary extension) -> corpus blocks -> CT,
each stage skipped when done. Training is `training.train_and_save` (Trainer, LoRA or full, resume, merge,
atomic save); this module adds only the packed-block data. Held-out perplexity is measured on the held-out
documents packed into blocks of the same length (every block has the same number of predicted tokens, so
the Trainer's mean evaluation loss is the token-level mean and exp of it the perplexity), at the start, every
`eval_steps` and at the end.
"""
from pathlib import Path

import numpy as np
import torch

from workbench.config.schema import to_dict
from workbench.errors import ConfigError
from workbench.pipelines.identity import model_identity
from workbench.pipelines.stage import Stage, stage_for

VERSION = 1


class PackedBlocks(torch.utils.data.Dataset):
    """Fixed-length token blocks from a .npy file (memory-mapped)."""

    def __init__(self, path):
        self.blocks = np.load(path, mmap_mode="r")

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))}


def packed_collator(features):
    """Every token of a packed block is real text or EOS: all of them are labels (the model shifts them)."""
    ids = torch.stack([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def resolve_base_model(loaded, run_dir, override=None) -> Path:
    """The base model as a local Hugging Face directory: `--base DIR`, or the profile's base through the fetch
    stage (a local path, a hub id, or a GGUF file)."""
    from workbench.pipelines.fetch import resolve_model

    if override is not None:
        model_identity(override)  # checks that it is a model directory
        return Path(override).resolve()
    return Path(resolve_model(loaded.profile.base, base_dir=loaded.base_dir, run_dir=Path(run_dir), key="base"))


def run_pretrain(loaded, model_dir, corpus: Stage, run_dir, *, callbacks=()) -> Stage:
    """Continual pretraining of `model_dir` on the corpus stage's blocks (skipped when done, resumed when
    interrupted); the expert is `<stage>/model`."""
    from workbench.pipelines.corpus import load_tokenizer
    from workbench.pipelines.training import barrier, is_main_process, print_summary, train_and_save

    cfg = loaded.profile.language_expert.pretrain
    inputs = {"version": VERSION, "model": model_identity(model_dir), "corpus": corpus.key, "train": to_dict(cfg)}
    stage = stage_for(run_dir, "pretrain", inputs)
    if stage.done:
        return stage
    if is_main_process():
        stage.start()
    barrier()
    tokenizer = load_tokenizer(model_dir)
    heldout = corpus.path / "heldout_blocks.npy"
    summary = train_and_save(model_dir, tokenizer, cfg, stage.path,
                             train_dataset=PackedBlocks(corpus.path / "train_blocks.npy"),
                             eval_dataset=PackedBlocks(heldout) if heldout.is_file() else None,
                             collator=packed_collator, count_tokens="all", callbacks=callbacks)
    if is_main_process():
        stage.finish({"model": "model", "log_history": "log_history.json"}, **summary)
        print_summary("continual pretraining", summary, stage.path / "model")
    barrier()
    return stage


def run_language_expert(loaded, base_dir, run_dir, *, callbacks=()) -> Stage:
    """The profile's language expert from the base: CT (corpus, tokenizer check, pretrain) or SFT."""
    from workbench.pipelines.corpus import run_corpus, run_corpus_text
    from workbench.pipelines.prompts import PromptFormat
    from workbench.pipelines.tokenizer import extended_model_dir, run_tokenizer
    from workbench.pipelines.training import main_process_first

    expert = loaded.profile.language_expert
    if expert.fetch is not None:
        raise ConfigError(f"{loaded.source}: profiles.{loaded.profile_name}.language_expert.fetch: this profile "
                          f"fetches its language expert ({expert.fetch.label()}); there is nothing to pretrain")
    if expert.sft is not None:
        from workbench.pipelines.sft import run_sft

        # General instructions (e.g. Aya), not word problems: the question is the whole user turn.
        return run_sft(expert.sft, base_dir, run_dir, PromptFormat(template="{question}"),
                       config_dir=loaded.base_dir, name="language-sft", callbacks=callbacks)
    with main_process_first():
        text = run_corpus_text(loaded, run_dir)
        tok_stage = run_tokenizer(loaded, base_dir, text, run_dir)
        model_dir = extended_model_dir(tok_stage) or Path(base_dir)
        if model_dir != Path(base_dir) and expert.pretrain.method == "lora" and not expert.pretrain.lora.train_embeddings:
            print("note: the vocabulary was extended but LoRA does not train the embeddings; the new rows keep "
                  "their initial values (set language_expert.pretrain.lora.train_embeddings: true)")
        corpus = run_corpus(loaded, model_dir, run_dir)
    return run_pretrain(loaded, model_dir, corpus, run_dir, callbacks=callbacks)
