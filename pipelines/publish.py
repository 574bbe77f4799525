"""What makes a run's models publishable: the facts the model cards of its merges state (where each input
comes from, languages, data sets, evaluation), and the optional export stage (profile key
`export: {gguf: q8_0}`) that writes the recommended model as a GGUF file with an Ollama Modelfile.
"""
import json
from pathlib import Path

from workbench.config.schema import to_dict
from workbench.evaluation.table import markdown_table
from workbench.export.gguf_export import export_gguf
from workbench.export.modelfile import ollama_name, write_modelfile
from workbench.merge.card import render_card
from workbench.merge.model_card import publication
from workbench.pipelines.runner import StageSpec, stage_output
from workbench.report import recommended_model

VERSION = 1


def source_hint(source, record: dict | None) -> dict:
    """A model source as the model card names it: its hub id (resolved revision) or, for a GGUF or local copy,
    the hub model its `provenance` names; else local."""
    record = record or {}
    hint = {"license": source.license}
    if source.hub:
        return {**hint, "hub": source.hub, "revision": record.get("revision") or source.revision}
    if source.provenance:
        hub, _, revision = source.provenance.partition("@")
        hint.update(hub=hub, revision=revision or "main")
        if source.gguf:
            sha = f" (sha256 {record['gguf_sha256']})" if record.get("gguf_sha256") else ""
            carrier = f", carried by the PyPI package {source.package}" if source.package else ""
            hint["note"] = f"used as the GGUF file {Path(source.gguf).name}{sha}{carrier}"
        return hint
    return {**hint, "local": Path(source.path or source.gguf).name}


def merge_card(loaded, deps: dict, refs) -> dict:
    """What a merge stage of `workbench adapt` tells the model card (see workbench.merge.model_card)."""
    profile, lang = loaded.profile, loaded.language
    manifest = json.loads(Path(deps["fetch"]["outputs"]["manifest"]).read_text(encoding="utf-8"))
    records = manifest.get("models", {})
    base = source_hint(profile.base, records.get(profile.base.label()))
    lineage = [base["hub"]] if "hub" in base else []
    trained = {"language": _language_expert_note(profile)}
    trained.update({n: f"{e.task} expert trained by this run: SFT ({e.sft.train.method}) of the "
                       + ("language expert" if e.sft.from_ == "language" else "base")
                    for n, e in profile.experts.items() if e.sft is not None})
    inputs = {}
    for ref in refs:
        fetched = profile.base if ref == "base" else (profile.language_expert.fetch if ref == "language"
                                                      else profile.experts[ref].fetch)
        if fetched is not None:
            inputs[ref] = source_hint(fetched, records.get(fetched.label()))
        else:
            inputs[ref] = {"local": f"{lang.code}-{ref}-expert", "lineage": lineage, "license": profile.base.license,
                           "note": trained[ref]}
    return {"inputs": inputs, "language": _languages(loaded), "datasets": _datasets(loaded),
            "made_by": f"`workbench adapt --lang {lang.code} --profile {loaded.profile_name}` ({loaded.source})"}


def _language_expert_note(profile) -> str:
    le = profile.language_expert
    if le.sft is not None:
        return "language expert trained by this run: SFT on target-language instructions"
    return f"language expert trained by this run: continual pretraining ({le.pretrain.method}) of the base"


def _languages(loaded) -> list:
    profile, lang = loaded.profile, loaded.language
    codes = [lang.iso639_1 or lang.iso639_3]
    replay = profile.corpus.replay.sources if profile.corpus.replay else []
    english = any(src.startswith("english") for src in replay) or any(
        e.sft is not None and e.sft.data.generated and e.sft.data.lang == "en" for e in profile.experts.values())
    return codes + (["en"] if english and "en" not in codes else [])


def _datasets(loaded) -> list:
    """Hub data sets the run trained on (local files are described in the card's body, not here)."""
    profile, lang = loaded.profile, loaded.language
    names = list(profile.corpus.sources) + (list(profile.corpus.replay.sources) if profile.corpus.replay else [])
    hub = [lang.sources[n].hub for n in names if lang.sources[n].hub]
    sft = [e.sft.data.hub for e in profile.experts.values() if e.sft is not None and e.sft.data.hub]
    if profile.language_expert.sft is not None and profile.language_expert.sft.data.hub:
        sft.append(profile.language_expert.sft.data.hub)
    return list(dict.fromkeys(hub + sft))


def refresh_merge_cards(loaded, records: dict) -> list:
    """Rewrite the README.md of every merged model of the run with the run's evaluation table in it."""
    table = json.loads(Path(records["evaluate"]["outputs"]["table"]).read_text(encoding="utf-8"))
    evaluation = (f"Every model of the run (`{loaded.language.code}`, profile `{loaded.profile_name}`), "
                  f"this merge among them:\n\n" + markdown_table(table))
    written = []
    for name, recipe in loaded.profile.merges.items():
        model_dir = stage_output(records[f"merge:{name}"], "model")
        report = json.loads((model_dir / "merge_report.json").read_text(encoding="utf-8"))
        card = {**merge_card(loaded, records, recipe.references()), "evaluation": evaluation}
        report["publication"] = publication(report, card)
        _write_text_atomic(model_dir / "README.md", render_card(report))
        written.append(model_dir / "README.md")
    return written


def _write_text_atomic(path: Path, text: str):
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def add_export_stage(graph, loaded, run_dir):
    """The export stage, when the profile has `export:`: the model the report recommends, as GGUF."""
    cfg = loaded.profile.export
    if cfg is None:
        return

    def export(stage, deps):
        from workbench.pipelines.adapt import eval_models  # lazy: adapt imports this module (a cycle at the top)

        table = json.loads(Path(deps["evaluate"]["outputs"]["table"]).read_text(encoding="utf-8"))
        best = recommended_model(loaded, table)
        if best is None:
            return {"model": None, "note": "no model could be called best on the target language; nothing exported"}
        model_dir = eval_models(deps, loaded.profile)[best]
        name = ollama_name(f"{loaded.language.code}-{loaded.profile_name}-{best}")
        result = export_gguf(model_dir, stage.path / f"{name}.{cfg.gguf}.gguf", out_type=cfg.gguf, force=True,
                             name=name, license=loaded.profile.base.license)
        write_modelfile(result.path, chat_template=result.chat_template, stop_tokens=result.stop_tokens,
                        bos_token=result.bos_token, model_name=name)
        return {"model": best, "model_dir": str(model_dir), "gguf": result.path.name, "type": cfg.gguf,
                "bytes": result.bytes, "sha256": result.sha256, "modelfile": "Modelfile",
                "manifest": result.manifest.name, "ollama_name": name, "notes": result.notes}

    graph.add(StageSpec("export", {"export": to_dict(cfg), "v": VERSION}, export,
                        deps=tuple(s.name for s in graph.specs),
                        describe=f"the recommended model as one GGUF file ({cfg.gguf}) with an Ollama Modelfile"))
