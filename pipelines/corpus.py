"""Corpus stages: the profile's sources -> clean, deduplicated documents -> a held-out split -> a token budget
with an optional replay share -> fixed-length training blocks with EOS between documents.

Two stages (`corpus` and `blocks` in pipelines/adapt.py), so that a new tokenizer (vocabulary extension)
re-tokenizes without re-reading; each writes into the folder the runner gives it:
- `write_corpus_text`: documents read with `datasets`, cleaned (Unicode NFC, whitespace), shorter than
  `min_chars` dropped, exact duplicates dropped (first occurrence kept; replay documents are deduplicated
  against the target ones too), then the held-out split: max(1, round(heldout_fraction · n)) target
  documents chosen by a seeded permutation; the rest, in that permuted order, are the training documents.
  The split comes before the budget, so a token-count sweep (`max_tokens`) keeps the same held-out set.
- `write_blocks`: the documents tokenized (`datasets.map`), the budget and replay taken, packed.

Exact counts, all in tokens of the given tokenizer, EOS not counted as text:
- budget: whole training documents in order until the budget; the document that crosses it is cut so that
  the target tokens are exactly `max_tokens` (all of them when the corpus has fewer);
- replay: R = round(ratio / (1 − ratio) · T) tokens of replay documents, taken the same way;
- packing: the used documents in a seeded shuffle, each followed by EOS, concatenated and cut into
  ⌊stream / block_size⌋ blocks; the tail shorter than a block is dropped (and counted).
Held-out documents are packed the same way into their own blocks (`heldout_blocks.npy`; one shorter block
when they hold less than a block) and kept as text (`heldout.jsonl`) for perplexity; never trained on.
"""
import hashlib
import json
import re
import shutil
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workbench.config.schema import to_dict
from workbench.errors import DataError
from workbench.pipelines.sources import iter_column, load_rows, local_identity, require_columns, select_rows
from workbench.pipelines.stage import write_json_atomic


_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but the newline
_BLANK_RUNS = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """NFC; one space for each run of spaces or tabs; lines stripped; at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


@dataclass
class SourceCounts:
    documents_read: int = 0
    dropped_short: int = 0
    dropped_duplicate: int = 0
    kept: int = 0


def read_source_documents(loaded, names, *, min_chars: int, seen, counts: SourceCounts):
    """Yield the cleaned documents of the profile's named sources; `seen` (a set of hashes) deduplicates, or None."""
    for name in names:
        src = loaded.language.sources[name]
        rows = load_rows(name, path=src.path, hub=src.hub, config=src.config, split=src.split,
                         revision=src.revision, streaming=src.streaming, base_dir=loaded.base_dir)
        require_columns(rows, name, [src.text_field])
        rows = select_rows(rows, name, filter=src.filter, max_rows=src.max_rows)
        read = 0
        for raw in iter_column(rows, src.text_field):
            if not raw.strip():
                continue  # a blank line of a .txt file is not a document
            read += 1
            text = clean_text(raw)
            if len(text) < min_chars:
                counts.dropped_short += 1
                continue
            if seen is not None:
                digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    counts.dropped_duplicate += 1
                    continue
                seen.add(digest)
            counts.kept += 1
            yield text
        counts.documents_read += read
        if read == 0:
            how = f" after filter {dict(src.filter)}" if src.filter else ""
            raise DataError(f"source {name!r}: no documents{how} in column {src.text_field!r}; expected at least one")


def source_inputs(loaded, names) -> dict:
    """Each named source's settings, plus the content hash of local files."""
    out = {}
    for name in names:
        src = loaded.language.sources[name]
        entry = {k: v for k, v in to_dict(src).items() if k not in ("license", "description", "gated")}
        if src.path:
            entry["file"] = local_identity(src.path, loaded.base_dir)
        out[name] = entry
    return out


