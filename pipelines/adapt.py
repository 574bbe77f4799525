"""The graph of one language profile's run, from base model to merged models, evaluated and reported:

fetch → corpus → tokenizer check (→ vocabulary extension) → packed blocks → language expert (CT, SFT or
fetched) → task experts (SFT or fetched) → delta analysis → merges → evaluation → report.

`workbench adapt` runs all of it; `workbench pretrain` runs the same graph until the language expert. Each
stage is keyed by its settings and its dependencies' keys (`runner.RunGraph`) and works in its own folder
`<run>/stages/<name>-<key>/`, so a rerun skips what is done and resumes what was interrupted (trainer
checkpoints, merge shards). Evaluation keeps one more folder, `<run>/evaluation/`, with each model's scores
keyed by that model's files, so a changed merge does not evaluate the other models again.
"""
from dataclasses import replace
from pathlib import Path

from workbench.analysis import analyze_models, write_analysis
from workbench.config.schema import to_dict
from workbench.errors import ConfigError
from workbench.merge.engine import run_merge
from workbench.pipelines.corpus import read_heldout, source_inputs, write_blocks, write_corpus_text
from workbench.pipelines.evaluate import evaluate_models, evaluated_metrics, tasks_from_config
from workbench.pipelines.fetch import fetch_profile, profile_sources
from workbench.pipelines.memory import base_shape, stage_memory_lines, visible_gpus
from workbench.pipelines.pretrain import train_language_expert
from workbench.pipelines.prompts import PromptFormat
from workbench.pipelines.publish import add_export_stage, merge_card, refresh_merge_cards
from workbench.pipelines.runner import RunGraph, StageSpec, stage_output
from workbench.pipelines.sft import train_sft
from workbench.pipelines.tokenizer import write_tokenizer_report
from workbench.report import write_report

VERSION = 1  # bump when a stage's outputs change for the same inputs
# 2: perplexity on the held-out documents' text; version 1 scored each line of heldout.jsonl, JSON quoting and all
EVALUATE_VERSION = 2


def _model_of(records: dict, role: str, profile) -> Path:
    """The model directory a role names in a finished run: base, language, or a task expert."""
    if role == "base":
        return Path(records["fetch"]["outputs"]["models"]["base"])
    if role == "language":
        return stage_output(records["language_expert"], "model")
    if role in profile.experts:
        return stage_output(records[f"expert:{role}"], "model")
    raise ConfigError(f"no model for role {role!r}")


def sft_inputs(sft) -> dict:
    """An SFT section as its stage's inputs; `from: base` (the default) is left out, so the stages of runs
    from before the key existed keep their keys."""
    inputs = to_dict(sft)
    if inputs.get("from") == "base":
        del inputs["from"]
    return inputs


def _baseline_note(profile, name: str) -> str:
    return " [baseline: every other merge is compared with it]" if name in profile.eval.baselines else ""


def _describe_source(source) -> str:
    return source.label() + (" (access agreement needed)" if source.gated else "")


def build_graph(loaded, run_dir: Path, *, callbacks=(), gpus=None) -> RunGraph:
    """The stages of one run of `loaded` (a LoadedConfig) under `run_dir`; `callbacks` (transformers
    TrainerCallbacks) go to every training stage. Each training stage's plan lines hold its memory per GPU
    on `gpus` (a `memory.Gpus`; default: the visible ones)."""
    profile = loaded.profile
    graph = RunGraph(run_dir)
    memory = _memory_notes(loaded, gpus or visible_gpus())
    le = profile.language_expert
    ct = le.fetch is None and le.sft is None
    sources = profile_sources(profile)

    def fetch(stage, deps):
        manifest = fetch_profile(loaded, stage.path)
        models = {role: manifest["models"][src.label()]["path"] for role, (_, src) in sources.items()}
        return {"models": models, "manifest": str(stage.path / "fetch.json")}

    hub_ids = [f"{src.hub}@{src.revision}" for _, src in sources.values() if src.hub]
    graph.add(StageSpec("fetch", {"sources": {r: to_dict(s) for r, (_, s) in sources.items()}, "v": VERSION},
                        fetch, describe="models: " + "; ".join(f"{r} = {_describe_source(s)}"
                                                               for r, (_, s) in sources.items()),
                        downloads=tuple(hub_ids)))
    if ct:
        _add_ct_stages(graph, loaded, source_inputs, callbacks, memory)
    else:
        _add_other_language_expert(graph, loaded, callbacks, memory)
    for name, expert in profile.experts.items():
        _add_task_expert(graph, loaded, name, expert, callbacks, memory)
    expert_stages = tuple(f"expert:{n}" for n in profile.experts)
    _add_analysis(graph, loaded, expert_stages)
    for name, recipe in profile.merges.items():
        _add_merge(graph, loaded, name, recipe, expert_stages)
    _add_evaluation(graph, loaded, graph.run_dir, expert_stages, ct)
    add_export_stage(graph, loaded, graph.run_dir)
    _add_report(graph, loaded, graph.run_dir)
    return graph


