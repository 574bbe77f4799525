"""MGSM-format task data: `question<TAB>answer` files (the real MGSM files, or generated problems), the hub
copy, and the fixed, seeded sample that evaluation scores.
"""
import random
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import DataError, HubUnavailableError
from workbench.evaluation.answers import parse_number


@dataclass(frozen=True)
class MgsmItem:
    """One problem: the question, its numeric gold answer, and where it came from (file:line)."""

    question: str
    answer: int | float
    source: str


def read_mgsm_tsv(path) -> list[MgsmItem]:
    """Every row of a `question<TAB>answer` file; DataError names the file and line of a malformed row.

    Blank lines are skipped; the answer may carry thousands commas ("114,200").
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such MGSM-format file (expected question<TAB>answer lines)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text: {e}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        answer = parse_number(fields[1]) if len(fields) == 2 else None
        if len(fields) != 2 or not fields[0].strip() or answer is None:
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise DataError(f"{path}, line {number}: expected question<TAB>numeric answer, got {shown!r} "
                            f"({len(fields)} tab-separated field(s))")
        items.append(MgsmItem(fields[0].strip(), answer, f"{path.name}:{number}"))
    if not items:
        raise DataError(f"{path}: no rows (expected question<TAB>answer lines)")
    return items


def load_mgsm_hub(dataset: str, config: str | None, split: str = "test") -> list[MgsmItem]:
    """The hub copy (e.g. `juletxara/mgsm`, config `sw`): its `question` and `answer_number` columns."""
    import datasets

    name = f"{dataset}" + (f" ({config})" if config else "")
    try:
        rows = datasets.load_dataset(dataset, config, split=split)
    except (ConnectionError, OSError) as e:
        raise HubUnavailableError(
            f"cannot load the data set {name} from the Hugging Face Hub ({type(e).__name__}): point at a local "
            f"question<TAB>answer file instead (eval.mgsm.path in the language YAML, or `workbench eval --mgsm FILE`)") from None
    missing = {"question", "answer_number"} - set(rows.column_names)
    if missing:
        raise DataError(f"{name} [{split}]: expected the columns question and answer_number, "
                        f"missing {', '.join(sorted(missing))}")
    return [MgsmItem(r["question"], r["answer_number"], f"{dataset}:{config or ''}:{split}[{i}]")
            for i, r in enumerate(rows)]


def load_mgsm(cfg, base_dir: Path) -> list[MgsmItem]:
    """Every row named by an `eval.mgsm` config section: the local file when set, else the hub copy."""
    if cfg.path:
        path = Path(cfg.path)
        return read_mgsm_tsv(path if path.is_absolute() else Path(base_dir) / path)
    if cfg.hub:
        return load_mgsm_hub(cfg.hub, cfg.config, cfg.split)
    raise DataError("eval.mgsm: expected a path (question<TAB>answer file) or a hub data set")


def sample_items(items: list, n: int, seed: int = 0) -> list:
    """A fixed subset of `n` items (all when n >= len), in file order.

    A seeded shuffle's first n, so a smaller sample is part of a larger one with the same seed (the
    --fast variant's problems are among the full run's).
    """
    if n >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]
