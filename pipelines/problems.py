"""Generated word problems: English ones train the task expert, held-out ones in the target language (and
English) evaluate it (docs/design.md §9).

A problem is one or two operations (+, -, ×, ÷ with exact results) on small numbers, rendered from the
language's templates (`problem_templates.py`) with a worked answer that ends in the result, as MGSM's
exemplars do: "Amina has 3 mangoes and buys 4 more. 3 + 4 = 7. The answer is 7."

Seeded and deterministic. The random draws do not depend on the language, so the same seed gives the
same operations, numbers, names and objects in every language: parallel problem sets, whose accuracies
compare directly. The arithmetic is split by a hash of (operation, numbers): `split="heldout"` problems
never share their arithmetic with `split="train"` ones, whatever the seeds, so a task expert trained on
generated English problems is never tested on the same sums (in English or translated).
"""
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import ConfigError
from workbench.pipelines.problem_templates import LANGUAGES

OPERATIONS = ("add", "sub", "mul", "div", "add_mul", "add_sub")
HELDOUT_SHARE = 5  # one arithmetic pattern in five is held out
WORD_CHANCE = 0.3  # how often a small operand is spelled out in a question, where the language does that


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the worked answer, ending with the number
    number: int


def supported_languages() -> list[str]:
    return sorted(LANGUAGES)


def draw_numbers(op: str, rng: random.Random) -> tuple[tuple[int, int, int], int]:
    """Operands (a, b, c; c = 0 when unused) and the result of `op`; every number is at least 2."""
    if op == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return (a, b, 0), a + b
    if op == "sub":
        a = rng.randint(5, 30)
        b = rng.randint(2, a - 2)
        return (a, b, 0), a - b
    if op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (a, b, 0), a * b
    if op == "div":
        b, r = rng.randint(2, 6), rng.randint(2, 9)
        return (b * r, b, 0), r
    if op == "add_mul":
        a, b, c = rng.randint(2, 20), rng.randint(2, 5), rng.randint(2, 9)
        return (a, b, c), a + b * c
    if op == "add_sub":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        c = rng.randint(2, a + b - 2)
        return (a, b, c), a + b - c
    raise ValueError(f"unknown operation {op!r}")


def is_heldout(op: str, numbers: tuple) -> bool:
    """Whether this arithmetic belongs to the held-out split (a fixed hash, independent of seeds)."""
    digest = hashlib.sha256(f"{op}:{':'.join(map(str, numbers))}".encode()).digest()
    return digest[0] % HELDOUT_SHARE == 0


def _pick(items: tuple, rng: random.Random) -> dict:
    return items[rng.randrange(1 << 30) % len(items)]  # the same draw whatever the list's length


def _render(lang, op, numbers, result, rng) -> Problem:
    a, b, c = numbers
    slots = {**_pick(lang.names, rng), **_pick(lang.objects, rng), **_pick(lang.containers, rng)}
    spelled = [rng.random() < WORD_CHANCE for _ in numbers]
    for key, n, spell in zip("ABC", numbers, spelled):
        slots[key] = lang.number_words[n] if spell and n in lang.number_words else lang.count.format(n=n)
    slots.update(a=a, b=b, c=c, ab=a + b, bc=b * c, r=result)
    question, answer = lang.templates[op]
    return Problem(question.format(**slots), answer.format(**slots), result)


def generate_problems(lang: str, n: int, seed: int, *, split: str | None = "train") -> list[Problem]:
    """`n` distinct word problems in language `lang`, deterministic for `seed`.

    split: "train" (the default, for SFT), "heldout" (for evaluation) or None (either).
    """
    if lang not in LANGUAGES:
        raise ConfigError(f"no word-problem templates for language {lang!r}; supported: "
                          f"{', '.join(supported_languages())} (add templates in pipelines/problem_templates.py)")
    if split not in ("train", "heldout", None):
        raise ConfigError(f"split must be 'train', 'heldout' or None, got {split!r}")
    language = LANGUAGES[lang]
    rng = random.Random(seed)
    problems, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(problems) == n:
            return problems
        op = OPERATIONS[rng.randrange(len(OPERATIONS))]
        numbers, result = draw_numbers(op, rng)
        problem = _render(language, op, numbers, result, rng)  # draws before the split test: same stream
        if split is not None and is_heldout(op, numbers) != (split == "heldout"):
            continue
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    if len(problems) == n:
        return problems
    raise ConfigError(f"could draw only {len(problems)} distinct {lang} problems of the {split} split, "
                      f"{n} asked for; ask for fewer")


def write_tsv(problems: list[Problem], path) -> Path:
    """MGSM format: `question<TAB>number`, one problem a line."""
    path = Path(path)
    lines = []
    for p in problems:
        if "\t" in p.question or "\n" in p.question:
            raise ValueError(f"a question holds a tab or newline: {p.question!r}")
        lines.append(f"{p.question}\t{p.number}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path
