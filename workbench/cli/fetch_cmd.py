"""Fetch base models and task experts: hub id + revision (safetensors, JSON and tokenizer files only),
a local directory, or a GGUF file (converted once to a safetensors directory in the cache); each expert
is checked against the base. Prints where each model is, its size and the sha256 of its weight files, and
writes them to RUN_DIR/fetch.json.

  workbench fetch --lang sw --profile micro          the profile's base and fetched experts
  workbench fetch --model HuggingFaceTB/SmolLM2-135M@main --model ./my_expert --dry-run
"""
from pathlib import Path

from workbench.cli.common import add_allow_pickle_argument, add_config_arguments, load_config
from workbench.errors import ConfigError
from workbench.outputs import check_apart
from workbench.pipelines.fetch import allow_pickles, fetch_model, fetch_profile, parse_model_arg, plan, update_manifest


def add_arguments(parser):
    add_config_arguments(parser, required=False)
    parser.add_argument("--model", action="append", default=[], metavar="SOURCE",
                        help="a model directory, FILE.gguf, PACKAGE:FILE.gguf, OWNER/NAME or OWNER/NAME@REVISION "
                             "(repeatable; instead of --lang)")
    parser.add_argument("--run-dir", metavar="D", help="where fetch.json goes (default with --lang: runs/)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched; no network, no writes")
    add_allow_pickle_argument(parser)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _print_plan(plan: dict):
    for role, step in plan.items():
        print(f"{role}: {step['source']}")
        if step["kind"] == "hub":
            state = f"cached at {step['cached']}" if step["cached"] else f"would download into {step['cache']}"
            print(f"  hub {step['id']}@{step['revision']}: {state}")
            print(f"  files allowed: {', '.join(step['patterns'])}")
        elif step["kind"] == "gguf":
            state = "converted already" if step["cached"] else "would convert (about 20-40 s for SmolLM2)"
            print(f"  GGUF {step['gguf']}\n  -> {step['converted']} ({state})")
        else:
            print(f"  local directory {step['path']}" + ("" if step["exists"] else " (MISSING)"))
            if step.get("converted"):
                state = "converted already" if step["cached"] else "would convert with torch.load(weights_only=True)"
                print(f"  pickled weights -> {step['converted']} ({state})")
        if step.get("allow_pickle"):
            print("  pickled weights (pytorch_model*.bin) allowed if it has no safetensors: read with "
                  "torch.load(weights_only=True), converted once to safetensors")


def _print_models(manifest: dict, roles: dict):
    for role, label in roles.items():
        record = manifest["models"][label]
        print(f"{role}: {label}")
        print(f"  {record['path']}  ({_size(record['bytes'])})")
        if "revision" in record:
            print(f"  commit {record['revision']}")
        if "gguf_sha256" in record:
            print(f"  from {record['gguf']}  sha256 {record['gguf_sha256']}")
        for name, f in record.get("pickle", {}).items():
            print(f"  converted from {name}  {_size(f['bytes'])}  sha256 {f['sha256']}")
        for name, f in record["files"].items():
            print(f"  {name}  {_size(f['bytes'])}  sha256 {f['sha256']}")


def run(args):
    if bool(args.lang) == bool(args.model):
        raise ConfigError("expected either --lang (with --profile) or one or more --model SOURCE")
    if args.lang:
        loaded = load_config(args)
        if args.allow_pickle:
            allow_pickles(loaded.profile)
        run_dir = Path(args.run_dir or "runs")
        if not args.dry_run:
            check_apart({"run directory": run_dir}, loaded.local_inputs(), option="--run-dir")
        result = fetch_profile(loaded, run_dir, dry_run=args.dry_run)
        if args.dry_run:
            _print_plan(result["plan"])
            return 0
        _print_models(result, result["roles"])
        if result.get("compatibility"):
            compat = result["compatibility"]
            print(f"compatible with {compat['reference']}: {', '.join(compat['checked'][1:])}")
            for warning in compat["warnings"]:
                print(f"  warning: {warning}")
        print(f"manifest: {run_dir / 'fetch.json'}")
        return 0
    sources = {text: parse_model_arg(text) for text in args.model}
    for source in sources.values():
        if args.allow_pickle and source.gguf is None:
            source.allow_pickle = "weights_only"
    if args.dry_run:
        _print_plan({text: {"source": src.label(), **plan(src, Path.cwd())} for text, src in sources.items()})
        return 0
    if args.run_dir:
        local = {text: Path(src.path or src.gguf) for text, src in sources.items() if src.path or
                 (src.gguf and not src.package)}
        check_apart({"run directory": Path(args.run_dir)}, local, option="--run-dir")
    records = {src.label(): fetch_model(src, base_dir=Path.cwd()) for src in sources.values()}
    if args.run_dir:
        update_manifest(args.run_dir, models=records)
    _print_models({"models": records}, {text: src.label() for text, src in sources.items()})
    if args.run_dir:
        print(f"manifest: {Path(args.run_dir) / 'fetch.json'}")
    return 0
