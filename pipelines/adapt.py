"""`workbench adapt`: one language profile from base model to merged models, evaluated and reported.

fetch → corpus → tokenizer check (→ vocabulary extension) → packed blocks → language expert (CT, SFT or
fetched) → task experts (SFT or fetched) → delta analysis → merges → evaluation → report.

Each stage is keyed by its settings and its dependencies' keys (`runner.RunGraph`); the work itself runs in
the stage functions of the other modules, which key their own folders by content under `<run>/work/`, so
a rerun skips what is done and resumes what was interrupted (trainer checkpoints, merge shards).
"""
import json
from pathlib import Path

from workbench.config.schema import to_dict
from workbench.errors import ConfigError
from workbench.pipelines.publish import add_export_stage
from workbench.pipelines.runner import RunGraph, StageSpec, stage_output

VERSION = 1  # bump when a stage's outputs change for the same inputs


def _model_of(records: dict, role: str, profile) -> Path:
    """The model directory a role names in a finished run: base, language, or a task expert."""
    if role == "base":
        return Path(records["fetch"]["outputs"]["models"]["base"])
    if role == "language":
        return stage_output(records["language_expert"], "model")
    if role in profile.experts:
        return stage_output(records[f"expert:{role}"], "model")
    raise ConfigError(f"no model for role {role!r}")


def _describe_source(source) -> str:
    return source.label() + (" (access agreement needed)" if source.gated else "")


def build_graph(loaded, run_dir: Path, *, log=print) -> RunGraph:
    """The stages of one run of `loaded` (a LoadedConfig) under `run_dir`."""
    from workbench.pipelines.corpus import source_inputs
    from workbench.pipelines.fetch import profile_sources

    profile, lang = loaded.profile, loaded.language
    work = run_dir / "work"
    graph = RunGraph(run_dir)
    le = profile.language_expert
    ct = le.fetch is None and le.sft is None
    sources = profile_sources(profile)

    def fetch(stage, deps):
        from workbench.pipelines.fetch import fetch_profile

        manifest = fetch_profile(loaded, work)
        models = {role: manifest["models"][src.label()]["path"] for role, (_, src) in sources.items()}
        return {"models": models, "manifest": str(work / "fetch.json")}

    hub_ids = [f"{src.hub}@{src.revision}" for _, src in sources.values() if src.hub]
    graph.add(StageSpec("fetch", {"sources": {r: to_dict(s) for r, (_, s) in sources.items()}, "v": VERSION},
                        fetch, describe="models: " + "; ".join(f"{r} = {_describe_source(s)}"
                                                               for r, (_, s) in sources.items()),
                        downloads=tuple(hub_ids)))
    if ct:
        _add_ct_stages(graph, loaded, work, source_inputs)
    else:
        _add_other_language_expert(graph, loaded, work)
    for name, expert in profile.experts.items():
        _add_task_expert(graph, loaded, work, name, expert)
    expert_stages = tuple(f"expert:{n}" for n in profile.experts)
    _add_analysis(graph, loaded, expert_stages)
    for name, recipe in profile.merges.items():
        _add_merge(graph, loaded, name, recipe, expert_stages)
    _add_evaluation(graph, loaded, run_dir, expert_stages, ct)
    add_export_stage(graph, loaded, run_dir)
    _add_report(graph, loaded, run_dir, ct)
    return graph


