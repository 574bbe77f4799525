"""A model folder's tokenizer as GGUF metadata, the way llama.cpp reads it.

Two kinds, told apart by `tokenizer.json` (else a SentencePiece `tokenizer.model`):
- byte-level BPE (GPT-2, Llama 3, SmolLM2): `tokenizer.ggml.model = gpt2`, the tokens spelled in the
  byte alphabet as `tokenizer.json` spells them, the merges, and the pre-tokenizer's llama.cpp name;
- SentencePiece (Llama 2, Mistral): `tokenizer.ggml.model = llama`, pieces with `▁`, scores and byte tokens.

Token types follow llama.cpp's converter: added tokens marked special are CONTROL; other added tokens
(a vocabulary extension's new pieces) are USER_DEFINED and written as raw text, because llama.cpp matches
such tokens on the raw input; `<0xNN>` pieces are BYTE. Every embedding row gets a token: rows beyond the
tokenizer (padding, or an extension whose tokenizer has fewer entries) become `[PAD<id>]`, UNUSED, so an
extended vocabulary is exported with all its rows. gguf-py's `SpecialVocab` supplies the merges, the
special token ids, the add-BOS/EOS flags and the chat template.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import CheckpointError, UnsupportedModelError

BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass
class Vocabulary:
    """What goes into the `tokenizer.*` keys of a GGUF file."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre: llama.cpp's name for the pre-tokenizer
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    special: object  # gguf.SpecialVocab: merges, special ids, add_* flags, chat template
    padded: int = 0  # rows with no token of their own ([PAD<id>])
    add_space_prefix: bool = False  # SentencePiece: a "▁" is put before the text
    notes: list[str] = field(default_factory=list)

    @property
    def chat_template(self) -> str | None:
        template = self.special.chat_template
        return template if isinstance(template, str) else None

    def token_id(self, kind: str) -> int | None:
        """The id of the bos/eos/unk/pad token, if the tokenizer names one."""
        return self.special.special_token_ids.get(kind)


def read_vocabulary(model_dir, rows: int) -> Vocabulary:
    """The tokenizer of `model_dir` for a model with `rows` embedding rows."""
    import gguf

    model_dir = Path(model_dir)
    spec = _load_json(model_dir / "tokenizer.json")
    if spec is not None:
        kind = _kind_of(spec, model_dir / "tokenizer.json")
        by_id, types, scores = _from_tokenizer_json(spec, kind)
    elif (model_dir / "tokenizer.model").is_file():
        kind = "llama"
        by_id, types, scores = _from_sentencepiece(model_dir / "tokenizer.model", model_dir)
    else:
        raise CheckpointError(f"{model_dir}: no tokenizer (expected tokenizer.json or a SentencePiece "
                              f"tokenizer.model beside config.json); a GGUF file carries its tokenizer")
    size = max(by_id) + 1 if by_id else 0
    if size > rows:
        raise CheckpointError(f"{model_dir}: the tokenizer has {size} tokens but the embedding only {rows} rows; "
                              f"expected at most as many tokens as rows (was the embedding resized after "
                              f"tokens were added?)")
    tokens, token_types, token_scores, padded = [], [], [], 0
    for i in range(rows):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
            token_scores.append(scores.get(i, 0.0))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
            token_scores.append(-1000.0)
            padded += 1
    special = gguf.SpecialVocab(model_dir, load_merges=kind == "gpt2", n_vocab=rows)
    if kind == "gpt2" and not special.merges:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'}: a byte-level BPE tokenizer without merges; "
                              f"expected model.merges")
    if kind == "llama":  # the merges let transformers' GGUF reader rebuild the exact tokenizer; llama.cpp uses scores
        special.merges = _merges(spec) if spec is not None else []
    pre = _pre_tokenizer_name(spec, model_dir) if kind == "gpt2" else "default"
    special.add_special_token.update(_added_specials(model_dir))
    notes = [f"{padded} embedding row(s) without a token written as [PAD<id>]"] if padded else []
    return Vocabulary(model=kind, pre=pre, tokens=tokens, token_types=token_types,
                      scores=token_scores if kind == "llama" else None, special=special, padded=padded, notes=notes,
                      add_space_prefix=kind == "llama" and _adds_space_prefix(spec))


def add_vocabulary(writer, vocab: Vocabulary):
    """Write the `tokenizer.*` keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)


def _added_specials(model_dir: Path) -> dict:
    """{"bos": bool, "eos": bool}: whether the tokenizer itself puts BOS before / EOS after a text, as the
    tokenizer does it (flags in tokenizer_config.json and post-processor templates both count)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # a tokenizer transformers cannot build is no use to llama.cpp either
        raise CheckpointError(f"{model_dir}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") \
            from None
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    return {"bos": tok.bos_token_id is not None and full[:1] == [tok.bos_token_id] and plain[:1] != full[:1],
            "eos": tok.eos_token_id is not None and full[-1:] == [tok.eos_token_id] and plain[-1:] != full[-1:]}


