"""Evaluate model directories: target-language perplexity and MGSM-format accuracy, one table
(Markdown, JSON) and a bar chart, and every prompt, output and extracted answer as JSONL.

  workbench eval runs/base runs/math --out eval/ --lang sw --heldout heldout_sw.txt
  workbench eval math=runs/math --out eval/ --mgsm languages/mgsm/mgsm_en.tsv --samples 40

A MODEL is a model directory, a .gguf file or PACKAGE:FILE.gguf, optionally named: NAME=MODEL. With
--lang, the profile's eval section gives the tasks (a sample of the MGSM file, held-out generated problems
in the language and in English) and the prompt; without it, problems are asked in MGSM's English format.
Writes OUT/results.{md,json,png} and OUT/<model>/<task>.jsonl.
"""
from pathlib import Path

from workbench.cli.common import add_config_arguments, load_config
from workbench.config.language import EvalConfig
from workbench.evaluation.mgsm import read_mgsm_tsv, sample_items
from workbench.outputs import check_apart
from workbench.pipelines.evaluate import (
    MGSM_SAMPLE_SEED, PerplexitySet, TaskSet, evaluate_models, generated_task, read_document_lines, tasks_from_config
)
from workbench.pipelines.fetch import parse_model_arg, resolve_model


def add_arguments(parser):
    parser.add_argument("models", nargs="+", metavar="MODEL", help="[NAME=]model directory or GGUF file")
    add_config_arguments(parser, required=False)
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--mgsm", metavar="FILE", help="question<TAB>answer file (replaces the profile's)")
    parser.add_argument("--samples", type=int, metavar="N", help="problems sampled from the MGSM file "
                        "(default: the profile's eval.mgsm.samples, else 40)")
    parser.add_argument("--heldout", metavar="FILE", help="held-out target-language text, one document a line")
    parser.add_argument("--generated", type=int, metavar="N", help="held-out generated problems per language "
                        "(default: the profile's eval.generated_problems; 0 without --lang)")
    parser.add_argument("--solution-nll", type=int, metavar="N", help="items per set scored by the likelihood of "
                        "their gold worked solution (default: the profile's eval.solution_nll_items; with --lang)")
    parser.add_argument("--n-shot", type=int, metavar="K", help="exemplars before each question (default 0)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N")
    parser.add_argument("--batch-size", type=int, metavar="N")
    parser.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval tasks (needs lm-eval and "
                        "the hub), e.g. mgsm_direct_sw,belebele_swh_Latn")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="a folder of your own lm-eval task YAMLs "
                        "(their tasks may then be named in --lm-eval; local data runs offline)")


def _overrides(args) -> list:
    """Command-line options as profile overrides (so they are validated like the YAML)."""
    pairs = [("eval.mgsm.samples", args.samples), ("eval.generated_problems", args.generated),
             ("eval.solution_nll_items", args.solution_nll),
             ("eval.n_shot", args.n_shot), ("eval.max_new_tokens", args.max_new_tokens),
             ("eval.batch_size", args.batch_size),
             ("eval.lm_eval", args.lm_eval.split(",") if args.lm_eval else None),
             ("eval.lm_eval_include", str(Path(args.lm_eval_include).resolve()) if args.lm_eval_include else None)]
    return [(key, value) for key, value in pairs if value is not None]


def model_arguments(texts) -> dict:
    """{name: local model directory} from `[NAME=]SOURCE` arguments (GGUF files are converted once)."""
    models = {}
    for text in texts:
        name, sep, spec = text.partition("=")
        if not sep or "/" in name or not name:
            name, spec = None, text
        path = resolve_model(parse_model_arg(spec), base_dir=Path.cwd())
        name = name or path.name
        unique, i = name, 2
        while unique in models:
            unique, i = f"{name}-{i}", i + 1
        models[unique] = path
    return models


def _tasks_without_config(args, settings):
    tasks = []
    if args.mgsm:
        rows = sample_items(read_mgsm_tsv(args.mgsm), args.samples or 40, MGSM_SAMPLE_SEED)
        tasks.append(TaskSet(Path(args.mgsm).stem, tuple(rows), n_shot=settings.n_shot))
    if args.generated:
        tasks.append(generated_task("en", args.generated, settings.generated_seed, n_shot=settings.n_shot))
    if args.heldout:
        tasks.append(PerplexitySet("perplexity", read_document_lines(args.heldout, settings.perplexity_docs)))
    return tasks


def run(args):
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()  # one progress line per task instead
    models = model_arguments(args.models)
    files = {"--mgsm": args.mgsm, "--heldout": args.heldout}
    check_apart({"evaluation folder": Path(args.out)}, {**models, **{k: v for k, v in files.items() if v}})
    if args.lang:
        args.overrides = list(args.overrides) + _overrides(args)
        loaded = load_config(args)
        settings = loaded.profile.eval
        docs = read_document_lines(args.heldout) if args.heldout else None
        tasks = tasks_from_config(loaded, heldout_docs=docs, mgsm_path=args.mgsm)
    else:
        settings = EvalConfig(**{k.split(".")[-1]: v for k, v in _overrides(args) if k.count(".") == 1})
        tasks = _tasks_without_config(args, settings)
    table = evaluate_models(models, tasks=tasks, out_dir=args.out, settings=settings)
    print()
    print(Path(table["files"]["table_md"]).read_text(encoding="utf-8"))
    print(f"table: {table['files']['table_md']}, {table['files']['table_json']}; chart: {table['files']['plot']}; "
          f"outputs: {Path(args.out) / '<model>' / '<task>.jsonl'}")
    return 0
