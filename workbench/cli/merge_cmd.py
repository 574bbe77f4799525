"""Merge models by a recipe YAML (linear, task_arithmetic, ties, ties_sv, dare_ties, layer_swap), streaming
tensor by tensor through the fused kernels; resumable; the output appears only when complete.
"""
from workbench.cli.common import NotBuiltError


def add_arguments(parser):
    parser.add_argument("recipe", metavar="RECIPE.yaml")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)


def run(args):
    raise NotBuiltError("`workbench merge` is not built yet (issue: merge engine)")
