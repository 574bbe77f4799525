"""Read a data source as rows with `datasets`: a local file (.txt, .jsonl, .parquet, .tsv) or a Hugging Face
data set (id + config + split + revision, streamed when it is large), then `filter` and `max_rows`.

Used by the corpus stage (text) and the SFT stage (question/answer pairs). Errors name the source and say
what was expected; a hub data set that cannot be reached says how to use a local file instead.
"""
import csv
from pathlib import Path

from workbench.errors import DataError, HubUnavailableError
from workbench.provenance import file_sha256


# File suffix -> the `datasets` builder that reads it. `.txt` is one document a line.
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".tsv": "csv"}


def resolve_local(path: str, base_dir) -> Path:
    """A config `path:` (relative to the YAML's folder unless absolute)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


def local_identity(path: str, base_dir) -> dict:
    """What a stage key needs to know of a local file: where it is and its content hash."""
    p = resolve_local(path, base_dir)
    return {"path": str(p.resolve()), "sha256": file_sha256(p) if p.is_file() else None}


def load_rows(name: str, *, path=None, hub=None, config=None, split="train", revision=None, streaming=False,
              base_dir=None, tsv_columns=None):
    """The rows of one source as a `datasets` Dataset (or IterableDataset when streaming a hub set).

    `tsv_columns` names the columns of a .tsv file that has no header row.
    """
    import datasets

    if path is not None:
        file = resolve_local(path, base_dir)
        suffix = file.suffix.lower()
        if suffix not in LOCAL_BUILDERS:
            raise DataError(f"source {name!r}: {path}: unsupported file type {suffix or '(none)'}; expected one of "
                            f"{', '.join(LOCAL_BUILDERS)}")
        if not file.is_file():
            raise DataError(f"source {name!r}: {file}: no such file; expected a local {', '.join(LOCAL_BUILDERS)} "
                            f"file (a relative path: is read from {base_dir})")
        kwargs = {}
        if suffix == ".tsv":
            # Plain tab-separated text: quotes are ordinary characters and 'NA' stays a string.
            kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "na_filter": False}
            if tsv_columns:
                kwargs.update(column_names=list(tsv_columns), header=None)
        try:
            return datasets.load_dataset(LOCAL_BUILDERS[suffix], data_files=str(file), split="train", **kwargs)
        except Exception as e:  # a malformed file: name it
            raise DataError(f"source {name!r}: {file}: cannot read as {suffix}: {type(e).__name__}: {e}") from None
    where = f"{hub!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    try:
        return datasets.load_dataset(hub, config, split=split, streaming=streaming, revision=revision)
    except (ConnectionError, TimeoutError) as e:
        raise HubUnavailableError(
            f"source {name!r}: cannot reach the data set {where} on the Hugging Face Hub ({e}); without hub "
            f"access, download it elsewhere and point the source at a local file instead: `path: FILE` "
            f"(.txt one document a line, .jsonl, .parquet or .tsv) with `text_field:` naming the column") from None
    except Exception as e:
        raise DataError(f"source {name!r}: cannot load the data set {where} from the Hugging Face Hub: "
                        f"{type(e).__name__}: {e}") from None


def require_columns(rows, name: str, columns) -> None:
    """Fail early, naming the source, when a needed column is missing (unknown for some streamed sets)."""
    have = rows.column_names
    if have is None:
        return
    for col in columns:
        if col not in have:
            raise DataError(f"source {name!r}: no column {col!r}; the data has: {', '.join(have)}")


def select_rows(rows, name: str, *, filter=None, max_rows=None):
    """Keep rows whose columns equal the `filter` values, then at most `max_rows` of them."""
    if filter:
        require_columns(rows, name, filter)
        wanted = {k: str(v) for k, v in filter.items()}
        rows = rows.filter(lambda row: all(str(row[k]) == v for k, v in wanted.items()))
    if max_rows is not None:
        rows = rows.take(max_rows)
    return rows


def iter_column(rows, column: str, batch_size: int = 1000):
    """Yield one column's values (None as empty string), batch by batch."""
    for batch in rows.iter(batch_size=batch_size):
        for value in batch[column]:
            yield "" if value is None else str(value)
