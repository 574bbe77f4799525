"""Delta-magnitude profile of each expert against a base, per layer and module kind (docs/design.md §4.1): JSON
and a heatmap PNG (one panel per expert), plus the layer-swap blocks the `auto` rule would choose (the
largest blocks at each end where the language expert's relative change exceeds the task expert's).

Experts are named by their folder names, or as LABEL=DIR.
"""
from pathlib import Path

from workbench.analysis import analyze_models, write_analysis
from workbench.errors import ConfigError
from workbench.merge.layer_swap import plan_layer_swap
from workbench.merge.recipe import LayerSwap
from workbench.outputs import check_apart


def add_arguments(parser):
    parser.add_argument("base", metavar="BASE", help="base model directory")
    parser.add_argument("experts", nargs="+", metavar="EXPERT", help="expert model directories (or LABEL=DIR)")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--language", metavar="LABEL", help="the language expert (default: the first expert)")
    parser.add_argument("--task", metavar="LABEL", help="the task expert (default: the second expert)")
    parser.add_argument("--transition", type=int, default=1, metavar="Z", help="transition layers (default 1)")


def _labelled(items):
    experts = {}
    for item in items:
        label, _, path = item.partition("=") if "=" in item else (Path(item).name, "", item)
        if label in experts:
            raise ConfigError(f"two experts are labelled {label!r}; name them as LABEL=DIR")
        experts[label] = Path(path)
    return experts


def run(args):
    experts = _labelled(args.experts)
    check_apart({"analysis folder": Path(args.out)}, {"base": args.base, **experts})
    profiles = analyze_models(args.base, experts)
    suggestion = None
    labels = list(experts)
    language = args.language or labels[0]
    task = args.task or (labels[1] if len(labels) > 1 else None)
    for label in (language, task):
        if label is not None and label not in experts:
            raise ConfigError(f"--language/--task {label!r} is not one of the experts: {', '.join(labels)}")
    for label, p in profiles.items():
        layers = " ".join(f"{v:.3g}" for v in p["layer_relative_change"])
        print(f"{label}: total ‖δ‖/‖θ_b‖ {p['total']['relative_change']:.4g}; per layer: {layers}")
    if task is not None:
        plan = plan_layer_swap(LayerSwap(task=task, language=language, bottom="auto", top="auto",
                                         transition=args.transition), profiles[language]["num_layers"],
                               profiles[language]["layer_relative_change"], profiles[task]["layer_relative_change"])
        suggestion = {"language": language, "task": task, "bottom": plan.bottom, "top": plan.top,
                      "transition": plan.transition, "alphas": list(plan.alphas), "notes": list(plan.notes)}
        print(f"suggested layer swap (language {language}, task {task}): {plan.describe()}")
        for note in plan.notes:
            print(f"  note: {note}")
    files = write_analysis(profiles, args.out, suggestion)
    print(f"wrote {files['json']} and {files['heatmap']}")
    return 0
