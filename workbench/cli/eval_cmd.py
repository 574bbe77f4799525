"""Evaluate model directories: target-language perplexity and MGSM-format accuracy, one table
(Markdown, JSON) and a bar chart.
"""
from workbench.cli.common import NotBuiltError, add_config_arguments


def add_arguments(parser):
    parser.add_argument("models", nargs="+", metavar="MODEL")
    add_config_arguments(parser, required=False)
    parser.add_argument("--out", required=True, metavar="DIR")


def run(args):
    raise NotBuiltError("`workbench eval` is not built yet (issue: task experts and evaluation)")
