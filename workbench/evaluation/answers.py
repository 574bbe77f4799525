"""The answer of a model's output: the last number in it (MGSM's rule), in any script's digits.

Normalization, in order:
1. every Unicode decimal digit (Bengali ০-৯, Telugu ౦-౯, Tibetan ༠-༩, fullwidth ０-９, ...) and the
   language's own `digits` become ASCII digits;
2. a no-break, thin or narrow no-break space between digit groups ("1 000", SI style) becomes a
   thousands comma; a plain space never joins numbers ("5 100-page books" stays 5 and 100);
3. NFKC folds the rest (fullwidth "，" "．" "－" "＄"), and the minus sign U+2212 becomes "-".
Then "1,000" is 1000, "$18" is 18, "18.0" is 18, "-3" is -3 (a minus directly after a digit, as in
"5-3", is an operator, not a sign), trailing units and currency names are ignored, and text without a
number gives None. Spelled-out numbers ("eleven", 十一) are not read: the prompts ask for worked answers
that end in numerals, as MGSM's exemplars do.
"""
import re
import unicodedata

_GROUP_SPACE = re.compile(r"(?<=\d)[\u00a0\u2009\u202f](?=\d{3}(?!\d))")
# An optional sign (a minus right after a letter or digit is an operator: "5-3"), then either digits in
# comma groups of three ("1,000", not "1,2345") or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?:\.\d+)?")


def to_ascii_digits(text: str, digits: str | None = None) -> str:
    """Map the script's own digits (and every Unicode decimal digit) to 0-9."""
    table = {c: str(i) for i, c in enumerate(digits)} if digits else {}
    out = []
    for c in text:
        if c in table:
            out.append(table[c])
        elif c > "\x7f" and (d := unicodedata.decimal(c, None)) is not None:
            out.append(str(d))
        else:
            out.append(c)
    return "".join(out)


def normalize(text: str, digits: str | None = None) -> str:
    """The text with ASCII digits, thousands commas for grouping spaces, and NFKC folding."""
    text = _GROUP_SPACE.sub(",", to_ascii_digits(text, digits))
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-")


def _value(token: str) -> float:
    value = float(token.replace(",", ""))
    return int(value) if value.is_integer() else value


def extract_answer(text: str, digits: str | None = None) -> int | float | None:
    """The last number in `text` (an int when integral), or None when there is none."""
    found = _NUMBER.findall(normalize(text, digits))
    return _value(found[-1]) if found else None


def parse_number(text: str, digits: str | None = None) -> int | float | None:
    """`text` read as one number ("114,200", "18", "৫"), or None when it is anything else."""
    text = normalize(text.strip(), digits)
    match = _NUMBER.fullmatch(text)
    return _value(text) if match else None


def same_number(predicted, gold, *, rel_tol=1e-6) -> bool:
    """Numeric equality (18 == 18.0); None never matches."""
    if predicted is None or gold is None:
        return False
    return abs(predicted - gold) <= rel_tol * max(1.0, abs(gold))
