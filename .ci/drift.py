"""Print the installed packages whose versions differ from a constraints file's pins (information only)."""
import re
import sys
from importlib import metadata


def pins(path):
    for line in open(path, encoding="utf-8"):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            yield m.group(1), m.group(2)


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main(path):
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    drift = [(name, pinned, installed.get(canonical(name), "not installed"))
             for name, pinned in pins(path)
             if installed.get(canonical(name), "").split("+")[0] != pinned.split("+")[0]]
    for name, pinned, now in drift:
        print(f"{name}: {pinned} in {path}, {now} now")
    if not drift:
        print(f"none: every pin in {path} is what was installed")


if __name__ == "__main__":
    main(sys.argv[1])
