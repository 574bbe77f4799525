"""`workbench bench gpu`: the GPU check a contributor with an NVIDIA GPU runs, in one command.

Five parts, each reported on its own, then one summary against the GPU targets (docs/benchmarks.md):
1. tests: the kernel tests (tests/kernels of a checkout), compiled on CUDA: every Triton launch for real;
   and the merge engine's CUDA tests (tiny merges, copies overlapped and serial, against the CPU's bytes);
2. kernels: `bench kernels --device cuda`: the fused kernels against their references, torch.topk and the
   device-to-device copy bandwidth;
3. merges: every merge method on CPU and on CUDA (`bench merge --device cuda`): times and byte equality;
4. adapt: `workbench adapt --profile micro --fast` on CUDA, on a small generated Llama and a BPE
   tokenizer trained on the shipped text (no download), every stage including evaluation;
5. pretrain: CT tokens/s on the GPU of a generated model shaped like the micro base (SmolLM2-135M).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from workbench.config.loader import load_language, shipped_languages_dir
from workbench.pipelines.adapt import build_graph
from workbench.pipelines.bench.kernels import format_kernel_table, run_kernel_benchmark
from workbench.pipelines.bench.merge import format_table, run_merge_benchmark
from workbench.pipelines.bench.pretrain import pretrain_throughput
from workbench.pipelines.corpus import clean_text

PARTS = ("tests", "kernels", "merges", "adapt", "pretrain")
# Whole tiny merges on CUDA, copies overlapped and serial, against the CPU's bytes (skipped without CUDA).
CUDA_MERGE_TESTS = "workbench/test_merge_engine.py::test_cuda_merges_write_the_cpu_bytes"
# SmolLM2-135M-Instruct's shape (the micro profiles' base), with the generated tokenizer's vocabulary.
MICRO_BASE_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, tie_word_embeddings=True)
TARGETS = {"threshold_ms": 2.0, "threshold_vs_topk": 4.0, "merge_copy_share": 0.8, "lerp_copy_share": 0.9}
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def environment() -> dict:
    """The GPU, its driver, and the versions that decide what compiles."""
    import importlib.metadata as md

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "transformers", "peft", "accelerate"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    return env


def run_kernel_tests(tests_dir: Path, workers: int) -> dict:
    """pytest on the kernel tests, and the merge engine's CUDA tests, in a child process; counts of passed,
    failed, skipped."""
    if not (tests_dir / "kernels").is_dir():
        return {"not_run": f"{tests_dir / 'kernels'}: no kernel tests here (run from a checkout, or pass --tests)"}
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests_dir / "kernels")]
    if (tests_dir / CUDA_MERGE_TESTS.split("::")[0]).is_file():
        command.append(str(tests_dir / CUDA_MERGE_TESTS))
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=tests_dir.parent)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {word: 0 for word in ("passed", "failed", "skipped", "error", "errors")}
    for number, word in ((p.split()[0], p.split()[-1]) for p in tail.strip("= ").split(" in ")[0].split(", ")
                         if p.split() and p.split()[0].isdigit()):
        counts[word] = int(number)
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"returncode": done.returncode, "summary": tail, "passed": counts["passed"],
            "failed": counts["failed"] + counts["error"] + counts["errors"], "skipped": counts["skipped"],
            "failures": failures[:50], "seconds": round(time.perf_counter() - started, 1),
            "output_tail": (done.stdout + done.stderr)[-4000:] if done.returncode else ""}


def kernel_verdicts(results: dict) -> dict:
    """The kernel benchmark's figures against the targets, at its largest size."""
    n = max(results["sizes"])
    at = {(e["kernel"], e["implementation"]): e for e in results["entries"] if e["n"] == n}
    fused, topk = at[("thresholds", "fused")], at[("thresholds", "topk")]
    shares = {k: e.get("copy_share") for (k, impl), e in at.items() if impl == "fused"}
    slower = sorted(k for (k, impl), e in at.items()
                    if impl == "fused" and e["median_s"] > at[(k, "reference")]["median_s"])
    radix = at.get(("thresholds", "radix"))
    return {"n": n, "threshold_ms": fused["median_s"] * 1e3, "topk_ms": topk["median_s"] * 1e3,
            "radix_ms": radix["median_s"] * 1e3 if radix else None,
            "threshold_vs_topk": topk["median_s"] / fused["median_s"],
            "thresholds_equal_kthvalue": all(e.get("equals_kthvalue", True) for e in at.values()),
            "copy_share": shares, "fused_slower_than_reference": slower}


