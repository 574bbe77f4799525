"""Fetch base models and task experts: hub id + revision (safetensors, JSON and tokenizer files only),
a local directory, or a GGUF file; each checked against the base.
"""
from workbench.cli.common import NotBuiltError, add_config_arguments


def add_arguments(parser):
    add_config_arguments(parser, required=False)
    parser.add_argument("--run-dir", default="runs", metavar="D")


def run(args):
    raise NotBuiltError("`workbench fetch` is not built yet (issue: task experts and evaluation)")
