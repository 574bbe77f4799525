"""Run the whole pipeline for a language: corpus -> tokenizer check -> continual pretraining (language
expert) -> task experts (SFT or fetch) -> delta analysis -> merges -> evaluation -> report.

Each stage writes under the run directory keyed by a hash of its inputs: a rerun skips finished stages
and resumes an interrupted one.
"""
from workbench.cli.common import NotBuiltError, add_config_arguments


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--run-dir", default="runs", metavar="D", help="where stage outputs go (default: runs/)")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun from this stage on")
    parser.add_argument("--only", metavar="STAGE", help="run only this stage")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; touch nothing, no network")
    parser.add_argument("--fast", action="store_true", help="the profile's small variant (for tests)")


def run(args):
    raise NotBuiltError("`workbench adapt` is not built yet (issue: the adapt pipeline)")
