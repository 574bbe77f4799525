"""The code cites the repository's own design document, and each thing it defines once stays defined once."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = [p for folder in ("workbench", "kernels", "pipelines") for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".c")]


def design_sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#{2,4} (\d+(?:\.\d+)?[a-z]?)\.? ", text, flags=re.M)}


def test_every_design_citation_names_a_section_of_docs_design_md():
    sections = design_sections()
    assert {"4.2", "4.5", "4.6a", "5.3"} <= sections
    cited = 0
    for path in CODE:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<!docs/design\.md )\bDESIGN(\.md)?\s*§", text), \
            f"{path}: cites a DESIGN.md outside the repository"
        for match in re.finditer(r"docs/design\.md\s*((?:§\s*[\d.]+[a-z]?(?:[–,]\s*)?)+)", text):
            for section in re.findall(r"(\d+(?:\.\d+)?[a-z]?)", match.group(1)):
                assert section.rstrip(".") in sections, f"{path}: docs/design.md §{section} does not exist"
                cited += 1
    assert cited >= 20


def test_flt_max_and_the_seed_mix_are_defined_once():
    flt = [p.relative_to(ROOT).as_posix() for p in CODE if "3.4028234663852886" in p.read_text(encoding="utf-8")]
    assert sorted(flt) == ["kernels/cpu_native.c", "kernels/dispatch.py"]     # one definition per backend
    mix = [p.relative_to(ROOT).as_posix() for p in CODE if "1000003 +" in p.read_text(encoding="utf-8")]
    assert mix == ["workbench/merge/methods/__init__.py"]                       # tensor_seed
