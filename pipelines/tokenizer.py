"""Tokenizer stage: how well the base tokenizer fits the target language (fertility), and optionally a
vocabulary extension trained on the corpus.

Fertility figures, on the training text and on the held-out text:
- tokens per whitespace word (left out for scripts that do not put spaces between words, e.g. Japanese);
- characters per token: the script-neutral figure, compared with `tokenizer.min_chars_per_token`; tokens per
  word, where the script spaces its words, compared with `tokenizer.max_tokens_per_word` (either one out of
  bounds and the report recommends vocabulary extension: Uyghur on SmolLM2 has 0.76 characters per token but
  9.3 tokens per word, against 2.8 for Swahili);
- the share of byte-fallback pieces (`<0x..>`, sentencepiece-style tokenizers), of tokens that are not whole
  characters (a byte-level BPE spelling a character in several byte tokens: the same symptom), and of
  unknown tokens.

Vocabulary extension: a sentencepiece model (`sp_model_type`, `sp_vocab_size`) is trained on the training
text; its pieces that the base tokenizer spells in more than one token are candidates, ranked by
gain = frequency in the sentencepiece segmentation of the corpus × (base tokens − 1), the number of tokens the
corpus would save if every occurrence became one token (ties: longer piece first, then the text). The top
`new_pieces` are added as `AddedToken`s matched on the raw text (`normalized=False`, `single_word=False`); a
word-initial piece (`▁word`) is added with its leading space (` word`), which is how byte-level BPE
tokenizers (GPT-2, Llama 3, SmolLM2) spell a word after a space. decode(encode(text)) must still give what the
base tokenizer gives, checked on the corpus. Embedding rows (and LM head rows when untied) of a new token
start as the mean of the rows of the base tokens that spelled it; tied models stay tied.
"""
import io
import re
from collections import Counter
from pathlib import Path

from workbench.errors import DataError
from workbench.pipelines.corpus import read_heldout, read_training_text
from workbench.pipelines.stage import write_json_atomic
from workbench.pipelines.training import has_tied_embeddings, save_model_atomic


BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# Scripts written without spaces between words: tokens per word means nothing there.
UNSPACED_SCRIPTS = {"Jpan", "Hani", "Hans", "Hant", "Thai", "Laoo", "Khmr", "Mymr", "Tibt"}
SAMPLE_CHARS = 2_000_000  # fertility is measured on at most this much text (documents in corpus order)
SP_TRAIN_CHARS = 20_000_000  # sentencepiece trains on at most this much


def take_chars(texts, limit):
    out, total = [], 0
    for t in texts:
        if total >= limit:
            break
        out.append(t)
        total += len(t)
    return out


def fertility(tokenizer, texts, *, script=None) -> dict:
    """Tokens per word, characters per token and the share of byte-fallback, partial-character and unknown tokens."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    counts = Counter(i for doc in ids for i in doc)
    tokens = sum(counts.values())
    words = sum(len(t.split()) for t in texts)
    chars = sum(len(t) for t in texts)
    pieces = dict(zip(counts, tokenizer.convert_ids_to_tokens(list(counts))))
    byte_fallback = sum(n for i, n in counts.items() if BYTE_PIECE.match(pieces[i] or ""))
    partial = sum(n for i, n in counts.items() if "\ufffd" in tokenizer.decode([i]))
    unknown = counts.get(tokenizer.unk_token_id, 0) if tokenizer.unk_token_id is not None else 0
    share = lambda n: n / tokens if tokens else 0.0  # noqa: E731
    return {"documents": len(texts), "characters": chars, "words": words, "tokens": tokens,
            "tokens_per_word": None if script in UNSPACED_SCRIPTS or not words else tokens / words,
            "chars_per_token": chars / tokens if tokens else 0.0, "byte_fallback_share": share(byte_fallback),
            "partial_char_share": share(partial), "unknown_share": share(unknown)}


def extension_reasons(f: dict, min_chars_per_token: float, max_tokens_per_word: float) -> list[str]:
    """Why a fertility row calls for vocabulary extension (empty when it does not)."""
    reasons = []
    if f["chars_per_token"] < min_chars_per_token:
        reasons.append(f"{f['chars_per_token']:.2f} characters per token < tokenizer.min_chars_per_token = "
                       f"{min_chars_per_token}")
    if f["tokens_per_word"] is not None and f["tokens_per_word"] > max_tokens_per_word:
        reasons.append(f"{f['tokens_per_word']:.2f} tokens per word > tokenizer.max_tokens_per_word = "
                       f"{max_tokens_per_word}")
    return reasons


def print_fertility(rows: dict, min_chars_per_token: float, max_tokens_per_word: float) -> None:
    """One line per (tokenizer, text) row, then the rows that call for vocabulary extension and why."""
    print(f"  {'tokenizer / text':24} {'tok/word':>9} {'chars/tok':>10} {'byte-fb':>8} {'partial':>8} {'unk':>6}")
    for label, f in rows.items():
        tpw = f"{f['tokens_per_word']:.2f}" if f["tokens_per_word"] is not None else "-"
        print(f"  {label:24} {tpw:>9} {f['chars_per_token']:>10.2f} {f['byte_fallback_share']:>8.1%} "
              f"{f['partial_char_share']:>8.1%} {f['unknown_share']:>6.1%}")
    for label, f in rows.items():
        if label.startswith("extended"):
            continue  # the recommendation is about the base tokenizer
        reasons = extension_reasons(f, min_chars_per_token, max_tokens_per_word)
        if reasons:
            print(f"  {label}: {'; '.join(reasons)}: vocabulary extension (tokenizer.extend_vocab: true) "
                  f"is recommended")


def train_sentencepiece(texts, *, vocab_size: int, model_type: str):
    """A sentencepiece model trained in memory on the texts."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
        character_coverage=0.9995, hard_vocab_limit=False, split_digits=True, byte_fallback=False,
        max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=proto.getvalue())


