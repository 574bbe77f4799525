"""List the shipped languages and their profiles, show one language, or check a YAML file.

  workbench languages                 every language with its profiles
  workbench languages sw              one language: sources, prompt, each profile's models and merges, and
                                      the default profile resolved (what it inherits laid under its own keys)
  workbench languages sw --profile P  the same with profile P resolved
  workbench languages my_lang.yaml    validate your own config (every profile) and show it
"""
import unicodedata

import yaml

from workbench.config.loader import available_languages, load_language
from workbench.errors import format_path


def _pad(text, width):
    """Pad to a display width (wide CJK characters take two columns, combining marks none)."""
    shown = sum(0 if unicodedata.combining(c) or unicodedata.category(c) == "Mn" else
                2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(1, width - shown)


def add_arguments(parser):
    parser.add_argument("lang", nargs="?", metavar="LANG|FILE.yaml", help="show one language or check a file")
    parser.add_argument("--profile", metavar="P", help="the profile to show resolved (default: micro, else the "
                        "first one)")


def _show(loaded):
    lang = loaded.language
    print(f"{lang.code}  {lang.name} ({lang.native_name})  script {lang.script}  "
          f"ISO 639-3 {lang.iso639_3}  [{loaded.source}]")
    print("  sources:")
    for name, src in lang.sources.items():
        where = src.path or f"{src.hub}" + (f" ({src.config})" if src.config else "")
        print(f"    {name:<12} {where}" + ("  [gated]" if src.gated else ""))
    print(f"  prompt: {lang.prompt.template!r}  ({len(lang.prompt.exemplars)} exemplar(s))")
    for pname, profile in lang.profiles.items():
        extends = loaded.extends.get(pname)
        print(f"  profile {pname}:" + (f"  (extends {' -> '.join(extends)})" if extends else ""))
        print(f"    base: {profile.base.label()}" + ("  [access agreement needed]" if profile.base.gated else ""))
        le = profile.language_expert
        how = f"fetch {le.fetch.label()}" if le.fetch else ("SFT" if le.sft else
                                                            f"CT ({le.pretrain.method}, {le.pretrain.max_steps} steps)")
        print(f"    language expert: {how}")
        for ename, expert in profile.experts.items():
            how = f"fetch {expert.fetch.label()}" if expert.fetch else f"SFT ({expert.sft.train.method})"
            print(f"    task expert {ename} ({expert.task}): {how}")
        print(f"    merges: {', '.join(f'{n} ({r.method})' for n, r in profile.merges.items())}")


def own_keys(loaded) -> list[str]:
    """The keys of the chosen profile set in the language's own file, where the profile extends another."""
    at = ("profiles", loaded.profile_name)
    origins = {p[len(at):]: o for p, o in loaded.origins.items() if p[:len(at)] == at}
    foreign = [p for p, o in origins.items() if o is not None]

    def mixed(path):  # holds inherited values below it
        return any(f[:len(path)] == path for f in foreign)

    return [format_path(p) for p, o in origins.items()
            if p and o is None and not mixed(p) and (len(p) == 1 or mixed(p[:-1]))]


class _ProfileDumper(yaml.SafeDumper):
    """Short lists of plain values on one line, as the YAML files write them."""


_ProfileDumper.add_representer(list, lambda dumper, items: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", items, flow_style=all(not isinstance(i, (dict, list)) for i in items)))


def _show_resolved(loaded):
    name, extends = loaded.profile_name, loaded.extends.get(loaded.profile_name)
    print(f"\nprofile {name} resolved" + (f" (extends {' -> '.join(extends)}; set in {loaded.source}: "
                                         f"{', '.join(own_keys(loaded))})" if extends else "") + ":")
    text = yaml.dump(loaded.raw["profiles"][name], Dumper=_ProfileDumper, sort_keys=False, allow_unicode=True,
                     width=110)
    print("\n".join("  " + line for line in text.rstrip().splitlines()))


def run(args):
    if args.lang:
        loaded = load_language(args.lang, profile=args.profile)
        for pname in loaded.language.profiles:  # validate every profile, not only the default one
            load_language(args.lang, profile=pname)
        _show(loaded)
        _show_resolved(loaded)
        return 0
    print(f"{'code':<5} {'language':<24} {'script':<7} profiles")
    for code in available_languages():
        loaded = load_language(code)
        lang = loaded.language
        print(f"{code:<5} {_pad(lang.name + ' (' + lang.native_name + ')', 25)}{lang.script:<7} "
              f"{', '.join(lang.profiles)}")
    print("\nRun one: workbench adapt --lang sw --profile micro   (details: workbench languages sw)")
    return 0
