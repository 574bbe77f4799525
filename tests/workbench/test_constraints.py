"""constraints.txt (README, "Install notes") pins every dependency the project declares, at an allowed version."""
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def pins() -> dict:
    found = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
            assert m, f"constraints.txt: {line!r}: expected name==version"
            found[canonicalize_name(m.group(1))] = m.group(2)
    return found


def test_every_declared_dependency_is_pinned_within_its_range():
    pinned = pins()
    declared = [Requirement(r) for r in metadata.requires("workbench")]
    checked = 0
    for req in declared:
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue  # an optional extra other than the test one (not in the README's commands)
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt does not pin {req.name} (setup.py: {req})"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside setup.py's {req}"
        checked += 1
    assert checked >= 15


def test_torch_pin_has_no_local_label():
    # `torch==X+cpu` would fail wherever only the CUDA build (or PyPI's plain wheel) is on the index.
    assert "+" not in pins()["torch"]