def _adds_space_prefix(spec) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (normalizer Prepend, or Metaspace)."""
    if spec is None:
        return True  # a bare tokenizer.model: sentencepiece's add_dummy_prefix default
    parts = []
    for key in ("normalizer", "pre_tokenizer"):
        node = spec.get(key) or {}
        parts += [node] + list(node.get("normalizers") or node.get("pretokenizers") or [])
    for part in parts:
        if part.get("type") == "Prepend" and part.get("prepend") == "\u2581":
            return True
        if part.get("type") == "Metaspace" and part.get("prepend_scheme", "always") != "never" \
                and part.get("add_prefix_space", True):
            return True
    return False


def _load_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); expected a tokenizers tokenizer.json") from None


def _kind_of(spec: dict, where: Path) -> str:
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    decoders = [decoder] + list(decoder.get("decoders") or [])
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback") and any(
            d.get("type") in ("Replace", "ByteFallback", "Metaspace") for d in decoders):
        return "llama"
    raise UnsupportedModelError(
        f"{where}: a {model.get('type', 'unknown')} tokenizer with a {decoder.get('type', 'missing')} decoder "
        f"cannot be written to GGUF; expected byte-level BPE (GPT-2, Llama 3, SmolLM2) or SentencePiece-style "
        f"BPE with byte fallback (Llama 2, Mistral)")


def _from_tokenizer_json(spec: dict, kind: str):
    import gguf

    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {i: int(gguf.TokenType.BYTE if kind == "llama" and BYTE_TOKEN.match(t) else gguf.TokenType.NORMAL)
             for i, t in by_id.items()}
    for added in spec.get("added_tokens") or []:
        i, text = added["id"], added["content"]
        if added.get("special"):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            if kind == "llama":
                text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens on raw text
            types[i] = int(gguf.TokenType.USER_DEFINED)
        by_id[i] = text
    unk = model.get("unk_token")
    for i, t in by_id.items():
        if t == unk and kind == "llama":  # SentencePiece's unknown piece (byte-level BPE never needs one)
            types[i] = int(gguf.TokenType.UNKNOWN)
    scores = _merge_rank_scores(spec, by_id) if kind == "llama" else {}
    return by_id, types, scores


def _merge_rank_scores(spec: dict, by_id: dict) -> dict:
    """SentencePiece-style scores from a BPE's merge order: the token made by merge r scores -r, so
    llama.cpp's score-driven merging applies the merges in the BPE's own order."""
    rank = {}
    for r, pair in enumerate(_merges(spec)):
        left, right = pair.split(" ", 1)
        rank.setdefault((left + right).replace(chr(ord(" ") + 256), " "), r)
    return {i: -float(rank[t]) if t in rank else 0.0 for i, t in by_id.items()}


def _merges(spec: dict) -> list[str]:
    merges = (spec.get("model") or {}).get("merges") or []
    if merges and isinstance(merges[0], list):  # tokenizers >= 0.20 writes pairs; GGUF keeps "left right"
        return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]
    return list(merges)


def _from_sentencepiece(path: Path, model_dir: Path):
    import gguf

    try:
        vocab = gguf.SentencePieceVocab(model_dir)
    except Exception as e:  # a corrupt model file or inconsistent added_tokens.json
        raise CheckpointError(f"{path}: cannot read as a SentencePiece model ({e})") from None
    by_id, types, scores = {}, {}, {}
    for i, (text, score, toktype) in enumerate(vocab.all_tokens()):
        by_id[i], types[i], scores[i] = text.decode("utf-8"), int(toktype), score
    return by_id, types, scores


def _pre_tokenizer_name(spec: dict, model_dir: Path) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, read from its structure in tokenizer.json."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    shape = [(s.get("type"), s.get("use_regex"), s.get("individual_digits")) for s in steps]
    if shape == [("ByteLevel", True, None)]:
        return "gpt-2"
    if shape == [("Digits", None, True), ("ByteLevel", True, None)]:
        return "smollm"
    if len(steps) == 2 and shape[1] == ("ByteLevel", False, None) and steps[0].get("type") == "Split" \
            and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise UnsupportedModelError(
        f"{model_dir / 'tokenizer.json'}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
        f"known to workbench; expected ByteLevel (GPT-2), Digits + ByteLevel (SmolLM) or the Llama 3 split")
