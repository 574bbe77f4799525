"""Kernel benchmark: each fused kernel of `workbench.kernels` against its plain-PyTorch reference and, for the
top-k thresholds, the usual alternatives on a materialized |δ| (torch.kthvalue, torch.topk, and the
torch.argsort mergekit uses). `workbench bench kernels` calls `run_kernel_benchmark`.

Inputs per size: one base tensor and two experts of it, δ ~ N(0, 0.01²) and N(0, 0.02²), generated on the
CPU from a fixed seed (the same bits on every device). The fused kernels run through the normal dispatcher
(Triton on CUDA, the chunked CPU path on CPU). The alternatives get |δ| already materialized in fp32; its
cost is not counted, while the fused kernels recompute |δ| from base and expert in every pass.

Bytes are what the operation must read and write in the storage dtype, the same figure for every
implementation of a kernel, so GB/s is an effective bandwidth that compares implementations directly.
"""
import importlib.metadata
import os
import platform
import statistics
import time

import torch

from workbench.kernels import cpu_native
from workbench.kernels.delta_stats import delta_stats
from workbench.kernels.dispatch import kernel_backend
from workbench.kernels.layer_swap import lerp_
from workbench.kernels.ties import ties_merge
from workbench.kernels.radix_passes import CPU_DIGITS
from workbench.kernels.topk_threshold import keep_count, topk_select, topk_thresholds
from workbench.kernels.delta_stats import delta_stats_reference
from workbench.kernels.layer_swap import lerp_reference
from workbench.kernels.ties import ties_merge_reference
from workbench.kernels.topk_threshold import topk_select_reference, topk_thresholds_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FRACTIONS = (0.2, 0.1)          # density k and slack s: the two selections of TIES-SV
EXPERT_STDS = (0.01, 0.02)      # δ of the two experts
LERP_ALPHA = 0.5


