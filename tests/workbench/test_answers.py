"""Answer extraction: the last number of realistic model outputs in en, sw, te, bn and ja."""
import pytest

from workbench.config.loader import load_language
from workbench.evaluation.answers import extract_answer, parse_number, same_number

DIGITS = {"en": None, **{code: load_language(code).language.digits for code in ("sw", "te", "bn", "ja")}}

CASES = [
    # English
    ("en", "Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * $2 = $18 every day. The answer is $18.", 18),
    ("en", "The total is 1,000 + 250 = 1,250 dollars. The answer is 1,250.", 1250),
    ("en", "He runs 3 * 60 = 180 meters per sprint, so 180 * 3 = 540 meters a week.", 540),
    ("en", "The temperature drops to -3 degrees.", -3),
    ("en", "Each slice costs 3.5 dollars.", 3.5),
    ("en", "The answer is 18.0", 18),
    ("en", "She needs 2 bolts of blue and 1 bolt of white, 3 bolts in total.\n\nQuestion: A robe takes", 3),
    ("en", "I am not sure how to solve this problem.", None),
    ("en", "So the house is now worth 80,000 + 120,000 = $200,000. The profit is $70,000.", 70000),
    ("en", "The answer is 5%.", 5),
    # Swahili
    ("sw", "Roger alianza kwa mipira 5. Mikebe 2 yenye mipira 3 kila moja ni mipira 6. 5 + 6 = 11. Jibu ni 11.", 11),
    ("sw", "Anauza mayai 9 kwa $2 kila moja, kwa hiyo anapata $18 kila siku. Jibu ni $18.", 18),
    ("sw", "Gharama ni shilingi 1,500. Jibu ni 1,500 shilingi.", 1500),
    ("sw", "Jibu ni 12 kg.", 12),
    ("sw", "Sijui jibu la swali hili.", None),
    ("sw", "Joto lilishuka hadi -4 nyuzi.", -4),
    # Telugu (MGSM writes ASCII digits; models may write Telugu ones)
    ("te", "రోజర్ 5 బంతులతో ప్రారంభించాడు. 5+6=11. సమాధానం 11.", 11),
    ("te", "మొత్తం ౧౨ బంతులు ఉన్నాయి. సమాధానం ౧౨.", 12),
    ("te", "ఆమె రోజుకు $18 సంపాదిస్తుంది.", 18),
    ("te", "ధర ౧,౦౦౦ రూపాయలు.", 1000),
    ("te", "నాకు తెలియదు.", None),
    ("te", "సమాధానం 7.5 కిలోలు.", 7.5),
    # Bengali
    ("bn", "রজারের প্রথমে 5টি বল ছিল। 5 + 6 = 11। উত্তর হল 11।", 11),
    ("bn", "রজারের প্রথমে ৫টি বল ছিল। ৫ + ৬ = ১১। উত্তর হল ১১।", 11),
    ("bn", "মোট খরচ ১,২০০ টাকা।", 1200),
    ("bn", "তিনি প্রতিদিন $18 উপার্জন করেন।", 18),
    ("bn", "উত্তর হল ১৮.০", 18),
    ("bn", "আমি জানি না।", None),
    # Japanese
    ("ja", "ロジャーは最初に5個のボールを持っていました。5 + 6 = 11。答えは11です。", 11),
    ("ja", "答えは１８ドルです。", 18),
    ("ja", "合計で１，０００円です。", 1000),
    ("ja", "全部で1,200個あります。", 1200),
    ("ja", "気温はマイナスで、−3度です。", -3),
    ("ja", "わかりません。", None),
]


@pytest.mark.parametrize("lang,output,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_last_number_of_realistic_outputs(lang, output, expected):
    got = extract_answer(output, DIGITS[lang])
    if expected is None:
        assert got is None
    else:
        assert got == expected and type(got) is type(expected)


def test_digits_come_from_the_config_and_from_unicode():
    assert DIGITS["bn"] == "০১২৩৪৫৬৭৮৯" and DIGITS["te"] == "౦౧౨౩౪౫౬౭౮౯"
    # Without the config's digits, Unicode decimal digits are still read (here Tibetan).
    assert extract_answer("ལན། ༡༢") == 12
    assert extract_answer("উত্তর ১১") == 11


def test_numbers_are_not_glued_together():
    assert extract_answer("He buys 5 100-page books.") == 100  # a plain space never joins digit groups
    assert extract_answer("1\u202f000 shillings") == 1000  # a narrow no-break space does (SI style)
    assert extract_answer("5-3=2") == 2 and extract_answer("7-2") == 2  # a minus after a digit is an operator
    assert extract_answer("The answer is 1,2345") == 2345  # not a thousands group


def test_gold_answers_parse_and_compare_numerically():
    assert parse_number("114,200") == 114200 and parse_number(" 18 ") == 18 and parse_number("১১") == 11
    assert parse_number("18 apples") is None and parse_number("") is None
    assert same_number(18.0, 18) and same_number(18, 18.0000001)
    assert not same_number(None, 18) and not same_number(17, 18)
