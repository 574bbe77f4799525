"""Continual pretraining (CT) of the profile's base model on target-language text: the language expert.

The same stages as `workbench adapt`, in the same run directory, run until the language expert: fetch ->
corpus -> tokenizer check (-> vocabulary extension) -> packed blocks -> CT. A rerun skips finished stages and
resumes training from its last checkpoint, and a later `workbench adapt` with the same settings finds the
language expert done. A profile whose language expert is instruction SFT (`language_expert.sft`) runs that.

The same command runs under accelerate (DDP; on a machine without GPUs the processes form a CPU gloo group):
  accelerate launch --multi_gpu --num_processes 2 -m workbench pretrain --lang sw --base DIR
"""
from pathlib import Path

from workbench.cli.adapt_cmd import quiet_library_progress
from workbench.cli.common import add_config_arguments, add_run_dir_argument, run_dir_of
from workbench.config.loader import load_language
from workbench.outputs import check_apart
from workbench.pipelines.adapt import build_graph
from workbench.pipelines.processes import is_main_process


STAGE = "language_expert"


def add_arguments(parser):
    add_config_arguments(parser)
    add_run_dir_argument(parser)
    parser.add_argument("--fast", action="store_true", help="the profile's small variant (for tests)")
    parser.add_argument("--base", metavar="MODEL_DIR", help="a local Hugging Face model directory to use as the "
                        "base instead of the profile's (the same as --set 'base={path: MODEL_DIR}')")


def run(args):
    overrides = list(args.overrides)
    if args.base:
        overrides.append(("base", {"path": str(Path(args.base).resolve())}))
    loaded = load_language(args.lang, profile=args.profile, overrides=overrides, fast=args.fast)
    fetched = loaded.profile.language_expert.fetch
    if fetched is not None:
        raise loaded.where(f"{STAGE}.fetch").error(f"this profile fetches its language expert ({fetched.label()}); "
                                                   f"there is nothing to pretrain")
    run_dir = run_dir_of(args, loaded)
    check_apart({"run directory": run_dir}, loaded.local_inputs(), option="--run-dir")
    quiet_library_progress()
    records = build_graph(loaded, run_dir).execute(until=STAGE)
    if is_main_process():
        outputs = records[STAGE]["outputs"]
        s = outputs.get("summary") or {}
        ppl = (f"; held-out perplexity {s['initial_perplexity']:.2f} -> {s['final_perplexity']:.2f}"
               if "final_perplexity" in s else "")
        print(f"language expert ({loaded.language.code}, profile {loaded.profile_name}{ppl}): {outputs['model']}")
    return 0
