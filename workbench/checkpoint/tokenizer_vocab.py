"""The token strings of a model directory's tokenizer, by id, read from its files (no tokenizer is built)."""
import json
from pathlib import Path


def token_strings(model_dir) -> list[str | None] | None:
    """Token string of every id (None for an id nobody names), or None when there is no readable tokenizer.

    Read from `tokenizer.json` (BPE/WordPiece vocab dicts, Unigram piece lists, added tokens), else
    `vocab.json`, else a SentencePiece `tokenizer.model`; `added_tokens.json` and the
    `added_tokens_decoder` of `tokenizer_config.json` are laid over the slow-tokenizer files.
    """
    d = Path(model_dir)
    by_id = _from_tokenizer_json(d / "tokenizer.json")
    if by_id is None:
        by_id = _from_vocab_json(d / "vocab.json")
        if by_id is None:
            by_id = _from_sentencepiece(d / "tokenizer.model")
        if by_id is None:
            return None
        by_id.update(_added_tokens(d))
    if not by_id:
        return None
    out = [None] * (max(by_id) + 1)
    for i, token in by_id.items():
        out[i] = token
    return out


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _from_tokenizer_json(path: Path) -> dict | None:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    vocab = data["model"].get("vocab")
    if isinstance(vocab, dict):
        by_id = {i: t for t, i in vocab.items() if isinstance(i, int)}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        by_id = {i: entry[0] for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    else:
        return None
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("id"), int):
            by_id[added["id"]] = added.get("content")
    return by_id


def _from_vocab_json(path: Path) -> dict | None:
    vocab = _load_json(path)
    if not isinstance(vocab, dict):
        return None
    return {i: t for t, i in vocab.items() if isinstance(i, int)}


def _from_sentencepiece(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        import sentencepiece
    except ImportError:
        return None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        return None
    return {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())}


def _added_tokens(d: Path) -> dict:
    out = {}
    added = _load_json(d / "added_tokens.json")
    if isinstance(added, dict):
        out.update({i: t for t, i in added.items() if isinstance(i, int)})
    config = _load_json(d / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if isinstance(decoder, dict):
        for i, entry in decoder.items():
            if str(i).isdigit() and isinstance(entry, dict):
                out[int(i)] = entry.get("content")
    return out