def _memory_notes(loaded, gpus):
    """`notes(stage, train, seq_len)`: a training stage's memory lines for the plan (no model is loaded)."""
    shape, origin = base_shape(loaded.profile.base, loaded.base_dir)
    extended = " (before the vocabulary extension's new rows)" if loaded.profile.tokenizer.extend_vocab else ""

    def notes(stage, train, seq_len):
        if shape is None:
            return (f"memory per GPU: {origin}",)
        lines = stage_memory_lines(shape, train, seq_len=seq_len, gpus=gpus, stage=stage)
        return (*lines, f"  model shape from {origin}{extended}")

    return notes


def _add_ct_stages(graph, loaded, source_inputs, callbacks, memory):
    profile = loaded.profile
    cfg = profile.corpus
    names = list(cfg.sources) + (list(cfg.replay.sources) if cfg.replay else [])
    hub = [f"{loaded.language.sources[n].hub}" for n in names if loaded.language.sources[n].hub]

    def corpus(stage, deps):
        # Output names are those records have always had, so that a run directory from before keeps working.
        return {"text_stage": str(stage.path), "stats": write_corpus_text(loaded, stage.path)}

    graph.add(StageSpec("corpus", {"corpus": to_dict(cfg), "sources": source_inputs(loaded, names), "v": VERSION},
                        corpus, describe=f"read, clean, deduplicate and split {', '.join(names)}",
                        downloads=tuple(hub)))

    def tokenizer(stage, deps):
        base = _model_of(deps, "base", profile)
        report = write_tokenizer_report(loaded, base, deps["corpus"]["outputs"]["text_stage"], stage.path)
        if report is None:
            return {"model": str(base), "report": None}
        extended = "extension" in report
        return {"model": str(stage.path / "model") if extended else str(base),
                "report": str(stage.path / "fertility.json"), "fertility": report}

    ext = " and extend the vocabulary" if profile.tokenizer.extend_vocab else ""
    graph.add(StageSpec("tokenizer", {"tokenizer": to_dict(profile.tokenizer), "v": VERSION}, tokenizer,
                        deps=("fetch", "corpus"), describe=f"fertility of the base tokenizer{ext}"))

    def blocks(stage, deps):
        write_blocks(loaded, deps["tokenizer"]["outputs"]["model"], deps["corpus"]["outputs"]["text_stage"],
                     stage.path)
        return {"corpus_stage": str(stage.path), "heldout": str(stage.path / "heldout.jsonl")}

    graph.add(StageSpec("blocks", {"corpus": to_dict(cfg), "v": VERSION}, blocks, deps=("corpus", "tokenizer"),
                        describe=f"token budget, replay share and packing into {cfg.block_size}-token blocks"))

    p = profile.language_expert.pretrain

    def pretrain(stage, deps):
        model = Path(deps["tokenizer"]["outputs"]["model"])
        extended = "extension" in (deps["tokenizer"]["outputs"].get("fertility") or {})
        if extended and p.method == "lora" and not p.lora.train_embeddings:
            print("note: the vocabulary was extended but LoRA does not train the embeddings; the new rows keep "
                  "their initial values (set language_expert.pretrain.lora.train_embeddings: true)")
        summary = train_language_expert(p, model, deps["blocks"]["outputs"]["corpus_stage"], stage.path,
                                        callbacks=callbacks)
        return {"model": str(stage.path / "model"), "log_history": str(stage.path / "log_history.json"),
                "summary": summary}

    graph.add(StageSpec("language_expert", {"pretrain": to_dict(p), "v": VERSION}, pretrain,
                        deps=("tokenizer", "blocks"), all_processes=True,
                        notes=memory("language_expert", p, cfg.block_size),
                        describe=f"continual pretraining ({p.method}, {p.max_steps} steps of "
                                 f"{p.batch_size * p.grad_accum} x {profile.corpus.block_size} tokens)"))