def benchmark_inputs(n: int, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """(base, [expert_1, expert_2]) of n elements: base ~ N(0, 1), expert_t = base + N(0, EXPERT_STDS[t]²),
    generated on the CPU (the same bits on every device)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen).to(dtype)
    experts = [(base.float() + torch.randn(n, generator=gen) * s).to(dtype).to(device) for s in EXPERT_STDS]
    return base.to(device), experts


def ties_sv_merge(base, experts, out, select=topk_select, merge=ties_merge):
    """A whole TIES-SV merge of one tensor (k = 0.2, s = 0.1): each expert's two selections, then the merge."""
    sels = [select(base, e, FRACTIONS) for e in experts]
    return merge(base, experts, keep=[s[0] for s in sels], protect=[s[1] for s in sels], out=out)


def threshold_passes(base) -> int:
    """Passes over base + expert the fused selection makes on this tensor's backend: the sampled bracket's one
    on Triton (when its sample holds; the radix fallback makes 4), the 2 radix passes of the CPU path."""
    return 1 if kernel_backend(base, native=True) == "triton" else len(CPU_DIGITS)


def _cases(base, experts, absdelta):
    """[(kernel, implementation, callable, bytes)]: fused first within each kernel."""
    n, size = base.numel(), base.element_size()
    e1 = experts[0]
    ranks = [keep_count(f, n) for f in FRACTIONS]
    picks = [k - 1 for k in ranks]
    out, buf = torch.empty_like(base), base.clone()
    sels = [topk_select(base, e, FRACTIONS) for e in experts]    # given to the merge-only case
    keep, protect = [s[0] for s in sels], [s[1] for s in sels]
    stats_bytes = 2 * n * size                                    # reads base and expert
    threshold_bytes = threshold_passes(base) * 2 * n * size       # each pass reads base and expert
    merge_bytes = (len(experts) + 2) * n * size                   # reads base and T experts, writes one
    return [
        ("delta_stats", "fused", lambda: delta_stats([(base, e1)]), stats_bytes),
        ("delta_stats", "reference", lambda: delta_stats_reference([(base, e1)]), stats_bytes),
        ("thresholds", "fused", lambda: topk_thresholds(base, e1, FRACTIONS), threshold_bytes),
        *([("thresholds", "radix",               # the Triton fallback, timed beside the bracket
            lambda: [s.tau for s in topk_select(base, e1, FRACTIONS, algorithm="radix")], threshold_bytes)]
          if kernel_backend(base, native=True) == "triton" else []),
        ("thresholds", "reference", lambda: topk_thresholds_reference(base, e1, FRACTIONS), threshold_bytes),
        ("thresholds", "kthvalue", lambda: [torch.kthvalue(absdelta, n - k + 1).values.item() for k in ranks],
         threshold_bytes),
        ("thresholds", "topk", lambda: torch.topk(absdelta, max(ranks)).values[picks].tolist(), threshold_bytes),
        ("thresholds", "argsort", lambda: absdelta[torch.argsort(absdelta, descending=True)[picks]].tolist(),
         threshold_bytes),
        ("ties_merge", "fused", lambda: ties_merge(base, experts, keep=keep, protect=protect, out=out), merge_bytes),
        ("ties_merge", "reference",
         lambda: ties_merge_reference(base, experts, keep=keep, protect=protect, out=out), merge_bytes),
        ("ties_sv_merge", "fused", lambda: ties_sv_merge(base, experts, out),
         len(experts) * threshold_bytes + merge_bytes),
        ("ties_sv_merge", "reference",
         lambda: ties_sv_merge(base, experts, out, topk_select_reference, ties_merge_reference),
         len(experts) * threshold_bytes + merge_bytes),
        ("lerp_", "fused", lambda: lerp_(buf, e1, LERP_ALPHA), 3 * n * size),          # reads 2, writes 1
        ("lerp_", "reference", lambda: lerp_reference(buf, e1, LERP_ALPHA), 3 * n * size),
    ]


def _backend(kernel: str, base) -> str:
    """What the fused implementation of `kernel` runs on (the ones with a C kernel, and the others)."""
    return kernel_backend(base, native=kernel in ("thresholds", "ties_merge", "ties_sv_merge"))


def _timed(fn, cuda: bool, repeats: int, warmup: int):
    """(seconds of each of `repeats` calls after `warmup` untimed ones, the last call's result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    seconds = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            result = fn()
            seconds.append(time.perf_counter() - started)
    return seconds, result


def _summary(seconds, nbytes) -> dict:
    median = statistics.median(seconds)
    return {"median_s": median, "min_s": min(seconds), "max_s": max(seconds), "bytes": nbytes,
            "gb_per_s": nbytes / median / 1e9 if median > 0 else float("inf")}


def _copy_bandwidth(base, cuda: bool, repeats: int, warmup: int) -> dict:
    """Device-to-device copy of a tensor like `base`: the bandwidth ceiling the kernels are measured against."""
    dst = torch.empty_like(base)
    seconds, _ = _timed(lambda: dst.copy_(base), cuda, repeats, warmup)
    return _summary(seconds, 2 * base.numel() * base.element_size())


def _size_entries(n, dtype, device, repeats, warmup, progress) -> tuple[list, dict | None]:
    """The entries of one size, and the copy bandwidth on CUDA (None on CPU)."""
    cuda = device.type == "cuda"
    base, experts = benchmark_inputs(n, dtype, device)
    absdelta = (experts[0].float() - base.float()).abs()
    copy = _copy_bandwidth(base, cuda, repeats, warmup) if cuda else None
    entries, fused, kth = [], {}, None
    for kernel, impl, fn, nbytes in _cases(base, experts, absdelta):
        seconds, result = _timed(fn, cuda, repeats, warmup)
        entry = {"n": n, "kernel": kernel, "implementation": impl,
                 "backend": _backend(kernel, base) if impl in ("fused", "radix") else "torch",
                 **_summary(seconds, nbytes)}
        fused.setdefault(kernel, entry["median_s"])
        entry["vs_fused"] = entry["median_s"] / fused[kernel] if fused[kernel] > 0 else float("nan")
        if copy is not None:
            entry["copy_share"] = entry["gb_per_s"] / copy["gb_per_s"]
        if kernel == "thresholds":
            entry["thresholds"] = [float(t) for t in result]
            kth = entry["thresholds"] if impl == "kthvalue" else kth
        entries.append(entry)
        progress(f"n={n} {kernel} {impl}: median {entry['median_s']:.4g} s, {entry['gb_per_s']:.2f} GB/s")
    for entry in entries:
        if "thresholds" in entry:
            entry["equals_kthvalue"] = entry["thresholds"] == kth
    return entries, copy


def _environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        env["triton"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = _cpu_name()
        env["cpu_kernels"] = cpu_native.why()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_kernel_benchmark(device="cpu", sizes=(50_000_000,), dtype="bf16", repeats=5, warmup=1,
                         progress=print) -> dict:
    """Time every fused kernel, its reference and the threshold alternatives at each size; a JSON-ready dict.

    dtype: "bf16", "fp16" or "fp32" (the storage dtype of base and experts). repeats: timed calls per
    implementation (median, min, max reported), after `warmup` untimed calls.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    device = torch.device(device)
    results = {**_environment(device), "dtype": dtype, "repeats": repeats, "warmup": warmup,
               "fractions": list(FRACTIONS), "sizes": [int(n) for n in sizes], "entries": [], "copy": []}
    if device.type == "cpu":
        results["loadavg_before"] = list(os.getloadavg())
    for n in sizes:
        entries, copy = _size_entries(int(n), DTYPES[dtype], device, repeats, warmup, progress)
        results["entries"] += entries
        if copy is not None:
            results["copy"].append({"n": int(n), **copy})
            torch.cuda.empty_cache()  # this size's tensors are gone: the next size starts from free memory
    if device.type == "cpu":
        results["loadavg_after"] = list(os.getloadavg())
    return results


def format_kernel_table(results: dict) -> str:
    """One row per (size, kernel, implementation): median s, spread, GB/s, share of copy bandwidth, ratio."""
    cuda = bool(results.get("copy"))
    head = (f"kernel benchmark: {results['dtype']} on {results['device']} ({results['device_name']}, "
            f"{results['threads']} threads), torch {results['torch']}, median of {results['repeats']}")
    if results.get("cpu_kernels"):
        head += f"; fused = {results['cpu_kernels']}"
    if "loadavg_before" in results:
        head += (f"; load average {results['loadavg_before'][0]:.2f} before, "
                 f"{results['loadavg_after'][0]:.2f} after")
    lines = [head, f"{'n':>11} {'kernel':<14} {'impl':<10} {'median s':>10} {'spread':>7} {'GB/s':>8} "
                   + (f"{'% copy':>7} " if cuda else "") + f"{'x fused':>8}  check"]
    copies = {c["n"]: c for c in results.get("copy", [])}
    for e in results["entries"]:
        spread = (e["max_s"] - e["min_s"]) / e["median_s"] if e["median_s"] > 0 else 0.0
        check = ""
        if "equals_kthvalue" in e:
            check = "= kthvalue" if e["equals_kthvalue"] else "DIFFERS from kthvalue"
        share = f"{e['copy_share']:>7.1%} " if cuda else ""
        lines.append(f"{e['n']:>11,} {e['kernel']:<14} {e['implementation']:<10} {e['median_s']:>10.4g} "
                     f"{spread:>7.1%} {e['gb_per_s']:>8.2f} {share}{e['vs_fused']:>8.2f}  {check}".rstrip())
    for n, c in copies.items():
        lines.append(f"copy bandwidth at n={n:,}: {c['gb_per_s']:.1f} GB/s (dst.copy_(src), read + write)")
    lines.append("spread = (max - min) / median; x fused = median / fused median; GB/s = bytes the operation "
                 "must move / median")
    busy = results.get("loadavg_before", [0])[0]  # before the benchmark's own threads raised it
    if busy > 0.5 * (results.get("cpu_count") or 1):
        # The CPU path's small OpenMP regions wait for descheduled threads when other processes hold the
        # cores; OMP_WAIT_POLICY=PASSIVE cures that but slows an idle machine, so it is not the default
        # (docs/benchmarks.md, "OpenMP waiting", has the figures).
        lines.append(f"note: the machine was busy before the run (load {busy:.1f} on {results['cpu_count']} cores): "
                     f"figures taken while other processes share the cores are not comparable; rerun on an idle "
                     f"machine (on a machine that stays shared, OMP_WAIT_POLICY=PASSIVE is faster)")
    return "\n".join(lines)
