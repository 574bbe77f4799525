"""What a merged model's card says about where it comes from, for a page on the Hugging Face Hub.

The hub front matter names hub ids, never a local path: each input of the merge is either a hub model (id and
revision) or a local-only model, named by its folder name and the sha256 of its weights. An input's origin
comes, in this order, from what the caller knows (`workbench adapt` knows its sources and trained experts),
from the Hugging Face cache layout (`models--OWNER--NAME/snapshots/COMMIT`), or from the input's own card
(`README.md` front matter: `base_model`, `license`, `language`, `datasets`); otherwise it is local-only.
Licences come from the inputs: when they differ, or one is unknown, the card flags it and states none.

`base_model` lists the hub ids (the hub accepts only ids there); `merge_inputs` lists every input with its
revision or sha256.
"""
import hashlib
import re
from pathlib import Path

import yaml

# Licence names as configs and cards write them -> the hub's licence ids.
HUB_LICENSES = {"apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0", "mit": "mit", "cc-by-4.0": "cc-by-4.0",
                "cc by 4.0": "cc-by-4.0", "cc-by-sa-4.0": "cc-by-sa-4.0", "cc by-sa 4.0": "cc-by-sa-4.0",
                "llama 2 community license": "llama2", "llama2": "llama2", "llama 3 community license": "llama3",
                "llama3": "llama3", "llama 3.1 community license": "llama3.1", "llama3.1": "llama3.1",
                "gemma": "gemma", "openrail": "openrail", "bsd-3-clause": "bsd-3-clause", "gpl-3.0": "gpl-3.0"}
_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})")


def hub_license(text: str | None) -> str | None:
    """The hub's id for a licence name, or the name itself when the hub has no id for it."""
    if not text:
        return None
    return HUB_LICENSES.get(text.strip().lower(), text.strip())


def weights_sha256(files: dict) -> str:
    """One sha256 for a model's weights: the file's own for one file; for shards, the sha256 of the lines
    `<sha256>  <file name>` in name order (what `sha256sum` prints for the shards)."""
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_card_metadata(model_dir) -> dict:
    """The YAML front matter of a model folder's README.md, or {}."""
    path = Path(model_dir) / "README.md"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---\n"):
        return {}
    head = text[4:].split("\n---", 1)[0]
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def input_origin(path, files: dict, hint: dict | None = None) -> dict:
    """Where one input comes from: {"hub", "revision"} or {"local", "sha256"}, plus "license", "language",
    "datasets" and "lineage" (hub ids it derives from) where known. `hint` (from the caller) wins."""
    hint = dict(hint or {})
    path = Path(path)
    card = read_card_metadata(path)
    origin = {}
    if hint.get("hub"):
        origin = {"hub": hint["hub"], "revision": hint.get("revision") or "main"}
    elif (found := _SNAPSHOT.search(path.resolve().as_posix())) is not None:
        origin = {"hub": f"{found['owner']}/{found['name']}", "revision": found["commit"]}
    else:
        origin = {"local": hint.get("local") or path.name, "sha256": weights_sha256(files)}
    if hint.get("note"):
        origin["note"] = hint["note"]
    lineage = hint.get("lineage") or _as_list(card.get("base_model"))
    if lineage:
        origin["lineage"] = lineage
    license = hub_license(hint.get("license") or card.get("license"))
    if license:
        origin["license"] = license
    for key in ("language", "datasets"):
        values = _as_list(hint.get(key)) or _as_list(card.get(key))
        if values:
            origin[key] = values
    return origin


def _as_list(value) -> list:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def origin_label(origin: dict) -> str:
    if "hub" in origin:
        return f"{origin['hub']}@{origin['revision']}"
    return f"{origin['local']} (local, sha256 {origin['sha256'][:16]}…)"


def publication(report: dict, card: dict | None = None) -> dict:
    """The card facts of a merge: each input's origin, base models, licence (or the conflict), languages,
    datasets. `card`: {"inputs": {ref: hint}, "language": [...], "datasets": [...], "made_by": str}."""
    card = card or {}
    hints = card.get("inputs") or {}
    origins = {ref: input_origin(info["path"], info["files"], hints.get(ref)) for ref, info in report["inputs"].items()}
    base_models = []
    for origin in origins.values():
        for hub_id in ([origin["hub"]] if "hub" in origin else origin.get("lineage", [])):
            if hub_id not in base_models:
                base_models.append(hub_id)
    licenses = {ref: o.get("license") for ref, o in origins.items()}
    known = set(v for v in licenses.values() if v)
    unknown = [ref for ref, v in licenses.items() if not v]
    flags = []
    if len(known) > 1:
        flags.append("the inputs carry different licences (" + ", ".join(f"{ref}: {v or 'unknown'}" for ref, v in
                                                                          licenses.items()) +
                     "); workbench does not choose one: set `license` in this card before publishing")
    elif unknown:
        flags.append(f"no licence is known for {', '.join(unknown)}; set `license` in this card before publishing")
    languages = _merged(card.get("language"), *(o.get("language") for o in origins.values()))
    datasets = _merged(card.get("datasets"), *(o.get("datasets") for o in origins.values()))
    return {"inputs": origins, "base_model": base_models, "license": next(iter(known)) if len(known) == 1 and
            not unknown else None, "license_flags": flags, "language": languages, "datasets": datasets,
            "made_by": card.get("made_by"), "evaluation": card.get("evaluation")}


def _merged(*lists) -> list:
    out = []
    for values in lists:
        for v in values or []:
            if v not in out:
                out.append(v)
    return out


def front_matter(report: dict) -> list[str]:
    """The card's YAML front matter lines (between the --- markers), from `report["publication"]`."""
    pub = report.get("publication") or publication(report)
    meta = {}
    if pub["base_model"]:
        meta["base_model"] = pub["base_model"]
    meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    if pub["language"]:
        meta["language"] = pub["language"]
    if pub["license"]:
        hub_ids = set(HUB_LICENSES.values())
        meta["license"] = pub["license"] if pub["license"] in hub_ids else "other"
        if meta["license"] == "other":
            meta["license_name"] = re.sub(r"[^a-z0-9.-]+", "-", pub["license"].lower()).strip("-")
    meta["tags"] = list(dict.fromkeys(["merge", "workbench", report["method"]]))
    if pub["datasets"]:
        meta["datasets"] = pub["datasets"]
    meta["merge_inputs"] = [{"role": ref, **{k: v for k, v in o.items() if k in ("hub", "revision", "local", "sha256")}}
                            for ref, o in pub["inputs"].items()]
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]


def publication_sections(report: dict) -> list[str]:
    """Card body sections beside the merge details: licence flags, evaluation, how it was made."""
    pub = report.get("publication") or publication(report)
    lines = []
    if pub["license_flags"]:
        lines += ["", "## Licence", ""] + [f"- **Check before publishing:** {flag}." for flag in pub["license_flags"]]
    if pub.get("evaluation"):
        lines += ["", "## Evaluation", "", pub["evaluation"].rstrip()]
    lines += ["", "## How it was made", ""]
    if pub.get("made_by"):
        lines.append(f"- {pub['made_by']}")
    lines.append(f"- workbench {report['workbench_version']}, method `{report['method']}`, "
                 f"{report['seconds']:.1f} s on {report['device']}")
    for ref, origin in pub["inputs"].items():
        extra = f"; {origin['note']}" if origin.get("note") else ""
        lines.append(f"- input `{ref}`: {origin_label(origin)}{extra}")
    return lines
