"""Find, read and validate language configs: resolve each profile's `extends`, apply command-line overrides and
the --fast variant."""
import copy
import difflib
import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from workbench.config.inheritance import EXTENDS, forget_below, overlay, own_origins
from workbench.config.language import LanguageConfig, Profile
from workbench.config.schema import Origin, Where, parse
from workbench.errors import ConfigError, format_path
from workbench.user_files import read_text, refuse_special


def shipped_languages_dir() -> Path:
    """The folder of the language configs that ship with the package."""
    return Path(str(importlib.resources.files("workbench.languages")))


def available_languages() -> dict[str, Path]:
    """Language code -> shipped YAML file."""
    return {p.stem: p for p in sorted(shipped_languages_dir().glob("*.yaml"))}


def shared_profiles() -> dict[str, Path]:
    """Shared profile name -> its YAML file (`languages/profiles/<name>.yaml`), what `extends: <name>` names."""
    return {p.stem: p for p in sorted((shipped_languages_dir() / "profiles").glob("*.yaml"))}


def display_name(path: Path) -> str:
    """`languages/sw.yaml` (or `languages/profiles/micro.yaml`) for a shipped file, the path as given otherwise."""
    path = Path(path)
    root = shipped_languages_dir().resolve()
    if path.resolve().is_relative_to(root):
        return "languages/" + path.resolve().relative_to(root).as_posix()
    return str(path)


def resolve_language_file(lang: str) -> Path:
    """A language code (`sw`) or the path of the user's own YAML file."""
    if lang.endswith((".yaml", ".yml")) or "/" in lang or Path(lang).is_file():
        path = Path(lang)
        refuse_special(path, ConfigError)
        if not path.is_file():
            raise ConfigError(f"{lang}: no such config file; expected a YAML file or one of the language codes: "
                              f"{', '.join(available_languages())}")
        return path
    shipped = available_languages()
    if lang not in shipped:
        raise ConfigError(f"unknown language {lang!r}; available: {', '.join(shipped)} "
                          f"(or pass the path of your own YAML file)")
    return shipped[lang]


# A config, recipe or --set value holds hundreds of values; aliases (`*name` repeating what `&name` holds)
# may reuse blocks, but not expand 1 KB into billions of values that every later walk would visit.
MAX_YAML_VALUES = 100_000


def read_yaml(path: Path, source: str):
    return load_yaml_text(read_text(path, ConfigError), source)


def load_yaml_text(text: str, source: str):
    """`yaml.safe_load` whose result is bounded: at most MAX_YAML_VALUES values once aliases are expanded,
    no alias inside its own anchor, no nesting past the parser's recursion limit."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{source}: {where}not valid YAML ({getattr(e, 'problem', e)})") from None
    _check_expanded_size(data, source)
    return data


def _check_expanded_size(data, source: str):
    """Count the values `data` holds with every alias expanded, each shared node counted once per use but
    visited once (so a bomb is measured in the time its anchors take to read)."""
    sizes, open_nodes = {}, set()

    def size(node) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: an alias refers to the value that holds it (a cycle); expected "
                              f"plain nested values")
        open_nodes.add(key)
        total = 1
        for child in node.values() if isinstance(node, dict) else node:
            total += size(child)
            if total > MAX_YAML_VALUES:
                raise ConfigError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES:,} values (aliases "
                                  f"`*name` repeat what an anchor `&name` holds); expected a config of "
                                  f"ordinary size")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(data)


def extends_target(value, file: Path, where: Where) -> Path:
    """The file `extends: value` names: a shared profile by name, or a YAML file relative to `file`'s folder."""
    shared = shared_profiles()
    expected = f"the name of a shared profile ({', '.join(shared)}) or the path of a profile YAML file"
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"expected {expected}, got {value!r}")
    if value.endswith((".yaml", ".yml")) or "/" in value:
        target = Path(file).resolve().parent / value
        if not target.is_file():
            raise where.error(f"no such file {target}; expected {expected}")
        return target
    if value not in shared:
        close = difflib.get_close_matches(value, shared, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise where.error(f"no shared profile {value!r}{hint}; expected {expected}")
    return shared[value]


def resolve_extends(tree, file: Path, source: str, at: tuple = (), chain: tuple = ()):
    """The profile `tree` (at key path `at` in `file`) laid over what it extends, recursively ->
    (tree, {key path: Origin of an inherited value, or None}, [the files it extends, nearest first])."""
    if not isinstance(tree, dict) or EXTENDS not in tree:
        return tree, {}, []
    own = {k: v for k, v in tree.items() if k != EXTENDS}
    where = Where(source, at + (EXTENDS,))
    target = extends_target(tree[EXTENDS], file, where)
    parent_source = display_name(target)
    seen = chain + (Path(file).resolve(),)
    if target.resolve() in seen:
        loop = " -> ".join(display_name(p) for p in seen + (target,))
        raise where.error(f"the profiles extend each other in a loop ({loop}); expected a chain that ends")
    parent = read_yaml(target, parent_source)
    if not isinstance(parent, dict):
        raise ConfigError(f"{parent_source}: expected a profile (a mapping of its keys) at the top level, "
                          f"got {type(parent).__name__}")
    parent, parent_origins, parents = resolve_extends(parent, target, parent_source, (), seen)
    inherited = own_origins(parent, Origin(parent_source, (), ""))
    inherited.update({p: o for p, o in parent_origins.items() if o is not None})
    resolved, origins = overlay(parent, inherited, own)
    return resolved, origins, [parent_source] + parents


_KEY_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_key(key: str) -> list:
    """`merges.ties.models[1].density` -> ['merges', 'ties', 'models', 1, 'density']."""
    parts = [m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _KEY_PART.finditer(key)]
    if not parts or "".join(str(p) for p in parts).replace(" ", "") == "":
        raise ConfigError(f"override {key!r}: expected a dotted key such as pretrain.max_steps")
    return parts


def set_key(tree, parts: list, value, source: str, full_key: str):
    """Set `value` at the key path in a raw YAML tree (creating mappings on the way)."""
    node = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"{source}: override {full_key}: no list entry [{part}] there")
            if last:
                node[part] = value
            else:
                node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: override {full_key}: {part!r} is inside a value that is not a mapping")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def under_null(tree, parts: list) -> bool:
    """Whether a mapping on the way to the key is set to null in the tree."""
    node = tree
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
        if node is None:
            return True
    return False