def _train_tokenizer(out_dir: Path, texts: list):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def generated_model(out_dir: Path, **shape) -> Path:
    """A randomly initialised Llama with a BPE tokenizer trained on the shipped sw and en text, saved as a
    model folder; `shape` overrides the small default (LlamaConfig keys)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    corpora = shipped_languages_dir() / "corpora"
    texts = [line for lang in ("sw", "en") for line in
             (corpora / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:2000]]
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _train_tokenizer(tmp, texts)
    config = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config.update(shape)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def tiny_language_file(work: Path, base_dir: Path) -> Path:
    """Swahili's language file with the micro profile's base replaced by `base_dir` and its paths absolute."""
    import yaml

    source = shipped_languages_dir() / "sw.yaml"
    raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    for spec in raw.get("sources", {}).values():
        if "path" in spec:
            spec["path"] = str((source.parent / spec["path"]).resolve())
    micro = raw["profiles"]["micro"]
    micro["eval"]["mgsm"]["path"] = str((source.parent / micro["eval"]["mgsm"]["path"]).resolve())
    micro["base"] = {"path": str(base_dir), "gguf": None, "package": None, "install": None, "provenance": None,
                     "license": "Apache-2.0", "description": "a generated Llama (random weights) for the GPU check"}
    raw["profiles"] = {"micro": micro}
    out = work / "sw-gpu-check.yaml"
    out.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out


def run_tiny_adapt(work: Path) -> dict:
    """`adapt --profile micro --fast` on the generated model, in this process (the graph `workbench adapt`
    executes), on CUDA: the peak CUDA memory it allocated shows that it ran there."""
    language = tiny_language_file(work, generated_model(work / "tiny-llama"))
    run_dir = work / "adapt-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    records = build_graph(load_language(str(language), profile="micro", fast=True), run_dir).execute()
    seconds = time.perf_counter() - started
    report = run_dir / "report.json"
    result = {"stages_run": len(records), "seconds": round(seconds, 1),
              "finished": "report" in records and report.is_file(),
              "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    if report.is_file():
        body = json.loads(report.read_text(encoding="utf-8"))
        result["stages"] = {name: s.get("seconds") for name, s in body["stages"].items()}
        result["recommended"] = body["verdict"].get("best")
    return result


def run_pretrain_throughput(work: Path, steps: int) -> dict:
    """CT tokens/s of a generated model of the micro base's shape, LoRA and full, on the shipped Swahili."""
    model = generated_model(work / "smollm2-shaped", **MICRO_BASE_SHAPE)
    lines = (shipped_languages_dir() / "corpora" / "sw.txt").read_text(encoding="utf-8").splitlines()
    texts = [d for d in map(clean_text, lines) if len(d) >= 20][:600]
    return {method: pretrain_throughput(model, texts, block_size=256, batch_size=8, steps=steps, method=method)
            for method in ("lora", "full")}


def _part(name: str, fn, progress) -> dict:
    progress(f"== {name}")
    started = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # one part's failure is that part's result; the others still run
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    result.setdefault("seconds", round(time.perf_counter() - started, 1))
    progress(f"== {name}: {json.dumps({k: v for k, v in result.items() if k not in ('traceback', 'output_tail')})[:2000]}")
    return result


def run_gpu_check(work: Path, *, tests_dir: Path, sizes=(200_000_000,), merge_size="270m", parts=PARTS,
                  workers=8, pretrain_steps=10, progress=print) -> dict:
    """Run the chosen parts; {"environment", part: result, "summary": [(target, measured, ok)]}."""
    work.mkdir(parents=True, exist_ok=True)
    results = {"environment": environment(), "parts": list(parts)}
    progress(json.dumps(results["environment"]))
    if "tests" in parts:
        results["tests"] = _part("tests", lambda: run_kernel_tests(tests_dir, workers), progress)
    if "kernels" in parts:
        def kernels():
            bench = run_kernel_benchmark("cuda", sizes, "bf16", repeats=5, warmup=2, progress=progress)
            progress(format_kernel_table(bench))
            return {"benchmark": bench, "verdicts": kernel_verdicts(bench)}
        results["kernels"] = _part("kernels", kernels, progress)
    if "merges" in parts:
        def merges():
            bench = run_merge_benchmark(work / "merge", size=merge_size, mergekit=False, device="cuda",
                                        progress=progress)
            progress(format_table(bench))
            return bench
        results["merges"] = _part("merges", merges, progress)
    if "adapt" in parts:
        results["adapt"] = _part("adapt", lambda: run_tiny_adapt(work), progress)
    if "pretrain" in parts:
        results["pretrain"] = _part("pretrain", lambda: run_pretrain_throughput(work, pretrain_steps), progress)
    results["summary"] = summary(results)
    return results