def _add_ct_stages(graph, loaded, work, source_inputs):
    profile = loaded.profile
    cfg = profile.corpus
    names = list(cfg.sources) + (list(cfg.replay.sources) if cfg.replay else [])
    hub = [f"{loaded.language.sources[n].hub}" for n in names if loaded.language.sources[n].hub]

    def corpus(stage, deps):
        from workbench.pipelines.corpus import run_corpus_text

        text = run_corpus_text(loaded, work)
        return {"text_stage": str(text.path), "stats": text.record().get("stats")}

    graph.add(StageSpec("corpus", {"corpus": to_dict(cfg), "sources": source_inputs(loaded, names), "v": VERSION},
                        corpus, describe=f"read, clean, deduplicate and split {', '.join(names)}",
                        downloads=tuple(hub)))

    def tokenizer(stage, deps):
        from workbench.pipelines.tokenizer import run_tokenizer

        text = _stage_at(deps["corpus"]["outputs"]["text_stage"])
        base = _model_of(deps, "base", profile)
        tok = run_tokenizer(loaded, base, text, work)
        if tok is None:
            return {"model": str(base), "report": None}
        record = tok.record()
        model = record["outputs"].get("model")
        return {"model": str(tok.path / model) if model else str(base),
                "report": str(tok.path / record["outputs"]["report"]), "fertility": record.get("fertility")}

    ext = " and extend the vocabulary" if profile.tokenizer.extend_vocab else ""
    graph.add(StageSpec("tokenizer", {"tokenizer": to_dict(profile.tokenizer), "v": VERSION}, tokenizer,
                        deps=("fetch", "corpus"), describe=f"fertility of the base tokenizer{ext}"))

    def blocks(stage, deps):
        from workbench.pipelines.corpus import run_corpus

        packed = run_corpus(loaded, Path(deps["tokenizer"]["outputs"]["model"]), work)
        return {"corpus_stage": str(packed.path), "heldout": str(packed.path / "heldout.jsonl")}

    graph.add(StageSpec("blocks", {"corpus": to_dict(cfg), "v": VERSION}, blocks, deps=("corpus", "tokenizer"),
                        describe=f"token budget, replay share and packing into {cfg.block_size}-token blocks"))

    def pretrain(stage, deps):
        from workbench.pipelines.pretrain import run_pretrain

        corpus_stage = _stage_at(deps["blocks"]["outputs"]["corpus_stage"])
        ct = run_pretrain(loaded, Path(deps["tokenizer"]["outputs"]["model"]), corpus_stage, work)
        record = ct.record()
        return {"model": str(ct.path / "model"), "summary": {k: v for k, v in record.items()
                                                             if k not in ("inputs", "outputs")}}

    p = profile.language_expert.pretrain
    graph.add(StageSpec("language_expert", {"pretrain": to_dict(p), "v": VERSION}, pretrain,
                        deps=("tokenizer", "blocks"),
                        describe=f"continual pretraining ({p.method}, {p.max_steps} steps of "
                                 f"{p.batch_size * p.grad_accum} x {profile.corpus.block_size} tokens)"))


def _add_other_language_expert(graph, loaded, work):
    profile = loaded.profile
    le = profile.language_expert
    if le.fetch is not None:
        def fetched(stage, deps):
            return {"model": deps["fetch"]["outputs"]["models"]["language"]}

        graph.add(StageSpec("language_expert", {"fetch": to_dict(le.fetch), "v": VERSION}, fetched,
                            deps=("fetch",), describe=f"fetched: {_describe_source(le.fetch)}"))
        return

    def sft(stage, deps):
        from workbench.pipelines.prompts import PromptFormat
        from workbench.pipelines.sft import run_sft

        base = _model_of(deps, "base", profile)
        done = run_sft(le.sft, base, work, PromptFormat(template="{question}"), config_dir=loaded.base_dir,
                       name="language")
        return {"model": str(done.path / "model")}

    hub = (le.sft.data.hub,) if le.sft.data.hub else ()
    graph.add(StageSpec("language_expert", {"sft": to_dict(le.sft), "v": VERSION}, sft, deps=("fetch",),
                        describe=f"SFT on target-language instructions ({le.sft.train.method})", downloads=hub))


def _add_task_expert(graph, loaded, work, name, expert):
    profile = loaded.profile
    if expert.fetch is not None:
        def fetched(stage, deps):
            return {"model": deps["fetch"]["outputs"]["models"][name]}

        graph.add(StageSpec(f"expert:{name}", {"fetch": to_dict(expert.fetch), "v": VERSION}, fetched,
                            deps=("fetch",), describe=f"{expert.task} expert fetched: {_describe_source(expert.fetch)}"))
        return

    def sft(stage, deps):
        from workbench.pipelines.sft import run_sft

        done = run_sft(expert.sft, _model_of(deps, "base", profile), work, config_dir=loaded.base_dir, name=name)
        return {"model": str(done.path / "model")}

    data = expert.sft.data
    what = f"{data.generated} generated {data.lang} word problems" if data.generated else (data.hub or data.path)
    graph.add(StageSpec(f"expert:{name}", {"sft": to_dict(expert.sft), "v": VERSION}, sft, deps=("fetch",),
                        describe=f"{expert.task} expert: SFT ({expert.sft.train.method}) on {what}",
                        downloads=(data.hub,) if data.hub else ()))