def write_corpus_text(loaded, out: Path) -> dict:
    """Read, clean, deduplicate and split the profile's corpus into `out` (target/, replay/, heldout.jsonl,
    stats.json); returns the stats."""
    import datasets

    cfg = loaded.profile.corpus
    replay_names = cfg.replay.sources if cfg.replay else []
    seen = set() if cfg.dedup else None
    target = SourceCounts()
    docs = list(read_source_documents(loaded, cfg.sources, min_chars=cfg.min_chars, seen=seen, counts=target))
    if not docs:
        raise DataError(f"corpus: no documents left from sources {', '.join(cfg.sources)} (read "
                        f"{target.documents_read}, {target.dropped_short} shorter than corpus.min_chars = "
                        f"{cfg.min_chars}, {target.dropped_duplicate} duplicates); expected at least two")
    n_heldout = max(1, round(cfg.heldout_fraction * len(docs)))
    if n_heldout >= len(docs):
        raise DataError(f"corpus: {len(docs)} document(s) from sources {', '.join(cfg.sources)} leave none for "
                        f"training after the held-out split (corpus.heldout_fraction = {cfg.heldout_fraction}); "
                        f"expected more documents")
    order = np.random.default_rng(cfg.seed).permutation(len(docs))
    heldout = [docs[i] for i in sorted(order[:n_heldout])]
    train = [docs[i] for i in order[n_heldout:]]
    replay_counts = SourceCounts()
    replay = list(read_source_documents(loaded, replay_names, min_chars=cfg.min_chars, seen=seen,
                                        counts=replay_counts))
    replay = [replay[i] for i in np.random.default_rng(cfg.seed + 1).permutation(len(replay))]

    datasets.Dataset.from_dict({"text": train}).save_to_disk(str(out / "target"))
    datasets.Dataset.from_dict({"text": replay}).save_to_disk(str(out / "replay"))
    write_jsonl(out / "heldout.jsonl", heldout)
    stats = {"target": {**asdict(target), "heldout": len(heldout), "train": len(train)},
             "replay": asdict(replay_counts)}
    write_json_atomic(out / "stats.json", stats)
    return stats


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def read_heldout(folder) -> list[str]:
    """The held-out documents (text) that `write_corpus_text` or `write_blocks` wrote into `folder`."""
    with open(Path(folder) / "heldout.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def read_training_text(folder) -> list[str]:
    """The target-language training documents (all of them, before the budget) of `write_corpus_text`'s folder."""
    import datasets

    return list(datasets.load_from_disk(str(Path(folder) / "target"))["text"])


def load_tokenizer(model_dir):
    """The model's tokenizer; packing needs its EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.eos_token_id is None:
        raise DataError(f"{model_dir}: the tokenizer has no EOS token (eos_token is unset); packing puts EOS between "
                        f"documents: set eos_token in its tokenizer_config.json")
    return tokenizer


def budget_cut(lengths, budget):
    """[(index, tokens taken)] of documents taken in order until `budget` tokens; the last one is cut to fit."""
    taken, total = [], 0
    for i, n in enumerate(lengths):
        if budget is not None and total + n >= budget:
            taken.append((i, budget - total))
            return taken, budget
        taken.append((i, int(n)))
        total += int(n)
    return taken, total


def tokenize_documents(path: Path, tokenizer, cache_file: Path):
    """A saved Dataset of texts -> its token ids (`datasets.map`, cached in the stage directory)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if len(ds) == 0:
        return []
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tokens = ds.map(lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                    batched=True, remove_columns=["text"], cache_file_name=str(cache_file),
                    desc=f"tokenizing {path.name}")
    return list(tokens.with_format("numpy")["input_ids"])


def pack(pieces, eos_id: int, block_size: int):
    """Concatenate token arrays, each followed by EOS, and cut into blocks -> (blocks, stream length)."""
    if not pieces:
        return np.zeros((0, block_size), dtype=np.int32), 0
    eos = np.array([eos_id], dtype=np.int64)
    stream = np.concatenate([part for p in pieces for part in (np.asarray(p, dtype=np.int64), eos)])
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size).astype(np.int32), len(stream)


def pack_heldout(docs_ids, eos_id: int, block_size: int):
    """Held-out blocks; one shorter block when the held-out text holds less than a block."""
    blocks, length = pack(docs_ids, eos_id, block_size)
    if len(blocks) == 0 and length > 1:
        stream = np.concatenate([part for p in docs_ids for part in (np.asarray(p), [eos_id])])
        blocks = stream.reshape(1, -1).astype(np.int32)
    return blocks


def budgeted_documents(text_dir: Path, tokenizer, max_tokens, ratio: float, cache: Path):
    """The token arrays to pack (budget-cut target documents, then replay ones) and their counts."""
    target_ids = tokenize_documents(text_dir / "target", tokenizer, cache / "target.arrow")
    target_taken, n_target = budget_cut([len(t) for t in target_ids], max_tokens)
    replay_ids, replay_taken, n_replay, replay_wanted = [], [], 0, 0
    if ratio > 0:
        replay_ids = tokenize_documents(text_dir / "replay", tokenizer, cache / "replay.arrow")
        replay_wanted = round(ratio / (1 - ratio) * n_target)
        replay_taken, n_replay = budget_cut([len(t) for t in replay_ids], replay_wanted)
    pieces = [target_ids[i][:n] for i, n in target_taken] + [replay_ids[i][:n] for i, n in replay_taken]
    return pieces, {"target": n_target, "replay": n_replay, "target_available": int(sum(map(len, target_ids))),
                    "replay_wanted": replay_wanted, "replay_share": n_replay / max(1, n_target + n_replay),
                    "target_used": len(target_taken), "replay_used": len(replay_taken)}