def _add_other_language_expert(graph, loaded, callbacks, memory):
    profile = loaded.profile
    le = profile.language_expert
    if le.fetch is not None:
        def fetched(stage, deps):
            return {"model": deps["fetch"]["outputs"]["models"]["language"]}

        graph.add(StageSpec("language_expert", {"fetch": to_dict(le.fetch), "v": VERSION}, fetched,
                            deps=("fetch",), describe=f"fetched: {_describe_source(le.fetch)}"))
        return

    def sft(stage, deps):
        # General instructions (e.g. Aya), not word problems: the question is the whole user turn.
        summary = train_sft(le.sft, _model_of(deps, "base", profile), stage.path, PromptFormat(template="{question}"),
                            config_dir=loaded.base_dir, name="language", callbacks=callbacks)
        return {"model": str(stage.path / "model"), "summary": summary}

    hub = (le.sft.data.hub,) if le.sft.data.hub else ()
    graph.add(StageSpec("language_expert", {"sft": sft_inputs(le.sft), "v": VERSION}, sft, deps=("fetch",),
                        all_processes=True, downloads=hub,
                        notes=memory("language_expert", le.sft.train, le.sft.max_length),
                        describe=f"SFT on target-language instructions ({le.sft.train.method})"))


def _add_task_expert(graph, loaded, name, expert, callbacks, memory):
    profile = loaded.profile
    if expert.fetch is not None:
        def fetched(stage, deps):
            return {"model": deps["fetch"]["outputs"]["models"][name]}

        graph.add(StageSpec(f"expert:{name}", {"fetch": to_dict(expert.fetch), "v": VERSION}, fetched,
                            deps=("fetch",),
                            describe=f"{expert.task} expert fetched: {_describe_source(expert.fetch)}"))
        return

    start = expert.sft.from_  # "base", or "language": CT-then-SFT, the task SFT on top of the language expert

    def sft(stage, deps):
        summary = train_sft(expert.sft, _model_of(deps, start, profile), stage.path, config_dir=loaded.base_dir,
                            name=name, callbacks=callbacks)
        return {"model": str(stage.path / "model"), "summary": summary}

    data = expert.sft.data
    what = f"{data.generated} generated {data.lang} word problems" if data.generated else (data.hub or data.path)
    deps = ("fetch",) + (("language_expert",) if start == "language" else ())
    graph.add(StageSpec(f"expert:{name}", {"sft": sft_inputs(expert.sft), "v": VERSION}, sft, deps=deps,
                        describe=f"{expert.task} expert: SFT ({expert.sft.train.method}) on {what}"
                                 + (", from the language expert" if start == "language" else "")
                                 + _baseline_note(profile, name),
                        downloads=(data.hub,) if data.hub else (), all_processes=True,
                        notes=memory(f"expert:{name}", expert.sft.train, expert.sft.max_length)))


def _add_analysis(graph, loaded, expert_stages):
    profile = loaded.profile
    # The experts the merges are made of. A baseline expert no merge takes (CT-then-SFT) is left out: it is
    # compared at evaluation, and, trained on top of an extended-vocabulary language expert, it has that
    # expert's vocabulary too, which a delta against the base cannot hold beside the language expert's.
    merged = {ref for recipe in profile.merges.values() for ref in recipe.references()}
    analyzed = [n for n in profile.experts if n not in profile.eval.baselines or n in merged]

    def analyze(stage, deps):
        experts = {"language": _model_of(deps, "language", profile)}
        experts.update({n: _model_of(deps, n, profile) for n in analyzed})
        profiles = analyze_models(_model_of(deps, "base", profile), experts)
        files = write_analysis(profiles, stage.path)
        return {"profile": files["json"], "heatmap": files["heatmap"]}

    deps = ("fetch", "language_expert") + tuple(s for s in expert_stages if s.split(":", 1)[1] in analyzed)
    graph.add(StageSpec("analyze", {"v": VERSION}, analyze, deps=deps,
                        describe="delta magnitudes per layer and module of each expert (heatmap)"))


