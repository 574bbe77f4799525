"""The evaluation stage: every model on every task, one table (Markdown, JSON), a bar chart, and every
prompt, output, extracted and gold answer as JSONL (docs/design.md §8).

Tasks are data: `TaskSet` (MGSM-format problems with the prompt format and digits they are asked in, scored
by generation), `SolutionSet` (problems with a gold worked solution, scored by its likelihood: solution NLL)
and `PerplexitySet` (held-out documents). `tasks_from_config` builds them from a profile's `eval` section:
a seeded sample of the language's MGSM file, held-out generated problems in the target language and in
English (parallel sets: same arithmetic), each also as a larger solution-NLL set (`eval.solution_nll_items`;
the accuracy items are among them), and perplexity on the held-out documents the caller passes.

Files written under `out_dir`:
    results.json, results.md, results.png      the table across models, and its chart
    <model>/<task>.jsonl                       one record per problem (accuracy and solution NLL tasks)
    <model>/metrics.json                       the model's metrics and the key of its inputs (resume)
"""
import gc
import importlib.util
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.config.language import EvalConfig
from workbench.errors import ConfigError, DataError, HubUnavailableError, MissingDependencyError
from workbench.evaluation.answers import extract_answer, same_number
from workbench.evaluation.generation import generate, load_model, question_prefix
from workbench.evaluation.likelihood import solution_nll
from workbench.evaluation.mgsm import MgsmItem, load_mgsm, read_mgsm_tsv, sample_items
from workbench.evaluation.paired import mean_interval
from workbench.evaluation.perplexity import perplexity
from workbench.evaluation.table import accuracy_record, markdown_table, plot_table
from workbench.pipelines.problems import generate_problems, supported_languages
from workbench.pipelines.prompts import ENGLISH_TEMPLATE, PromptFormat, prompt_text
from workbench.pipelines.stage import write_json_atomic
from workbench.provenance import fingerprint

# MGSM's English exemplar 1 (Shi et al., 2022; CC BY 4.0), the English counterpart of the YAMLs' exemplars.
ENGLISH_FORMAT = PromptFormat(template=ENGLISH_TEMPLATE, exemplars=((
    "Roger has 5 tennis balls. He buys 2 more cans of tennis balls. Each can has 3 tennis balls. "
    "How many tennis balls does he have now?",
    "Roger started with 5 balls. 2 cans of 3 tennis balls each is 6 tennis balls. 5 + 6 = 11. The answer is 11."),))
MGSM_SAMPLE_SEED = 0  # one fixed subset of each MGSM file, whatever the profile's training seed


@dataclass(frozen=True)
class TaskSet:
    """MGSM-format problems and how they are asked: prompt format, n-shot, the script's digits."""

    name: str
    items: tuple  # MgsmItem, ...
    fmt: PromptFormat = ENGLISH_FORMAT
    digits: str | None = None
    n_shot: int = 0


@dataclass(frozen=True)
class SolutionItem:
    """One problem with its gold worked solution (the text scored), and where it came from."""

    question: str
    solution: str
    source: str


@dataclass(frozen=True)
class SolutionSet:
    """Problems whose gold solutions are scored by likelihood given the prompt (solution NLL)."""

    name: str
    items: tuple  # SolutionItem, ...
    fmt: PromptFormat = ENGLISH_FORMAT
    n_shot: int = 0


@dataclass(frozen=True)
class PerplexitySet:
    """Held-out documents for perplexity."""

    name: str
    docs: tuple = field(repr=False)


def generated_task(lang: str, n: int, seed: int, **kwargs) -> TaskSet:
    """Held-out generated problems in `lang` as a task."""
    items = tuple(MgsmItem(p.question, p.number, f"generated:{lang}:seed{seed}:{i}")
                  for i, p in enumerate(generate_problems(lang, n, seed, split="heldout")))
    return TaskSet(name=f"generated_{lang}", items=items, **kwargs)