def write_blocks(loaded, tokenizer_dir, text_dir, out: Path) -> dict:
    """Pack the documents of `text_dir` (`write_corpus_text`'s folder) into training blocks in `out`
    (train_blocks.npy, heldout_blocks.npy, heldout.jsonl, stats.json); returns the stats."""
    cfg = loaded.profile.corpus
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.block_size:
        raise loaded.where("corpus.max_tokens").error(
            f"a budget of {cfg.max_tokens} tokens is smaller than one block "
            f"({loaded.where('corpus.block_size').located()} = {cfg.block_size}); expected max_tokens >= block_size")
    tokenizer = load_tokenizer(tokenizer_dir)
    text_dir, out = Path(text_dir), Path(out)
    ratio = cfg.replay.ratio if cfg.replay else 0.0
    pieces, counts = budgeted_documents(text_dir, tokenizer, cfg.max_tokens, ratio, out / "cache")
    order = np.random.default_rng(cfg.seed).permutation(len(pieces))
    blocks, stream_len = pack([pieces[i] for i in order], tokenizer.eos_token_id, cfg.block_size)
    if len(blocks) == 0:
        raise DataError(f"corpus: sources {', '.join(cfg.sources)} give {stream_len} tokens with EOS, fewer than one "
                        f"block ({loaded.where('corpus.block_size').located()} = {cfg.block_size}); add text or lower "
                        f"block_size")
    heldout_docs = read_heldout(text_dir)
    heldout_ids = tokenizer(heldout_docs, add_special_tokens=False)["input_ids"]
    heldout_blocks = pack_heldout(heldout_ids, tokenizer.eos_token_id, cfg.block_size)
    np.save(out / "train_blocks.npy", blocks)
    np.save(out / "heldout_blocks.npy", heldout_blocks)
    shutil.copyfile(text_dir / "heldout.jsonl", out / "heldout.jsonl")
    shutil.rmtree(out / "cache", ignore_errors=True)
    stats = json.loads((text_dir / "stats.json").read_text(encoding="utf-8"))
    stats["target"]["used"], stats["replay"]["used"] = counts.pop("target_used"), counts.pop("replay_used")
    stats["tokens"] = {**counts, "eos": len(pieces), "stream": stream_len, "packed": int(blocks.size),
                       "dropped_tail": stream_len - int(blocks.size), "budget": cfg.max_tokens,
                       "budget_reached": cfg.max_tokens is not None and counts["target"] == cfg.max_tokens}
    stats["blocks"] = {"train": len(blocks), "block_size": cfg.block_size, "heldout": len(heldout_blocks),
                       "heldout_tokens": int(heldout_blocks.size)}
    write_json_atomic(out / "stats.json", stats)
    print_corpus_stats(stats, out)
    return stats


def print_corpus_stats(stats: dict, where) -> None:
    t, r, tok, b = stats["target"], stats["replay"], stats["tokens"], stats["blocks"]
    print(f"corpus ({where}):")
    print(f"  {'':8} {'read':>8} {'short':>8} {'dup':>8} {'kept':>8} {'used':>8} {'tokens':>10}")
    print(f"  {'target':8} {t['documents_read']:>8} {t['dropped_short']:>8} {t['dropped_duplicate']:>8} "
          f"{t['kept']:>8} {t.get('used', '-'):>8} {tok['target']:>10}")
    print(f"  {'replay':8} {r['documents_read']:>8} {r['dropped_short']:>8} {r['dropped_duplicate']:>8} "
          f"{r['kept']:>8} {r.get('used', '-'):>8} {tok['replay']:>10}")
    print(f"  held-out documents {t['heldout']} ({b['heldout_tokens']} tokens in {b['heldout']} block(s)); "
          f"{b['train']} training blocks of {b['block_size']} tokens; replay share {tok['replay_share']:.3f}; "
          f"{tok['dropped_tail']} tail tokens dropped")
    if tok["budget"] is not None and not tok["budget_reached"]:
        print(f"  note: the corpus holds {tok['target_available']} target tokens, less than the budget "
              f"max_tokens = {tok['budget']}")
    if tok["replay_wanted"] and tok["replay"] < tok["replay_wanted"]:
        print(f"  note: the replay sources hold {tok['replay']} tokens, less than the {tok['replay_wanted']} wanted")