def _add_merge(graph, loaded, name, recipe, expert_stages):
    profile = loaded.profile

    def merge(stage, deps):
        models = {ref: _model_of(deps, ref, profile) for ref in recipe.references()}
        result = run_merge(recipe, models, stage.path / "model", overwrite=True,
                           source=loaded.where(f"merges.{name}").located(),
                           nonfinite_option=None,  # adapt has no --allow-nonfinite to recommend
                           card=merge_card(loaded, deps, recipe.references()))
        return {"model": str(result.out_dir), "report": str(result.out_dir / "merge_report.json")}

    deps = ("fetch", "language_expert") + tuple(s for s in expert_stages if s.split(":")[1] in recipe.references())
    graph.add(StageSpec(f"merge:{name}", {"recipe": to_dict(recipe), "v": VERSION}, merge, deps=deps,
                        describe=f"{recipe.method} of {', '.join(recipe.references())}"
                                 + _baseline_note(profile, name)))


def eval_models(deps: dict, profile) -> dict:
    """{table label: model directory}: base, the language expert, the task experts, every merge."""
    models = {"base": _model_of(deps, "base", profile), "language": _model_of(deps, "language", profile)}
    models.update({n: _model_of(deps, n, profile) for n in profile.experts})
    models.update({n: stage_output(deps[f"merge:{n}"], "model") for n in profile.merges})
    return models


def _add_evaluation(graph, loaded, run_dir, expert_stages, ct):
    profile = loaded.profile
    metrics = evaluated_metrics(loaded, ct)
    if not metrics:
        # Known from the profile alone: fail before any fetch or training, not at the evaluate stage.
        raise loaded.where("eval").error(
            "nothing to evaluate: no MGSM, no generated problems, no lm-eval tasks, and no held-out perplexity "
            "(the language expert is fetched, so the CT stages that hold out text do not run); set eval.lm_eval "
            "or eval.mgsm, or remove language_expert.fetch to run CT")

    def evaluate(stage, deps):
        heldout = None
        if ct:
            heldout = read_heldout(deps["blocks"]["outputs"]["corpus_stage"])
        tasks = tasks_from_config(loaded, heldout_docs=heldout)
        # One folder for the whole run: a model evaluated earlier with the same inputs is not evaluated again.
        settings = profile.eval
        if settings.lm_eval_include is not None:  # relative to the language file, like every path of a profile
            settings = replace(settings, lm_eval_include=str(loaded.base_dir / settings.lm_eval_include))
        table = evaluate_models(eval_models(deps, profile), tasks=tasks, out_dir=run_dir / "evaluation",
                                settings=settings)
        return {"table": table["files"]["table_json"], "markdown": table["files"]["table_md"],
                "plot": table["files"]["plot"]}

    merges = tuple(f"merge:{n}" for n in profile.merges)
    deps = ("fetch", "language_expert") + expert_stages + merges + (("blocks",) if ct else ())
    ev = profile.eval
    graph.add(StageSpec("evaluate", {"eval": to_dict(ev), "prompt": to_dict(loaded.language.prompt),
                                     "digits": loaded.language.digits, "v": EVALUATE_VERSION}, evaluate, deps=deps,
                        describe=f"{2 + len(profile.experts) + len(profile.merges)} models on "
                                 f"{', '.join(metrics)}"))


def _add_report(graph, loaded, run_dir):
    def report(stage, deps):
        refresh_merge_cards(loaded, deps)
        return write_report(loaded, deps, run_dir)

    deps = tuple(s.name for s in graph.specs)
    graph.add(StageSpec("report", {"v": VERSION, "raw": loaded.raw}, report, deps=deps,
                        describe="report.md / report.json: table, heatmap, swap layers, survival counts"))
