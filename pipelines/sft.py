"""SFT stage: (question, answer) pairs -> a task expert (or an instruction-tuned language expert).

Each pair is rendered with `prompts.py`, the format evaluation uses: input = `prompt_text(question)` followed
by `answer_text(answer)`, tokenized separately and concatenated, so the prompt tokens are known exactly and
get the label -100 (loss on the answer tokens only). A pair is cut to `max_length` tokens (the answer is
shortened); a pair whose prompt alone fills `max_length` is dropped and counted. Batches are padded per batch
(`DataCollatorForSeq2Seq`). Training is the CT machinery (`training.train_and_save`): LoRA or full, resume,
merge, a full safetensors model in `<stage>/model`.

With enough pairs (20 or more), a seeded 5% (at most 64) is held out and its answer loss is logged.
"""
from pathlib import Path

import numpy as np

from workbench.errors import ConfigError, DataError
from workbench.pipelines.problems import generate_problems
from workbench.pipelines.processes import is_main_process, main_process_first
from workbench.pipelines.prompts import ENGLISH_TEMPLATE, PromptFormat, answer_text, prompt_text
from workbench.pipelines.sources import iter_column, load_rows, require_columns, resolve_local, select_rows
from workbench.pipelines.training import print_summary, train_and_save


def load_pairs(data, config_dir=None) -> list[tuple[str, str]]:
    """The (question, answer) pairs of an `SftData`: generated problems, a local .tsv/.jsonl, or a hub set."""
    if data.generated is not None:
        return [(p.question, p.answer) for p in generate_problems(data.lang, data.generated, data.seed)]
    name = data.path or data.hub
    q, a = data.question_field, data.answer_field
    tsv_columns = None
    if data.path and data.path.lower().endswith(".tsv"):
        file = resolve_local(data.path, config_dir)
        first = file.open(encoding="utf-8").readline().rstrip("\r\n") if file.is_file() else ""
        tsv_columns = None if first == f"{q}\t{a}" else [q, a]  # MGSM files have no header row
    rows = load_rows(name, path=data.path, hub=data.hub, config=data.config, split=data.split,
                     revision=data.revision, base_dir=config_dir, tsv_columns=tsv_columns)
    require_columns(rows, name, [q, a])
    rows = select_rows(rows, name, filter=data.filter, max_rows=data.max_rows)
    pairs = [(qq, aa) for qq, aa in zip(iter_column(rows, q), iter_column(rows, a)) if qq.strip() and aa.strip()]
    if not pairs:
        raise DataError(f"source {name!r}: no (question, answer) pairs in columns {q!r}, {a!r}"
                        + (f" after filter {dict(data.filter)}" if data.filter else ""))
    return pairs


def tokenize_pair(tokenizer, fmt: PromptFormat, question: str, answer: str, max_length: int):
    """{"input_ids", "labels", "prompt_tokens"} with labels -100 on the prompt; None when no answer token fits."""
    prompt = prompt_text(tokenizer, fmt, question)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        # Without a chat template, start as `tokenizer(prompt)` would at evaluation: with BOS if it adds one.
        if tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] and not prompt.startswith(tokenizer.bos_token):
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if len(prompt_ids) >= max_length:
        return None
    answer_ids = tokenizer(answer_text(tokenizer, answer), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids,
            "prompt_tokens": len(prompt_ids)}


def build_dataset(tokenizer, fmt, pairs, max_length):
    """A `datasets.Dataset` of tokenized pairs (input_ids, labels) and how many pairs were dropped."""
    import datasets

    def render(batch):
        out = {"input_ids": [], "labels": [], "prompt_tokens": []}
        for q, a in zip(batch["question"], batch["answer"]):
            item = tokenize_pair(tokenizer, fmt, q, a, max_length) or {"input_ids": [], "labels": [],
                                                                       "prompt_tokens": 0}
            for k in out:
                out[k].append(item[k])
        return out

    ds = datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [a for _, a in pairs]})
    ds = ds.map(render, batched=True, remove_columns=["question", "answer"], desc="rendering pairs")
    kept = ds.filter(lambda row: len(row["input_ids"]) > 0)
    return kept.remove_columns(["prompt_tokens"]), len(ds) - len(kept)


def split_heldout(pairs, seed):
    """(train, held-out): a seeded 5% (at most 64) held out when there are 20 pairs or more."""
    n_eval = min(64, len(pairs) // 20)
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in sorted(order[n_eval:])], [pairs[i] for i in sorted(order[:n_eval])]


def train_sft(sft, base_dir, out, prompt_fmt: PromptFormat | None = None, *, config_dir=None, name="task",
              callbacks=()) -> dict:
    """Fine-tune `base_dir` on the pairs of `sft` (an `SftConfig`, or an expert config with `.sft`) in `out`
    (resumed when interrupted); the expert is `out/model`. Relative data paths resolve against `config_dir`
    (the language YAML's folder). Returns the training summary with the pair counts."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    sft = getattr(sft, "sft", sft)
    if sft is None or not hasattr(sft, "data"):
        raise ConfigError(f"sft {name}: expected an sft section (data, train, max_length), got none")
    fmt = prompt_fmt or PromptFormat(template=ENGLISH_TEMPLATE)
    with main_process_first():  # a hub data set is downloaded once, into the shared cache
        pairs = load_pairs(sft.data, config_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    train_pairs, eval_pairs = split_heldout(pairs, sft.data.seed)
    train_ds, dropped = build_dataset(tokenizer, fmt, train_pairs, sft.max_length)
    if len(train_ds) == 0:
        raise DataError(f"sft {name}: every prompt is longer than max_length = {sft.max_length} tokens; raise "
                        f"max_length")
    eval_ds = build_dataset(tokenizer, fmt, eval_pairs, sft.max_length)[0] if eval_pairs else None
    padder = AutoTokenizer.from_pretrained(str(base_dir))  # the saved tokenizer stays the base's
    if padder.pad_token is None:
        padder.pad_token = padder.eos_token
    collator = DataCollatorForSeq2Seq(padder, padding=True, label_pad_token_id=-100)
    summary = train_and_save(base_dir, tokenizer, sft.train, out, train_dataset=train_ds, eval_dataset=eval_ds,
                             collator=collator, count_tokens="non_padding", callbacks=callbacks)
    if is_main_process():
        print_summary(f"SFT ({name}; {len(train_ds)} pairs, {dropped} too long)", summary, Path(out) / "model",
                      eval_label="held-out answer perplexity")
    return {"pairs": len(pairs), "train_pairs": len(train_ds), "eval_pairs": len(eval_pairs),
            "dropped_too_long": dropped, **summary}