def generated_solutions(lang: str, n: int, seed: int, **kwargs) -> SolutionSet:
    """Held-out generated problems in `lang` with their worked answers (the same first items as
    `generated_task` with the same seed)."""
    items = tuple(SolutionItem(p.question, p.answer, f"generated:{lang}:seed{seed}:{i}")
                  for i, p in enumerate(generate_problems(lang, n, seed, split="heldout")))
    return SolutionSet(name=f"nll_generated_{lang}", items=items, **kwargs)


_SENTENCE_END = re.compile(r"(?:[.!?]\s+|[。।]\s*)")


def answer_statement(fmt: PromptFormat, number) -> str | None:
    """The final sentence of the prompt's first exemplar answer with its number replaced by `number`
    ("Jibu ni 11." -> "Jibu ni 18."): MGSM's gold answer in the language's answer format. None when the
    prompt has no exemplar or its answer holds no number."""
    if not fmt.exemplars:
        return None
    answer = fmt.exemplars[0][1].strip()
    numbers = list(re.finditer(r"\d+(?:[.,]\d+)*", answer))
    if not numbers:
        return None
    last = numbers[-1]
    ends = [m.end() for m in _SENTENCE_END.finditer(answer, 0, last.start())]
    value = int(number) if float(number).is_integer() else number
    return answer[ends[-1] if ends else 0:last.start()] + str(value) + answer[last.end():]


def mgsm_solutions(name: str, rows: list, n: int, fmt: PromptFormat, n_shot: int) -> SolutionSet | None:
    """A seeded sample of MGSM rows with the gold answer stated in the prompt's answer format, or None when
    the format has no exemplar to take it from."""
    if answer_statement(fmt, 0) is None:
        return None
    items = tuple(SolutionItem(i.question, answer_statement(fmt, i.answer), i.source)
                  for i in sample_items(rows, n, MGSM_SAMPLE_SEED))
    return SolutionSet(f"nll_{name}", items, fmt, n_shot)