def summary(results: dict) -> list:
    """[(what, measured, ok)] for each target a part measured; ok None where a figure is reported only."""
    rows = []
    tests = results.get("tests")
    if tests and "error" not in tests and "not_run" not in tests:
        rows.append(("kernel tests compiled on CUDA: 0 failures", f"{tests['passed']} passed, {tests['failed']} "
                     f"failed, {tests['skipped']} skipped", tests["failed"] == 0 and tests["returncode"] == 0))
    kernels = results.get("kernels", {})
    if "verdicts" in kernels:
        v = kernels["verdicts"]
        rows.append((f"thresholds at {v['n']:,} <= {TARGETS['threshold_ms']} ms", f"{v['threshold_ms']:.3f} ms",
                     v["threshold_ms"] <= TARGETS["threshold_ms"]))
        rows.append((f"thresholds >= {TARGETS['threshold_vs_topk']}x faster than torch.topk",
                     f"{v['threshold_vs_topk']:.2f}x (topk {v['topk_ms']:.3f} ms)",
                     v["threshold_vs_topk"] >= TARGETS["threshold_vs_topk"]))
        if v.get("radix_ms") is not None:
            rows.append(("thresholds by the radix passes (the bracket's fallback)", f"{v['radix_ms']:.3f} ms",
                         None))
        rows.append(("thresholds equal torch.kthvalue bit for bit", str(v["thresholds_equal_kthvalue"]),
                     v["thresholds_equal_kthvalue"]))
        for kernel, share in sorted(v["copy_share"].items()):
            if share is None or kernel in ("thresholds", "ties_sv_merge"):
                continue
            target = TARGETS["lerp_copy_share"] if kernel == "lerp_" else TARGETS["merge_copy_share"]
            rows.append((f"{kernel} >= {target:.0%} of copy bandwidth", f"{share:.1%}", share >= target))
        rows.append(("no fused kernel slower than its PyTorch reference",
                     ", ".join(v["fused_slower_than_reference"]) or "none slower",
                     not v["fused_slower_than_reference"]))
    elif "error" in kernels:
        rows.append(("kernel benchmark", kernels["error"][:200], False))
    merges = results.get("merges", {})
    if "cases" in merges:
        for name, row in merges["cases"].items():
            cuda = row.get("workbench_cuda", {})
            rows.append((f"merge {name}: CUDA bytes equal CPU bytes", str(row.get("same_bytes_as_cpu")),
                         bool(row.get("same_bytes_as_cpu"))))
            if "seconds" in cuda:
                first = f" (first run, compiling: {cuda['first_seconds']:.2f} s)" if "first_seconds" in cuda else ""
                rows.append((f"merge {name}: CUDA not slower than CPU",
                             f"CUDA {cuda['seconds']:.2f} s{first}, CPU {row['workbench']['seconds']:.2f} s",
                             cuda["seconds"] <= row["workbench"]["seconds"]))
            serial = row.get("workbench_cuda_serial", {})
            if "seconds" in serial or "error" in serial:
                rows.append((f"merge {name}: CUDA with serial copies (WORKBENCH_CUDA_OVERLAP=0)",
                             f"{serial['seconds']:.2f} s" if "seconds" in serial else serial["error"][-200:],
                             False if "error" in serial else None))
    elif "error" in merges:
        rows.append(("merges on CPU and CUDA", merges["error"][:200], False))
    adapt = results.get("adapt")
    if adapt:
        rows.append(("adapt --fast finished on CUDA", f"{adapt.get('seconds')} s, peak CUDA "
                     f"{adapt.get('peak_cuda_gib')} GiB" if "error" not in adapt else adapt["error"][:200],
                     bool(adapt.get("finished"))))
    pretrain = results.get("pretrain")
    if pretrain:
        for method, r in pretrain.items() if "error" not in pretrain else []:
            if not isinstance(r, dict):     # the part's own "seconds"
                continue
            rows.append((f"CT tokens/s, 135M shape, {method}", f"{r['packed_tokens_per_second']:.0f} packed, "
                         f"{r['padded_tokens_per_second']:.0f} padded", None))
        if "error" in pretrain:
            rows.append(("CT throughput", pretrain["error"][:200], False))
    return rows


def format_summary(results: dict) -> str:
    env = results["environment"]
    lines = [f"GPU check: {env.get('gpu')} (driver {env.get('driver')}, CUDA {env.get('cuda')}), torch "
             f"{env['torch']}, Triton {env.get('triton')}, transformers {env.get('transformers')}"]
    for what, measured, ok in results["summary"]:
        mark = "    " if ok is None else ("ok  " if ok else "MISS")
        lines.append(f"  {mark} {what}: {measured}")
    missed = sum(1 for *_, ok in results["summary"] if ok is False)
    lines.append(f"{missed} target(s) missed" if missed else "every target met")
    return "\n".join(lines)