def select_new_pieces(sp, texts, base_tokenizer, n: int) -> list[dict]:
    """The `n` sentencepiece pieces with the largest gain (see the module docstring), as surface strings."""
    freq = Counter(p for doc in sp.encode(list(texts), out_type=int) for p in doc)
    candidates = {}
    for pid, count in freq.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or sp.is_unused(pid):
            continue
        surface = sp.id_to_piece(pid).replace("\u2581", " ")
        if surface.strip():
            candidates[surface] = candidates.get(surface, 0) + count
    surfaces = sorted(candidates)
    base_lengths = [len(ids) for ids in base_tokenizer(surfaces, add_special_tokens=False)["input_ids"]]
    scored = [{"piece": s, "frequency": candidates[s], "base_tokens": n_base,
               "gain": candidates[s] * (n_base - 1)} for s, n_base in zip(surfaces, base_lengths) if n_base > 1]
    scored.sort(key=lambda c: (-c["gain"], -len(c["piece"]), c["piece"]))
    return scored[:n]


def check_round_trip(base, extended, texts) -> None:
    for text in texts:
        want = base.decode(base(text, add_special_tokens=False)["input_ids"])
        got = extended.decode(extended(text, add_special_tokens=False)["input_ids"])
        if got != want:
            raise DataError(f"vocabulary extension: decode(encode(text)) changed the text {text[:60]!r}... "
                            f"(got {got[:60]!r}); the base tokenizer's kind is not supported for extension")


def extend_vocabulary(model_dir, out_dir, texts, *, new_pieces: int, sp_vocab_size: int, sp_model_type: str) -> dict:
    """Add the most useful sentencepiece pieces to the model's tokenizer, resize and initialize, save."""
    import torch
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

    base = AutoTokenizer.from_pretrained(str(model_dir))
    sp_texts = take_chars(texts, SP_TRAIN_CHARS)
    sp = train_sentencepiece(sp_texts, vocab_size=sp_vocab_size, model_type=sp_model_type)
    chosen = select_new_pieces(sp, sp_texts, base, new_pieces)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.add_tokens([AddedToken(c["piece"], single_word=False, normalized=False, special=False) for c in chosen])
    check_round_trip(base, tokenizer, take_chars(texts, 200_000))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    rows = model.get_input_embeddings().weight.shape[0]
    tied = has_tied_embeddings(model)
    model.resize_token_embeddings(max(rows, len(tokenizer)), mean_resizing=False)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    with torch.no_grad():
        for c in chosen:
            new_id = tokenizer.convert_tokens_to_ids(c["piece"])
            spelled = base(c["piece"], add_special_tokens=False)["input_ids"]
            c["id"], c["spelled_by"] = new_id, spelled
            emb[new_id] = emb[spelled].float().mean(0).to(emb.dtype)
            if not tied:
                head.weight[new_id] = head.weight[spelled].float().mean(0).to(head.weight.dtype)
    save_model_atomic(model, tokenizer, out_dir)
    return {"added": len(chosen), "vocab_before": len(base), "vocab_after": len(tokenizer), "tied": tied,
            "pieces": chosen}


def write_tokenizer_report(loaded, base_dir, text_dir, out: Path) -> dict | None:
    """Fertility report into `out` (and the extended model in `out/model` when the profile asks for it) from the
    documents of `text_dir` (`corpus.write_corpus_text`'s folder); None when the profile asks for neither."""
    from transformers import AutoTokenizer

    cfg = loaded.profile.tokenizer
    if not cfg.check and not cfg.extend_vocab:
        return None
    script = loaded.language.script
    out = Path(out)
    train = read_training_text(text_dir)
    texts = {"train": take_chars(train, SAMPLE_CHARS), "heldout": take_chars(read_heldout(text_dir), SAMPLE_CHARS)}
    base = AutoTokenizer.from_pretrained(str(base_dir))
    report = {"script": script, "min_chars_per_token": cfg.min_chars_per_token,
              "max_tokens_per_word": cfg.max_tokens_per_word,
              "base": {name: fertility(base, t, script=script) for name, t in texts.items()}}
    if cfg.extend_vocab:
        ext = extend_vocabulary(base_dir, out / "model", train, new_pieces=cfg.new_pieces,
                                sp_vocab_size=cfg.sp_vocab_size, sp_model_type=cfg.sp_model_type)
        write_json_atomic(out / "pieces.json", ext.pop("pieces"))
        extended = AutoTokenizer.from_pretrained(str(out / "model"))
        report["extended"] = {name: fertility(extended, t, script=script) for name, t in texts.items()}
        report["extension"] = ext
    report["extension_reasons"] = extension_reasons(report["base"]["train"], cfg.min_chars_per_token,
                                                    cfg.max_tokens_per_word)
    report["recommend_extension"] = bool(report["extension_reasons"])
    write_json_atomic(out / "fertility.json", report)
    print_tokenizer_report(report, out)
    return report


def print_tokenizer_report(report: dict, where) -> None:
    print(f"tokenizer fertility ({where}):")
    rows = {f"base / {k}": v for k, v in report["base"].items()}
    rows.update({f"extended / {k}": v for k, v in report.get("extended", {}).items()})
    print_fertility(rows, report["min_chars_per_token"], report.get("max_tokens_per_word", float("inf")))
    if "extension" in report:
        e = report["extension"]
        print(f"  added {e['added']} pieces: vocabulary {e['vocab_before']} -> {e['vocab_after']}")
