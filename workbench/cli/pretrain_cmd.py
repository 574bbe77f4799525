"""Continual pretraining (CT) of the profile's base model on target-language text: the language expert.
"""
from workbench.cli.common import NotBuiltError, add_config_arguments


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default="runs", metavar="D")
    parser.add_argument("--fast", action="store_true", help="the profile's small variant (for tests)")


def run(args):
    raise NotBuiltError("`workbench pretrain` is not built yet (issue: corpus, tokenizer check and continual pretraining)")
