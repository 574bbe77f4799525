"""Delta-magnitude profile of each expert against a base, per layer and module kind (JSON and a
heatmap PNG), with the suggested layer-swap blocks.
"""
from workbench.cli.common import NotBuiltError


def add_arguments(parser):
    parser.add_argument("base", metavar="BASE", help="base model directory")
    parser.add_argument("experts", nargs="+", metavar="EXPERT", help="expert model directories")
    parser.add_argument("--out", required=True, metavar="DIR")


def run(args):
    raise NotBuiltError("`workbench analyze` is not built yet (issue: merge engine)")
