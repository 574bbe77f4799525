"""Merge models by a recipe YAML (linear, task_arithmetic, ties, ties_sv, dare_ties, layer_swap), streaming
tensor by tensor through the fused kernels. Every input is checked for compatibility before anything is
written; an interrupted merge resumes when rerun; the output directory appears only when complete.

Recipe example (paths are relative to the recipe file):

  method: ties_sv
  base: models/base
  models:
    - {model: models/sw-ct, density: 0.3}
    - {model: models/math, density: 0.3, slack: 0.1}
"""

from workbench.errors import ConfigError
from workbench.merge.card import describe_entered
from workbench.merge.engine import load_recipe, resolve_paths, run_merge


def add_arguments(parser):
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory (must not exist)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="where the kernels run (default: the recipe's, else cuda when available)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="merge inputs holding NaN/Inf (non-finite deltas count as 0) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory (a model "
                        "folder an earlier run wrote; never one holding an input)")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="e.g. 500MB, 2GB (default 2GB)")


def parse_size(text: str) -> int:
    """Bytes in a size such as 500MB or 2GB: at least one byte, at most 1 PB."""
    import math

    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)]) * factor
            except ValueError:
                break
            if math.isfinite(value) and 1 <= value <= 1024**5:
                return int(value)
            break
    raise ConfigError(f"--max-shard-size {text!r}: expected a size of at least 1B such as 500MB or 2GB")


def run(args):
    max_shard_bytes = parse_size(args.max_shard_size)
    recipe, base_dir = load_recipe(args.recipe)
    models = resolve_paths(recipe, base_dir, source=args.recipe)
    result = run_merge(recipe, models, args.out, device=args.device, allow_nonfinite=args.allow_nonfinite,
                       overwrite=args.overwrite, max_shard_bytes=max_shard_bytes, source=args.recipe,
                       protected={"recipe": args.recipe}, card={"made_by": f"`workbench merge {args.recipe}`"})
    report = result.report
    print(f"merged ({report['method']}) {report['output']['tensors']} tensors in {result.seconds:.1f} s "
          f"on {report['device']}, {report['kernels']} -> {result.out_dir}")
    if "layer_swap" in report:
        print(f"  layer swap: {report['layer_swap']['description']}")
    for e in report["experts"]:
        print(f"  {e['model']}: {describe_entered(e)}")
    for note in report["notes"] + report["warnings"] + report["publication"]["license_flags"]:
        print(f"  note: {note}")
    print(f"  model card: {result.out_dir / 'README.md'}; details: {result.out_dir / 'merge_report.json'}")
    return 0
