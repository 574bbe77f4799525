"""The token strings of a model directory's tokenizer, by id, read from its files (no tokenizer is built)."""
from pathlib import Path

from workbench.errors import InvalidModelError, WorkbenchError
from workbench.user_files import read_json, regular_file_exists


def token_strings(model_dir, rows: int | None = None) -> list[str | None] | None:
    """Token string of every id (None for an id nobody names), or None when there is no readable tokenizer.

    Read from `tokenizer.json` (BPE/WordPiece vocab dicts, Unigram piece lists, added tokens), else
    `vocab.json`, else a SentencePiece `tokenizer.model`; `added_tokens.json` and the
    `added_tokens_decoder` of `tokenizer_config.json` are laid over the slow-tokenizer files.
    Every id must lie in [0, rows), the model's vocabulary rows (without `rows`: below the number of
    tokens the files name), before the list is built: a 60-byte file naming id 10^12 must not allocate it.
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
    limit = rows if rows is not None else len(by_id)
    outside = [i for i in by_id if not 0 <= i < limit]
    if outside:
        i = max(outside, key=abs)
        what = f"the model's {rows} vocabulary rows" if rows is not None else f"the {limit} tokens the files name"
        raise InvalidModelError(f"{d}: the tokenizer gives token {by_id[i]!r} the id {i}, outside {what}; "
                                f"expected ids 0 to {limit - 1} (the tokenizer files do not belong to this model)")
    out = [None] * (max(by_id) + 1)
    for i, token in by_id.items():
        out[i] = token
    return out


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_json(path: Path):
    """Parsed JSON, or None when the file is missing or unreadable (a FIFO or device is an error)."""
    if not regular_file_exists(path):
        return None
    try:
        return read_json(path)
    except WorkbenchError:
        return None


def _from_tokenizer_json(path: Path) -> dict | None:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    vocab = data["model"].get("vocab")
    if isinstance(vocab, dict):
        by_id = {i: t for t, i in vocab.items() if _is_id(i)}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        by_id = {i: entry[0] for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    else:
        return None
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and _is_id(added.get("id")):
            by_id[added["id"]] = added.get("content")
    return by_id


def _from_vocab_json(path: Path) -> dict | None:
    vocab = _load_json(path)
    if not isinstance(vocab, dict):
        return None
    return {i: t for t, i in vocab.items() if _is_id(i)}


def _from_sentencepiece(path: Path) -> dict | None:
    if not regular_file_exists(path):
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
        out.update({i: t for t, i in added.items() if _is_id(i)})
    config = _load_json(d / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if isinstance(decoder, dict):
        for i, entry in decoder.items():
            if str(i).isdigit() and isinstance(entry, dict):
                out[int(i)] = entry.get("content")
    return out
