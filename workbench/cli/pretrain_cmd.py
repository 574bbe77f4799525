"""Continual pretraining (CT) of the profile's base model on target-language text: the language expert.

Runs corpus -> tokenizer check (-> vocabulary extension) -> CT, each stage under the run directory keyed by
a hash of its inputs: a rerun skips finished stages and resumes training from its last checkpoint. A profile
whose language expert is instruction SFT (`language_expert.sft`) runs that instead.

The same command runs under accelerate (DDP; on a machine without GPUs the processes form a CPU gloo group):
  accelerate launch --multi_gpu --num_processes 2 -m workbench pretrain --lang sw --base DIR
"""
from pathlib import Path

from workbench.cli.common import add_config_arguments, load_config
from workbench.outputs import check_apart


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default="runs", metavar="D", help="where stage outputs go (default: runs/)")
    parser.add_argument("--fast", action="store_true", help="the profile's small variant (for tests)")
    parser.add_argument("--base", metavar="MODEL_DIR",
                        help="a local Hugging Face model directory to use as the base instead of the profile's")


def run(args):
    from workbench.pipelines.pretrain import resolve_base_model, run_language_expert
    from workbench.pipelines.training import expert_model_dir, is_main_process

    loaded = load_config(args, fast=args.fast)
    inputs = {**loaded.local_inputs(), **({"--base": args.base} if args.base else {})}
    check_apart({"run directory": Path(args.run_dir)}, inputs, option="--run-dir")
    base = resolve_base_model(loaded, args.run_dir, override=args.base)
    stage = run_language_expert(loaded, base, args.run_dir)
    if is_main_process():
        record = stage.record()
        ppl = ""
        if "final_perplexity" in record:
            ppl = f"; held-out perplexity {record['initial_perplexity']:.2f} -> {record['final_perplexity']:.2f}"
        print(f"language expert ({loaded.language.code}, profile {loaded.profile_name}{ppl}): "
              f"{expert_model_dir(stage)}")
    return 0