def parse_override(text: str):
    """`KEY=VALUE` from the command line; VALUE is read as YAML (numbers, true/false, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example pretrain.max_steps=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    _check_expanded_size(value, f"--set {text!r}")
    return key.strip(), value


@dataclass
class LoadedConfig:
    """A validated language config with the chosen profile."""

    language: LanguageConfig
    profile_name: str
    file: Path
    source: str  # how errors name the file
    raw: dict  # the tree after `extends`, overrides and --fast, before validation (for hashing and the report)
    origins: dict = field(default_factory=dict, repr=False)  # key path -> Origin of an inherited value
    extends: dict = field(default_factory=dict)  # profile -> the files it extends, nearest first

    @property
    def profile(self) -> Profile:
        return self.language.profiles[self.profile_name]

    def where(self, key: str) -> Where:
        """The place of a profile key (`corpus.max_tokens`), for errors that name the file and key that set it."""
        return Where(self.source, ("profiles", self.profile_name, *split_key(key)), self.origins)

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config are relative to the YAML's folder."""
        return self.file.resolve().parent

    def local_inputs(self) -> dict[str, Path]:
        """Every local file or folder this profile reads, by its key ({"sources.text.path": Path, ...}),
        with the config file itself: what a run directory must keep clear of."""
        found = {"the config file": self.file}
        profile = self.profile

        def add(key, path):
            if path:
                local = Path(path).expanduser()
                found[key] = local if local.is_absolute() else self.base_dir / local

        for name, src in self.language.sources.items():
            add(f"sources.{name}.path", src.path)
        models = [("base", profile.base), ("language_expert.fetch", profile.language_expert.fetch)]
        models += [(f"experts.{name}.fetch", expert.fetch) for name, expert in profile.experts.items()]
        for key, src in models:
            if src is not None:
                add(f"{key}.path", src.path)
                add(f"{key}.gguf", None if src.package else src.gguf)
        sfts = [("language_expert.sft", profile.language_expert.sft)]
        sfts += [(f"experts.{name}.sft", expert.sft) for name, expert in profile.experts.items()]
        for key, sft in sfts:
            if sft is not None:
                add(f"{key}.data.path", sft.data.path)
        if profile.eval.mgsm is not None:
            add("eval.mgsm.path", profile.eval.mgsm.path)
        return {f"profiles.{self.profile_name}.{k}" if not k.startswith(("sources", "the ")) else k: v
                for k, v in found.items()}


def load_language(lang: str, *, profile: str | None = None, overrides=(), fast=False) -> LoadedConfig:
    """Read and validate a language config; `overrides` are `KEY=VALUE` strings (keys relative to the
    profile unless they start with a top-level key such as `sources` or `profiles`)."""
    path = resolve_language_file(lang)
    source = display_name(path)
    raw = read_yaml(path, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    profiles = raw.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        parse(LanguageConfig, raw, Where(source))  # reports the missing or malformed keys
    origins, extends = {}, {}
    for pname, tree in profiles.items():
        at = ("profiles", pname)
        profiles[pname], inherited, extends[pname] = resolve_extends(tree, path, source, at)
        heir = f"{format_path(at)} of {source}"
        origins.update({at + p: o and Origin(o.source, o.path, heir) for p, o in inherited.items()})
    if profile is None:
        profile = "micro" if "micro" in profiles else next(iter(profiles), None)
    if profile not in profiles:
        raise ConfigError(f"{source}: profile {profile!r} does not exist; this language has: "
                          f"{', '.join(profiles) or 'no profiles'}")
    top_keys = {"code", "name", "native_name", "iso639_1", "iso639_3", "script", "digits", "sources",
                "prompt", "profiles"}
    edits = []
    if fast:
        fast_tree = profiles[profile].get("fast") or {}
        if not isinstance(fast_tree, dict):
            raise Where(source, ("profiles", profile, "fast"), origins).error(
                "expected a mapping of dotted keys to values")
        # A shared fast variant may shrink a section this profile switches off (`eval.mgsm: null` for a language
        # without MGSM): that key is skipped rather than bringing the section back half-made.
        edits += [(f"profiles.{profile}.{k}", v) for k, v in fast_tree.items()
                  if not under_null(raw, split_key(f"profiles.{profile}.{k}"))]
    for text in overrides:
        key, value = parse_override(text) if isinstance(text, str) else text
        first = split_key(key)[0]
        edits.append((key if first in top_keys else f"profiles.{profile}.{key}", value))
    for key, value in edits:
        set_key(raw, split_key(key), value, source, key)
        forget_below(origins, tuple(split_key(key)))
    language = parse(LanguageConfig, raw, Where(source, (), origins))
    return LoadedConfig(language=language, profile_name=profile, file=path, source=source, raw=raw,
                        origins=origins, extends={p: chain for p, chain in extends.items() if chain})


def validate_all_shipped() -> dict[str, LanguageConfig]:
    """Load every shipped language file (every profile validated); raises on the first bad one."""
    return {code: load_language(code).language for code in available_languages()}