def read_document_lines(path, limit: int | None = None) -> tuple:
    """Held-out documents from a text file, one a line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read held-out text: {e.strerror or e}") from None
    docs = tuple(line.strip() for line in lines if line.strip())
    if not docs:
        raise DataError(f"{path}: no documents (expected text, one document a line)")
    return docs[:limit] if limit else docs


def tasks_from_config(loaded, *, heldout_docs=None, mgsm_path=None) -> list:
    """The tasks a profile's `eval` section names; `mgsm_path` replaces the profile's MGSM file."""
    lang, ev = loaded.language, loaded.profile.eval
    fmt = PromptFormat.from_config(lang.prompt)
    tasks = []
    if mgsm_path is not None:
        rows = read_mgsm_tsv(mgsm_path)
        name = re.sub(r"\W+", "_", Path(mgsm_path).stem)
    elif ev.mgsm is not None:
        rows, name = load_mgsm(ev.mgsm, loaded.base_dir), f"mgsm_{lang.code}"
    else:
        rows = None
    nll = ev.solution_nll_items
    if rows is not None:
        samples = ev.mgsm.samples if ev.mgsm is not None else len(rows)
        tasks.append(TaskSet(name, tuple(sample_items(rows, samples, MGSM_SAMPLE_SEED)), fmt, lang.digits, ev.n_shot))
        solutions = mgsm_solutions(name, rows, nll, fmt, ev.n_shot) if nll else None
        tasks += [solutions] if solutions else []
    target_generated = ev.generated_in == "target_and_english"
    if ev.generated_problems and target_generated and lang.code not in supported_languages():
        raise loaded.where("eval.generated_problems").error(
            f"no word-problem templates for {lang.code!r} (supported: {', '.join(supported_languages())}); "
            f"set eval.generated_in: english (English retention only) or eval.generated_problems: 0")
    sets = [(lang.code, fmt)] if target_generated and lang.code in supported_languages() else []
    sets += [("en", ENGLISH_FORMAT)] if lang.code != "en" else []
    for code, code_fmt in sets:
        if ev.generated_problems:
            tasks.append(generated_task(code, ev.generated_problems, ev.generated_seed, fmt=code_fmt,
                                        digits=lang.digits if code == lang.code else None, n_shot=ev.n_shot))
        if nll and ev.generated_problems:  # generated_problems: 0 switches generated problems off altogether
            tasks.append(generated_solutions(code, nll, ev.generated_seed, fmt=code_fmt, n_shot=ev.n_shot))
    if heldout_docs:
        tasks.append(PerplexitySet(f"perplexity_{lang.code}", tuple(heldout_docs[:ev.perplexity_docs])))
    return tasks


def evaluated_metrics(loaded, ct: bool) -> list:
    """What `tasks_from_config` and lm-eval will measure, without loading data: held-out perplexity needs the CT
    stages (their held-out split)."""
    ev, code = loaded.profile.eval, loaded.language.code
    metrics = [f"MGSM ({ev.mgsm.samples} items)"] if ev.mgsm is not None else []
    if ev.generated_problems and ev.generated_in == "english":
        metrics.append(f"{ev.generated_problems} generated English problems (retention)")
    elif ev.generated_problems:
        metrics.append(f"{ev.generated_problems} generated problems" + (" and their English originals"
                                                                          if code != "en" else ""))
    generated = ((["generated"] if ev.generated_in == "target_and_english" and code in supported_languages() else [])
                 + (["English generated"] if code != "en" else [])) if ev.generated_problems else []
    nll_sets = (["MGSM"] if ev.mgsm is not None else []) + generated
    if ev.solution_nll_items and nll_sets:
        metrics.append(f"solution NLL on {ev.solution_nll_items} items each of {', '.join(nll_sets)} problems")
    if ct:
        metrics.append("target-language perplexity")
    metrics += [f"lm-eval {task}" for task in ev.lm_eval]
    return metrics


def missing_packages(loaded) -> list:
    """ConfigErrors for optional packages the profile needs and this environment lacks, each naming the fix."""
    tasks = loaded.profile.eval.lm_eval
    if tasks and not lm_eval_installed():
        return [loaded.where("eval.lm_eval").error(f"lm-eval tasks {', '.join(tasks)} need lm-eval, which is not "
                                                    f"installed: pip install -e \".[eval]\" (or set it to [])")]
    return []


def _file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name) or "model"


# The version of what a metrics record holds: saved metrics of another version are computed again
# (2: perplexity records gained bits per character; 3: solution-NLL records and items gained it too).
METRICS_VERSION = 3


def _inputs_key(path: Path, tasks, settings: EvalConfig) -> str:
    """What a model's metrics depend on: its weight files (name, size, mtime), the tasks, the settings, and the
    version of the records."""
    weights = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(path).glob("*.safetensors"))]
    task_data = [(t.name, [(i.question, i.answer) for i in t.items], t.fmt, t.digits, t.n_shot)
                 if isinstance(t, TaskSet) else
                 (t.name, "solution_nll", [(i.question, i.solution) for i in t.items], t.fmt, t.n_shot)
                 if isinstance(t, SolutionSet) else (t.name, t.docs) for t in tasks]
    return fingerprint({"version": METRICS_VERSION, "model": str(path), "weights": weights, "tasks": task_data,
                        "settings": {"max_new_tokens": settings.max_new_tokens, "lm_eval": settings.lm_eval}})


def score_task(model, tokenizer, task: TaskSet, settings: EvalConfig, jsonl: Path) -> dict:
    """Accuracy of one model on one task; writes every prompt, output and answer to `jsonl`."""
    prompts = [prompt_text(tokenizer, task.fmt, item.question, task.n_shot) for item in task.items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                       batch_size=settings.batch_size, stop_strings=[question_prefix(task.fmt.template)])
    correct = no_answer = 0
    with open(jsonl, "w", encoding="utf-8") as f:
        for item, prompt, output in zip(task.items, prompts, outputs):
            extracted = extract_answer(output, task.digits)
            ok = same_number(extracted, item.answer)
            correct += ok
            no_answer += extracted is None
            f.write(json.dumps({"task": task.name, "source": item.source, "question": item.question,
                                "prompt": prompt, "output": output, "extracted": extracted, "gold": item.answer,
                                "correct": ok}, ensure_ascii=False) + "\n")
    return accuracy_record(correct, len(task.items), no_answer)


def score_solutions(model, tokenizer, task: SolutionSet, settings: EvalConfig, jsonl: Path) -> dict:
    """Solution NLL of one model on one set (mean per-token NLL per item; their mean and 95% interval; the
    same in bits per character under `bits_per_char`, which compares across tokenizers);
    writes each item's value to `jsonl` (for paired comparisons)."""
    prompts = [prompt_text(tokenizer, task.fmt, item.question, task.n_shot) for item in task.items]
    scores = solution_nll(model, tokenizer, list(zip(prompts, [i.solution for i in task.items])),
                          batch_size=settings.batch_size)
    with open(jsonl, "w", encoding="utf-8") as f:
        for item, score in zip(task.items, scores):
            f.write(json.dumps({"task": task.name, "source": item.source, "question": item.question,
                                "solution": item.solution, **score}, ensure_ascii=False) + "\n")
    return {"kind": "solution_nll", **mean_interval([s["nll"] for s in scores]),
            "tokens": sum(s["tokens"] for s in scores), "characters": sum(s["characters"] for s in scores),
            "bits_per_char": mean_interval([s["bits_per_char"] for s in scores])}


