"""The `workbench` command: one module per subcommand, each with `add_arguments(parser)` and `run(args)`.

Exit codes: 0 success, 2 bad usage or config, 1 runtime failure. Errors print as one line; `--debug`
shows the traceback.
"""
import argparse
import errno
import importlib
import sys

from workbench import __version__
from workbench.errors import WorkbenchError

# errno values that are the file system's verdict, not a bug (disk full, quota, read-only, permissions).
_IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}

COMMANDS = {
    "adapt": "run the whole pipeline for a language: corpus, CT, experts, merges, evaluation, report",
    "pretrain": "continual pretraining of the base on target-language text (the language expert)",
    "fetch": "fetch base models and task experts (hub id + revision, local path or GGUF)",
    "analyze": "per-layer delta magnitudes of experts against a base, heatmap and suggested swap blocks",
    "merge": "merge models by a recipe (linear, task arithmetic, TIES, TIES-SV, DARE-TIES, layer swap)",
    "eval": "evaluate models: target-language perplexity and MGSM-format accuracy, one table",
    "export": "export a model folder to GGUF (f16, bf16, q8_0) for llama.cpp and Ollama, with a Modelfile",
    "bench": "benchmarks: fused kernels, whole merges, pretraining throughput",
    "languages": "list the shipped languages and their profiles, or check a config file",
}


def _debug_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    return parent


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's module is imported and given its arguments (the
    others are listed with their summaries), so each command module may import what it needs at its top
    and `workbench --help` imports none of them."""
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Low-resource language adaptation: continual pretraining, task experts, and fused merges "
                    "(TIES-SV, layer swapping). Start with: workbench adapt --lang sw --profile micro",
        parents=[_debug_parent()])
    parser.add_argument("--version", action="version", version=f"workbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=summary)
            continue
        # The one deliberate dynamic import: the command's own module, chosen by argv.
        module = importlib.import_module(f"workbench.cli.{name}_cmd")
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_debug_parent()])
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def _quietly_collected(build, command):
    """`build(command)` (which imports the command's module: torch and the rest) with the cyclic garbage
    collector paused, then every object alive moved out of its reach (`gc.freeze`). Imports make long-lived
    objects, not garbage, yet each allocation burst sets off collections that walk all of them again: about
    0.19 s of a 2.4 s merge of a 271M model (3 full and 381 young collections, measured with gc.callbacks),
    the gap between a task-arithmetic merge and a third of mergekit's time."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        return build(command)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _command_in(argv) -> str:
    """The subcommand argv names (its first word that is not an option), or "" when it names none."""
    word = next((a for a in argv if not a.startswith("-")), "")
    return word if word in COMMANDS else ""


def main(argv=None) -> int:
    # As a program, the imports run with the collector paused; a caller's process (tests, notebooks) is
    # left as it is: frozen objects that later become cyclic garbage are never collected.
    if argv is None:
        argv = sys.argv[1:]
        parser = _quietly_collected(build_parser, _command_in(argv))
    else:
        argv = list(argv)
        parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)  # bad usage: argparse prints it and exits with 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    try:
        return int(args.run(args) or 0)
    except WorkbenchError as e:
        if debug:
            raise
        print(f"workbench {args.command}: error: {e}{_notes(e)}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `workbench languages | head`: the reader left; nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        print(f"\nworkbench {args.command}: interrupted; rerun the same command to resume{_notes(e)}",
              file=sys.stderr)
        return 130
    except OSError as e:  # the file system refused (full disk, read-only folder, ...): the path and the reason
        if debug or not (e.filename or e.errno in _IO_ERRNOS):
            if debug:
                raise
            return _internal(args.command, e)
        where = f"{e.filename}: " if e.filename else ""
        print(f"workbench {args.command}: error: {where}{e.strerror or e}{_notes(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        return _internal(args.command, e)


def _internal(command, e) -> int:
    print(f"workbench {command}: internal error: {type(e).__name__}: {e}{_notes(e)} "
          f"(rerun with --debug for the traceback)", file=sys.stderr)
    return 1


def _notes(e) -> str:
    """Notes a layer added on the way up (e.g. which `.partial` folder was kept), on the same line."""
    return "".join(f"; {note}" for note in getattr(e, "__notes__", ()))


if __name__ == "__main__":
    sys.exit(main())
