"""A small typed schema: dataclasses whose fields carry their constraints, and `parse` to validate a YAML tree.

Every error names the file, the dotted key path, the value and what was expected, for example
`languages/sw.yaml: profiles.paper.merge.density: expected a number in (0, 1], got 1.5`.
"""
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from workbench.errors import ConfigError, format_path


@dataclass(frozen=True)
class Origin:
    """The file and key path that set a value which a profile inherited (`extends`)."""

    source: str  # how errors name that file, e.g. languages/profiles/micro.yaml
    path: tuple  # the key path inside it
    heir: str  # who inherited it, e.g. "profiles.micro of languages/sw.yaml"


@dataclass(frozen=True)
class Where:
    """Where a value sits: the file it came from and its key path inside it.

    `origins` maps key paths of an inherited tree to the Origin of the value there (None: set in `source`
    itself), so an error names the file and key that set the bad value, not only the file that inherited it.
    """

    source: str
    path: tuple = ()
    origins: Optional[Mapping] = field(default=None, compare=False, repr=False)

    def __truediv__(self, key):
        return Where(self.source, self.path + (key,), self.origins)

    def origin(self) -> Optional[Origin]:
        """The Origin of the value here when another file set it (the longest recorded key path wins)."""
        if not self.origins:
            return None
        for n in range(len(self.path), -1, -1):
            if self.path[:n] in self.origins:
                found = self.origins[self.path[:n]]
                return None if found is None else Origin(found.source, found.path + self.path[n:], found.heir)
        return None

    def located(self) -> str:
        """`file: key` of the file and key that set the value here."""
        found = self.origin()
        source, path = (found.source, found.path) if found else (self.source, self.path)
        key = format_path(path)
        return f"{source}: {key}" if key else source

    def error(self, message) -> ConfigError:
        found = self.origin()
        inherited = f" (inherited by {found.heir})" if found else ""
        return ConfigError(f"{self.located()}: {message}{inherited}")


# Integers beyond 32 bits are never a count, size, step or seed a run can use, and they overflow the
# libraries that take them (numpy seeds, torch sizes); an integer field without its own bounds keeps to these.
INT_LIMIT = 2**31 - 1


def number(default=MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False, key=None, doc=""):
    """A numeric field with an allowed range; `lo_open`/`hi_open` exclude that end. Every number must be
    finite; an integer without `lo`/`hi` lies within ±INT_LIMIT. `key` as in `option`."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open), "doc": doc, "key": key})


def option(default=MISSING, *, key=None, doc="", nonempty=False, default_factory=MISSING):
    """Any other field: `key` when the YAML key differs from the attribute (`lambda`)."""
    meta = {"doc": doc, "key": key, "nonempty": nonempty}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def yaml_key(f) -> str:
    return f.metadata.get("key") or f.name


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return f"a mapping of names to {_describe(args[1])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping (" + ", ".join(yaml_key(f) for f in dataclasses.fields(tp)) + ")"
    return getattr(tp, "__name__", str(tp))


def _range_text(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def _expected_number(tp, rng) -> str:
    text = _range_text(*rng)
    if tp is int:
        return "an integer" + (" " + text if text else "")
    return "a number " + text if text else "a finite number"


def _parse_number(tp, value, where, meta):
    rng = meta.get("range") or (None, None, False, False)
    if isinstance(value, bool) or not isinstance(value, int if tp is int else (int, float)):
        raise where.error(f"expected {_expected_number(tp, rng)}, got {value!r}")
    try:
        number = tp(value)
    except OverflowError:  # an integer literal too large for a float (`weight: 1000...0`)
        number = math.inf
    lo, hi, lo_open, hi_open = rng
    if not math.isfinite(number) or (lo is not None and (number <= lo if lo_open else number < lo)) or \
            (hi is not None and (number >= hi if hi_open else number > hi)):
        raise where.error(f"expected {_expected_number(tp, rng)}, got {value!r}")
    if tp is int and ((hi is None and number > INT_LIMIT) or (lo is None and number < -INT_LIMIT)):
        bound = f"at most {INT_LIMIT}" if number > 0 else f"at least {-INT_LIMIT}"
        raise where.error(f"expected {_expected_number(tp, rng)}{' and ' if lo is not None or hi is not None else ' '}"
                          f"{bound}, got {value!r}")
    return number


def parse(tp, value, where: Where, meta=None):
    """Validate `value` (from YAML) against type `tp`; returns the typed value or raises ConfigError."""
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:
            return parse(alternatives[0], value, where, meta)
        for alt in alternatives:  # first alternative that accepts the value wins
            try:
                return parse(alt, value, where, meta)
            except ConfigError:
                continue
        raise where.error(f"expected {_describe(tp)}, got {value!r}")
    if value is None:
        raise where.error(f"expected {_describe(tp)}, got nothing (null)")
    if origin is Literal:
        if value not in args:
            raise where.error(f"expected {_describe(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise where.error(f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        return _parse_number(tp, value, where, meta)
    if tp is str:
        if not isinstance(value, str):
            raise where.error(f"expected a string, got {value!r}")
        if meta.get("nonempty") and not value.strip():
            raise where.error("expected a non-empty string, got ''")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise where.error(f"expected {_describe(tp)}, got {value!r}")
        if meta.get("nonempty") and not value:
            raise where.error(f"expected {_describe(tp)} with at least one entry, got []")
        items = [parse(args[0], v, where / i, {k: meta[k] for k in ("range",) if k in meta})
                 for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(f"expected {_describe(tp)}, got {value!r}")
        if meta.get("nonempty") and not value:
            raise where.error(f"expected {_describe(tp)} with at least one entry, got {{}}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise where.error(f"expected string keys, got {k!r}")
            out[k] = parse(args[1], v, where / k)
        return out
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where)
    raise TypeError(f"schema type {tp!r} is not supported")  # a bug in a schema, not user input


def _parse_dataclass(cls, value, where):
    if not isinstance(value, dict):
        raise where.error(f"expected {_describe(cls)}, got {value!r}")
    hints = typing.get_type_hints(cls)
    known = {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise (where / key).error(f"unknown key{hint}; expected one of: {', '.join(known)}")
    kwargs = {}
    for key, f in known.items():
        if key in value:
            kwargs[f.name] = parse(hints[f.name], value[key], where / key, f.metadata)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise (where / key).error(f"missing required key; expected {_describe(hints[f.name])}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)  # cross-field rules, e.g. density + slack <= 1
    return obj


def to_dict(obj):
    """The plain YAML-ready tree of a parsed config (YAML key names, nested)."""
    if dataclasses.is_dataclass(obj):
        return {yaml_key(f): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def exactly_one(obj, names, where):
    """Raise unless exactly one of the named fields is set (not None)."""
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        raise where.error(f"expected exactly one of {', '.join(names)}, got "
                          f"{', '.join(given) if given else 'none'}")
