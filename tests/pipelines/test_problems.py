"""Generated word problems: deterministic, arithmetic checked from the worked answers, extractable, every
supported language, held-out arithmetic disjoint from the training split."""
import re

import pytest

from workbench.config.loader import load_language
from workbench.errors import ConfigError
from workbench.evaluation.answers import extract_answer
from workbench.evaluation.mgsm import read_mgsm_tsv
from workbench.pipelines.problem_templates import LANGUAGES
from workbench.pipelines.problems import generate_problems, supported_languages, write_tsv

SUPPORTED = ("en", "sw", "ja", "bn", "te")
EQUATION = re.compile(r"(\d+) ([-+×÷]) (\d+) = (\d+)")
APPLY = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y, "÷": lambda x, y: x / y}


def digits_of(lang):
    return None if lang == "en" else load_language(lang).language.digits


def equations(answer: str) -> list[tuple]:
    return [(int(x), op, int(y), int(z)) for x, op, y, z in EQUATION.findall(answer)]


def test_supported_languages():
    assert set(SUPPORTED) <= set(supported_languages())


@pytest.mark.parametrize("lang", SUPPORTED)
def test_answers_are_correct_and_extractable(lang):
    problems = generate_problems(lang, 200, seed=7)
    assert len(problems) == 200 and len({p.question for p in problems}) == 200
    words, digits = LANGUAGES[lang].number_words, digits_of(lang)
    for p in problems:
        steps = equations(p.answer)
        assert 1 <= len(steps) <= 2, p.answer
        for x, op, y, z in steps:
            assert APPLY[op](x, y) == z, p.answer  # exact: ÷ always divides evenly
        assert steps[-1][3] == p.number and p.number >= 0
        assert extract_answer(p.answer, digits) == p.number
        first = steps[0]
        for operand in (first[0], first[2]) if len(steps) == 1 else (first[0],):
            assert str(operand) in p.question or words.get(operand, "\0") in p.question, (operand, p.question)
        assert "{" not in p.question + p.answer and "\t" not in p.question and "\n" not in p.question


@pytest.mark.parametrize("lang", SUPPORTED)
def test_deterministic_for_a_seed(lang):
    assert generate_problems(lang, 30, seed=3) == generate_problems(lang, 30, seed=3)
    assert generate_problems(lang, 30, seed=3) != generate_problems(lang, 30, seed=4)


def test_languages_get_parallel_problems():
    # The same seed gives the same arithmetic in every language (comparable accuracies).
    sets = {lang: [equations(p.answer) for p in generate_problems(lang, 50, seed=11, split="heldout")]
            for lang in SUPPORTED}
    assert all(s == sets["en"] for s in sets.values())


def test_heldout_arithmetic_never_appears_in_training():
    train = {tuple(equations(p.answer)) for p in generate_problems("en", 2000, seed=0)}
    held = {tuple(equations(p.answer)) for p in generate_problems("en", 300, seed=0, split="heldout")}
    assert held and not train & held


def test_one_and_two_operation_problems_of_every_kind():
    ops = {tuple(op for _, op, _, _ in equations(p.answer)) for p in generate_problems("sw", 300, seed=1)}
    assert {("+",), ("-",), ("×",), ("÷",), ("×", "+"), ("+", "-")} == ops


def test_english_matches_the_exemplar_style():
    answers = [p.answer for p in generate_problems("en", 100, seed=2)]
    assert all(re.search(r"The answer is \d+\.$", a) for a in answers)
    assert any(re.fullmatch(r"\w+ has \d+ \w+ and buys \d+ more\. \d+ \+ \d+ = \d+\. The answer is \d+\.", a)
               for a in answers)


def test_tsv_round_trip(tmp_path):
    problems = generate_problems("bn", 25, seed=5)
    items = read_mgsm_tsv(write_tsv(problems, tmp_path / "generated_bn.tsv"))
    assert [(i.question, i.answer) for i in items] == [(p.question, p.number) for p in problems]


def test_unsupported_language_lists_the_supported_ones():
    with pytest.raises(ConfigError, match=r"templates for language 'bo'; supported: bn, en, ja, sw, te"):
        generate_problems("bo", 5, seed=0)
