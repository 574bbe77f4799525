"""Benchmarks a user can run and compare: `kernels`, `merge`, `pretrain`.
"""
from workbench.cli.common import NotBuiltError


def add_arguments(parser):
    parser.add_argument("what", choices=["kernels", "merge", "pretrain"])


def run(args):
    raise NotBuiltError("`workbench bench` is not built yet (issue: benchmarks)")
