"""Arguments shared by the config-driven commands (--lang, --profile, --set, --run-dir)."""
from pathlib import Path

from workbench.config.loader import load_language


def add_config_arguments(parser, *, required=True):
    parser.add_argument("--lang", required=required, metavar="LANG|FILE.yaml",
                        help="a shipped language code (see `workbench languages`) or your own YAML file")
    parser.add_argument("--profile", metavar="P", help="profile in the language config (default: micro, "
                        "else the first one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, relative to the profile (pretrain.max_steps=10) or from the top "
                             "(profiles.micro.eval.batch_size=4); repeatable")


def load_config(args, *, fast=False):
    return load_language(args.lang, profile=args.profile, overrides=args.overrides, fast=fast)


def add_run_dir_argument(parser):
    parser.add_argument("--run-dir", metavar="D", help="run directory (default: runs/<lang>-<profile>[-fast]; "
                        "`adapt` and `pretrain` share it, so a language expert pretrained there is reused)")


def run_dir_of(args, loaded) -> Path:
    """--run-dir, or runs/<lang>-<profile>[-fast] under the working directory."""
    if args.run_dir:
        return Path(args.run_dir)
    return Path("runs") / (f"{loaded.language.code}-{loaded.profile_name}" + ("-fast" if args.fast else ""))


def add_allow_pickle_argument(parser):
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept models released only as pickled *.bin weights: read with "
                             "torch.load(weights_only=True) (tensors only, never code) and converted once to "
                             "safetensors; the profile key allow_pickle: weights_only does it per model")
