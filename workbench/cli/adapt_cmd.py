"""Run the whole pipeline for a language: fetch -> corpus -> tokenizer check (-> vocabulary extension) ->
continual pretraining (language expert) -> task experts (SFT or fetch) -> delta analysis -> merges ->
evaluation -> report.

Each stage writes under the run directory keyed by a hash of its inputs: a rerun skips finished stages and
resumes an interrupted one; changing a setting reruns only the stages it affects.

  workbench adapt --lang sw --profile micro          the offline CPU run (about 15 minutes on 2 cores)
  workbench adapt --lang sw --profile micro --fast   a small variant for tests (a few minutes)
  workbench adapt --lang te --profile paper-ties-sv --dry-run
"""
import time
from pathlib import Path

from workbench.cli.common import (add_allow_pickle_argument, add_config_arguments, add_run_dir_argument, load_config,
                                  run_dir_of)
from workbench.outputs import check_apart
from workbench.pipelines.adapt import build_graph, eval_models
from workbench.pipelines.evaluate import missing_packages
from workbench.pipelines.fetch import allow_pickles, fetch_profile
from workbench.pipelines.runner import clock
from workbench.report import export_summary


def add_arguments(parser):
    add_config_arguments(parser)
    add_run_dir_argument(parser)
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun from this stage on "
                        "(fetch, corpus, tokenizer, blocks, language_expert, expert, analyze, merge, evaluate, export, report)")
    parser.add_argument("--only", metavar="STAGE", help="run only this stage (its inputs must be done)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; no network, nothing written")
    parser.add_argument("--fast", action="store_true", help="the profile's small variant (for tests)")
    add_allow_pickle_argument(parser)


def run(args):
    loaded = load_config(args, fast=args.fast)
    if args.allow_pickle:
        allow_pickles(loaded.profile)
    run_dir = run_dir_of(args, loaded)
    graph = build_graph(loaded, run_dir)
    fetch_profile(loaded, run_dir, dry_run=True)  # a local model fetch would refuse fails now, not after hours
    missing = missing_packages(loaded)
    if missing and not args.dry_run:
        raise missing[0]  # before any stage runs: the evaluation would skip those tasks after hours of work
    lang = loaded.language
    head = f"workbench adapt: {lang.name} ({lang.code}), profile {loaded.profile_name}" + \
           (" --fast" if args.fast else "") + f", run directory {run_dir}"
    if args.dry_run:
        print(head)
        print(loaded.profile.description.strip())
        print("\n".join(graph.plan_lines()))
        for error in missing:
            print(f"warning: {error}")
        return 0
    check_apart({"run directory": run_dir}, loaded.local_inputs(), option="--run-dir")
    print(head)
    quiet_library_progress()
    started = time.perf_counter()
    records = graph.execute(from_stage=args.from_stage, only=args.only)
    if "report" in records:
        report = records["report"]["outputs"]
        table = Path(records["evaluate"]["outputs"]["markdown"]).read_text(encoding="utf-8")
        print("\n" + table)
        verdict = _statements(report["json"])
        for line in verdict:
            print(f"- {line.replace('**', '')}")
        best = report.get("best")
        if best:
            print(f"\nrecommended model ({best}): {eval_models(records, loaded.profile)[best]}")
        _print_export(records.get("export"))
        print(f"report: {report['markdown']}")
    print(f"total time {clock(time.perf_counter() - started)}")
    return 0


def _print_export(record):
    export = export_summary(record)
    if export and "gguf" in export:
        print(f"GGUF ({export['type']}, {export['bytes'] / 1024**2:.1f} MiB): {export['gguf']}")
        print(f"  run it: {export['commands']['ollama']}")
        print(f"      or: {export['commands']['llama_cpp']}")
    elif export:
        print(f"export: {export['note']}")


def quiet_library_progress():
    """One progress display for the run: the stage lines and our own step lines, not the libraries' nested bars
    (datasets' map and save bars, transformers' weight-loading and GGUF conversion bars)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _statements(report_json):
    import json

    return json.loads(Path(report_json).read_text(encoding="utf-8"))["verdict"]["statements"]