def _add_analysis(graph, loaded, expert_stages):
    profile = loaded.profile

    def analyze(stage, deps):
        from workbench.analysis import analyze_models, write_analysis

        experts = {"language": _model_of(deps, "language", profile)}
        experts.update({n: _model_of(deps, n, profile) for n in profile.experts})
        profiles = analyze_models(_model_of(deps, "base", profile), experts)
        files = write_analysis(profiles, stage.path)
        return {"profile": files["json"], "heatmap": files["heatmap"]}

    graph.add(StageSpec("analyze", {"v": VERSION}, analyze, deps=("fetch", "language_expert") + expert_stages,
                        describe="delta magnitudes per layer and module of each expert (heatmap)"))


def _add_merge(graph, loaded, name, recipe, expert_stages):
    profile = loaded.profile

    def merge(stage, deps):
        from workbench.merge.engine import run_merge

        from workbench.pipelines.publish import merge_card

        models = {ref: _model_of(deps, ref, profile) for ref in recipe.references()}
        result = run_merge(recipe, models, stage.path / "model", overwrite=True,
                           source=f"{loaded.source}: profiles.{loaded.profile_name}.merges.{name}",
                           card=merge_card(loaded, deps, recipe.references()))
        return {"model": str(result.out_dir), "report": str(result.out_dir / "merge_report.json")}

    deps = ("fetch", "language_expert") + tuple(s for s in expert_stages if s.split(":")[1] in recipe.references())
    graph.add(StageSpec(f"merge:{name}", {"recipe": to_dict(recipe), "v": VERSION}, merge, deps=deps,
                        describe=f"{recipe.method} of {', '.join(recipe.references())}"))


def eval_models(deps: dict, profile) -> dict:
    """{table label: model directory}: base, the language expert, the task experts, every merge."""
    models = {"base": _model_of(deps, "base", profile), "language": _model_of(deps, "language", profile)}
    models.update({n: _model_of(deps, n, profile) for n in profile.experts})
    models.update({n: stage_output(deps[f"merge:{n}"], "model") for n in profile.merges})
    return models


def _add_evaluation(graph, loaded, run_dir, expert_stages, ct):
    profile = loaded.profile

    def evaluate(stage, deps):
        from workbench.pipelines.evaluate import evaluate_models, read_documents, tasks_from_config

        heldout = None
        if ct:
            heldout = list(read_documents(deps["blocks"]["outputs"]["heldout"]))
        tasks = tasks_from_config(loaded, heldout_docs=heldout)
        # One folder for the whole run: a model evaluated earlier with the same inputs is not evaluated again.
        table = evaluate_models(eval_models(deps, profile), tasks=tasks, out_dir=run_dir / "evaluation",
                                settings=profile.eval)
        return {"table": table["files"]["table_json"], "markdown": table["files"]["table_md"],
                "plot": table["files"]["plot"]}

    merges = tuple(f"merge:{n}" for n in profile.merges)
    deps = ("fetch", "language_expert") + expert_stages + merges + (("blocks",) if ct else ())
    ev = profile.eval
    graph.add(StageSpec("evaluate", {"eval": to_dict(ev), "prompt": to_dict(loaded.language.prompt),
                                     "digits": loaded.language.digits, "v": VERSION}, evaluate, deps=deps,
                        describe=f"{2 + len(profile.experts) + len(profile.merges)} models on target-language "
                                 f"perplexity, generated problems and MGSM"))


def _add_report(graph, loaded, run_dir, ct):
    profile = loaded.profile

    def report(stage, deps):
        from workbench.pipelines.publish import refresh_merge_cards
        from workbench.report import write_report

        refresh_merge_cards(loaded, deps)
        return write_report(loaded, deps, run_dir)

    deps = tuple(s.name for s in graph.specs)
    graph.add(StageSpec("report", {"v": VERSION, "raw": loaded.raw}, report, deps=deps,
                        describe="report.md / report.json: table, heatmap, swap layers, survival counts"))


def _stage_at(path: str):
    """A finished content stage of another module, from its folder."""
    from workbench.pipelines.stage import RECORD, Stage

    folder = Path(path)
    data = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    return Stage(name=data["stage"], key=data["key"], path=folder, inputs=data.get("inputs", {}))


def default_run_dir(loaded, root) -> Path:
    return Path(root) / f"{loaded.language.code}-{loaded.profile_name}"