def evaluate_model(path: Path, tasks, settings: EvalConfig, model_dir: Path, log=print) -> dict:
    """{task name: metric record} of one model (loaded once for all its tasks)."""
    model, tokenizer = load_model(path)
    metrics = {}
    try:
        for task in tasks:
            start = time.perf_counter()
            if isinstance(task, PerplexitySet):
                metrics[task.name] = {"kind": "perplexity",
                                      **perplexity(model, tokenizer, list(task.docs), batch_size=settings.batch_size)}
            elif isinstance(task, SolutionSet):
                metrics[task.name] = score_solutions(model, tokenizer, task, settings,
                                                     model_dir / f"{_file_name(task.name)}.jsonl")
            else:
                metrics[task.name] = score_task(model, tokenizer, task, settings,
                                                model_dir / f"{_file_name(task.name)}.jsonl")
            metrics[task.name]["seconds"] = round(time.perf_counter() - start, 2)
            log(f"  {task.name}: {_summary(metrics[task.name])} ({metrics[task.name]['seconds']} s)")
    finally:
        del model
        gc.collect()
    return metrics


def _summary(record: dict) -> str:
    if record["kind"] == "accuracy":
        return f"{100 * record['accuracy']:.1f}% ({record['correct']}/{record['n']})"
    if record["kind"] == "perplexity":
        return f"perplexity {record['perplexity']:.2f} over {record['tokens']} tokens"
    if record["kind"] == "solution_nll":
        return f"solution NLL {record['mean']:.3f} over {record['n']} items"
    return f"{record['value']:.4f}"


def evaluate_models(models: dict[str, Path], *, tasks: list, out_dir, settings: EvalConfig | None = None,
                    log=print) -> dict:
    """Evaluate each model on every task (and `settings.lm_eval` tasks when possible); write the table,
    chart and JSONL under `out_dir`; return the table (`columns`, `rows`) with `models`, `notes`, `files`.

    A model whose `<model>/metrics.json` holds the same inputs key is not evaluated again.
    """
    settings = settings or EvalConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not tasks and not settings.lm_eval:
        raise ConfigError("nothing to evaluate: no MGSM-format task, held-out text or lm-eval task given")
    lm_eval_note = (lm_eval_unavailable(settings.lm_eval, local_tasks=settings.lm_eval_include is not None)
                    if settings.lm_eval else None)
    notes = [lm_eval_note] if lm_eval_note else []
    rows, files = {}, {}
    for name, path in models.items():
        model_dir = out_dir / _file_name(name)
        model_dir.mkdir(exist_ok=True)
        key = _inputs_key(path, tasks, settings)
        saved = model_dir / "metrics.json"
        if saved.is_file() and json.loads(saved.read_text(encoding="utf-8")).get("key") == key:
            rows[name] = json.loads(saved.read_text(encoding="utf-8"))["metrics"]
            log(f"{name}: already evaluated ({saved})")
        else:
            log(f"{name}: {path}")
            rows[name] = evaluate_model(Path(path), tasks, settings, model_dir, log)
            if settings.lm_eval and not lm_eval_note:
                try:
                    rows[name].update(run_lm_eval(Path(path), settings.lm_eval, settings.batch_size,
                                                  include=settings.lm_eval_include))
                except (MissingDependencyError, HubUnavailableError) as e:
                    lm_eval_note = str(e)
                    notes.append(lm_eval_note)
                    log(f"  lm-eval: {e}")
            write_json_atomic(saved, {"model": name, "path": str(path), "key": key, "metrics": rows[name]})
        files[name] = {t.name: str(model_dir / f"{_file_name(t.name)}.jsonl") for t in tasks
                       if isinstance(t, (TaskSet, SolutionSet))}
    return write_results(rows, models, tasks, out_dir, notes, files)


