"""CT throughput: the CT stage on packed blocks against a plain Trainer that pads each document to the block
length, on the same model, batch shape, LoRA settings and step count.

Both sides count real tokens only (a packed block is all text and EOS; a padded row counts its attention
mask) and are timed the same way: the seconds inside optimizer steps (forward, backward, update), not
evaluation or checkpoint writing. `workbench bench pretrain` calls `pretrain_throughput`.
"""
import tempfile
from pathlib import Path

import numpy as np

from workbench.config.language import LoraSettings, TrainConfig
from workbench.pipelines.corpus import pack
from workbench.pipelines.pretrain import packed_collator, PackedBlocks
from workbench.pipelines.training import (load_trainable_model, make_trainer_class, train_and_save,
    training_arguments, use_step_log)


def _packed_side(model_dir, tokenizer, ids, cfg, block_size, work_dir) -> float:
    blocks, _ = pack(ids, tokenizer.eos_token_id, block_size)
    np.save(work_dir / "blocks.npy", blocks)
    summary = train_and_save(model_dir, tokenizer, cfg, work_dir / "packed", train_dataset=PackedBlocks(
        work_dir / "blocks.npy"), collator=packed_collator, count_tokens="all")
    return summary["tokens_per_second"]


def _padded_side(model_dir, tokenizer, ids, cfg, block_size, work_dir) -> float:
    """The baseline: every document (+ EOS) its own row, cut or padded to `block_size`, a plain Trainer."""
    import datasets
    from transformers import Trainer, default_data_collator, set_seed

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for doc in ids:
        doc = (list(doc) + [tokenizer.eos_token_id])[:block_size]
        fill = block_size - len(doc)
        rows["input_ids"].append(doc + [pad] * fill)
        rows["attention_mask"].append([1] * len(doc) + [0] * fill)
        rows["labels"].append(doc + [-100] * fill)
    set_seed(cfg.seed)
    model = load_trainable_model(model_dir, cfg)
    args = training_arguments(cfg, work_dir / "padded", evaluate=False, count_tokens="non_padding", fresh=True)
    timer = make_trainer_class()[1]()
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows).with_format("torch"),
                      data_collator=default_data_collator, callbacks=[timer])
    use_step_log(trainer, "padded")  # the same one-line log as the packed side
    trainer.train()
    return timer.tokens / timer.seconds


def pretrain_throughput(model_dir, texts, *, block_size=256, batch_size=8, steps=20, method="lora", repeats=1,
                        work_dir=None) -> dict:
    """Real tokens per second of CT on packed blocks and of the padded baseline, and their ratio (best of
    `repeats` runs of each, alternating)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    cfg = TrainConfig(method=method, lora=LoraSettings(dropout=0.0), max_steps=steps, batch_size=batch_size,
                      save_steps=steps, eval_steps=steps, logging_steps=steps, learning_rate=1e-3)
    best = {"packed": 0.0, "padded": 0.0}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for r in range(repeats):
            for name, side in (("packed", _packed_side), ("padded", _padded_side)):
                run_dir = Path(tmp) / f"{name}-{r}"
                run_dir.mkdir()
                best[name] = max(best[name], side(model_dir, tokenizer, ids, cfg, block_size, run_dir))
    doc_lengths = [min(len(d) + 1, block_size) for d in ids]
    return {"packed_tokens_per_second": best["packed"], "padded_tokens_per_second": best["padded"],
            "ratio": best["packed"] / best["padded"], "block_size": block_size, "batch_size": batch_size,
            "steps": steps, "method": method, "documents": len(ids),
            "padded_real_share": float(np.mean(doc_lengths)) / block_size}
