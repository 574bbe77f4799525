"""CT: continual pretraining of the base on the packed corpus blocks -> the language expert.

Training is `training.train_and_save` (Trainer, LoRA or full, resume, merge, atomic save); this module adds
only the packed-block data. Held-out perplexity is measured on the held-out documents packed into blocks of
the same length (every block has the same number of predicted tokens, so the Trainer's mean evaluation loss is
the token-level mean and exp of it the perplexity), at the start, every `eval_steps` and at the end. The
stage that calls it, and the stages before it, are in pipelines/adapt.py (`workbench adapt` and `workbench
pretrain` run the same graph).
"""
from pathlib import Path

import numpy as np
import torch

from workbench.pipelines.corpus import load_tokenizer
from workbench.pipelines.processes import is_main_process
from workbench.pipelines.training import print_summary, train_and_save


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


def train_language_expert(cfg, model_dir, blocks_dir, out, *, callbacks=()) -> dict:
    """Continual pretraining of `model_dir` per `cfg` (a TrainConfig) on the blocks `corpus.write_blocks` wrote
    into `blocks_dir`, in `out` (resumed when interrupted); the expert is `out/model`. Returns the summary."""
    blocks_dir, out = Path(blocks_dir), Path(out)
    tokenizer = load_tokenizer(model_dir)
    heldout = blocks_dir / "heldout_blocks.npy"
    summary = train_and_save(model_dir, tokenizer, cfg, out,
                             train_dataset=PackedBlocks(blocks_dir / "train_blocks.npy"),
                             eval_dataset=PackedBlocks(heldout) if heldout.is_file() else None,
                             collator=packed_collator, count_tokens="all", callbacks=callbacks)
    if is_main_process():
        print_summary("continual pretraining", summary, out / "model")
    return summary
