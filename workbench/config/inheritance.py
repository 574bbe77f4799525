"""Profile inheritance (`extends:`): how an extending profile's tree lays over the one it extends.

Mappings merge key by key, recursively; any other value (a number, a string, a list, null) set by the
extending profile replaces the inherited one whole. Keys keep the inherited profile's order, and keys only the
extending profile has follow in its own order, so a resolved profile reads like the file it came from.

Alongside the tree goes an origin map, {key path: Origin or None}, with an entry for every node: the Origin of
a value set in another file, None for one set in the extending file itself. `schema.Where` reads it to name
the file and key that set a bad value.
"""
import copy

from workbench.config.schema import Origin

EXTENDS = "extends"


def own_origins(tree, origin: Origin | None, prefix=()) -> dict:
    """{prefix + key path: origin of that node} for every node of `tree`; `origin.path` is the tree's own place
    in its file (None: the extending file itself)."""
    out = {}

    def walk(node, rel):
        out[prefix + rel] = None if origin is None else Origin(origin.source, origin.path + rel, origin.heir)
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in children:
            walk(value, rel + (key,))

    walk(tree, ())
    return out


def overlay(inherited: dict, inherited_origins: dict, own: dict, path=()) -> tuple[dict, dict]:
    """`own` laid over `inherited` -> (tree, origins); `own` and its origins win wherever it sets a value."""
    tree, origins = {}, {path: None}
    for key, value in inherited.items():
        if key not in own:
            tree[key] = copy.deepcopy(value)
            origins.update({p: o for p, o in inherited_origins.items() if p[:len(path) + 1] == path + (key,)})
    for key, value in own.items():
        if key in inherited and isinstance(value, dict) and isinstance(inherited[key], dict):
            tree[key], sub = overlay(inherited[key], inherited_origins, value, path + (key,))
        else:
            tree[key], sub = copy.deepcopy(value), own_origins(value, None, path + (key,))
        origins.update(sub)
    return {k: tree[k] for k in _ordered(inherited, own)}, origins


def _ordered(inherited: dict, own: dict) -> list:
    return list(inherited) + [k for k in own if k not in inherited]


def forget_below(origins: dict, path: tuple) -> None:
    """A value set at `path` after resolution (--set, --fast) belongs to the extending file: drop what it replaced."""
    for p in [p for p in origins if p[:len(path)] == path]:
        del origins[p]
    origins[path] = None