def write_results(rows: dict, models: dict, tasks: list, out_dir: Path, notes: list, files: dict) -> dict:
    """results.json, results.md and results.png from the per-model metrics."""
    columns = {}
    for task in tasks:
        if isinstance(task, PerplexitySet):
            columns[task.name] = {"kind": "perplexity", "documents": len(task.docs)}
        else:
            kind = "solution_nll" if isinstance(task, SolutionSet) else "accuracy"
            columns[task.name] = {"kind": kind, "n": len(task.items), "n_shot": task.n_shot}
    for metrics in rows.values():
        for metric, record in metrics.items():
            columns.setdefault(metric, {"kind": record["kind"]})
    table = {"columns": columns, "rows": rows, "models": {n: str(p) for n, p in models.items()}, "notes": notes}
    md = markdown_table(table) + "".join(f"\nNote: {n}\n" for n in notes)
    (out_dir / "results.md").write_text(md, encoding="utf-8")
    plot_table(table, out_dir / "results.png")
    table["files"] = {"table_json": str(out_dir / "results.json"), "table_md": str(out_dir / "results.md"),
                      "plot": str(out_dir / "results.png"), "predictions": files}
    write_json_atomic(out_dir / "results.json", table)
    return table


# ----- lm-eval (optional)

def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_unavailable(tasks, *, local_tasks: bool = False) -> str | None:
    """Why lm-eval tasks cannot run here (not installed, hub switched off), or None. With `local_tasks` (an
    include folder of the user's own tasks, whose data may be local files) a switched-off hub is no reason."""
    import os

    skipped = ", ".join(tasks)
    if not lm_eval_installed():
        return f"lm-eval is not installed (pip install -e \".[eval]\"); skipped: {skipped}"
    if not local_tasks and any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return f"the Hugging Face Hub is switched off here (HF_HUB_OFFLINE); lm-eval tasks skipped: {skipped}"
    return None


def run_lm_eval(path: Path, tasks, batch_size: int, *, include=None) -> dict:
    """lm-eval tasks on one model directory, as table records `<task> (<metric>)`: its standard tasks, and
    those defined in the folder `include` (task YAMLs, lm-eval's `include_path`)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError("lm-eval is not installed: pip install -e \".[eval]\"") from None
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"eval.lm_eval_include: {include} is not a folder (expected lm-eval task YAMLs)")
    try:
        import torch

        # lm-eval's HF model asks for CUDA unless told otherwise: on a machine without it, the CPU.
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={path}", tasks=list(tasks),
                                      batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
                                      task_manager=TaskManager(include_path=str(include)) if include else None)
    except (ConnectionError, OSError) as e:
        raise HubUnavailableError(f"lm-eval could not reach the Hugging Face Hub for {', '.join(tasks)} "
                                  f"({type(e).__name__}: {e}); skipped") from None
    records = {}
    for task, metrics in (out or {}).get("results", {}).items():
        for key, value in metrics.items():
            # Metrics are keyed "metric,filter"; "sample_len" and "alias" are not results.
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            records[f"{task} ({key})"] = {"kind": "lm_eval", "metric": key, "value": float(value),
                                          "stderr": stderr if isinstance(stderr, (int, float)) else None}
    return records

