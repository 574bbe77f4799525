"""Launch-shape sweep of the Triton kernels on a GPU: elements per loop step (BLOCK) and warps per program.

Run on a machine with an NVIDIA GPU, from a checkout (not collected by pytest):

    python -P tests/benchmarks/gpu_variants.py --n 200M --json variants.json

Each variant runs the public function the merge calls (topk_thresholds, whose sampled bracket is swept and
whose radix fallback is timed once; delta_stats; ties_merge) with the module's BLOCK and the launch's
num_warps set for the run, checks that its result equals the default shape's (thresholds: torch.kthvalue's,
bit for bit), and is timed with CUDA events (median of 20 after 3 warm-ups) at the
given size, next to torch.topk on a materialized |δ| and a device-to-device copy. The table it prints is
how the defaults in kernels/ were chosen (docs/benchmarks.md).
"""
import argparse
import json
import statistics
import sys
import time

import torch

from workbench.kernels import delta_stats as delta_stats_module
from workbench.kernels import bracket_select, dispatch, radix_passes
from workbench.kernels.delta_stats import delta_stats
from workbench.kernels.ties import ties_merge
from workbench.kernels.topk_threshold import keep_count, topk_select, topk_thresholds

FRACTIONS = [0.2, 0.1]


def timed(fn, repeats=20, warmup=3) -> float:
    if not torch.cuda.is_available():   # a dry run of the script on a CPU machine: its flow, not its figures
        repeats, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if not torch.cuda.is_available():
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def with_shape(module, block, warps, fn):
    """fn() with `module.BLOCK = block` and num_warps = warps for every launch; both restored after."""
    old_block, old_options = module.BLOCK, dict(dispatch.LAUNCH_OPTIONS)
    module.BLOCK = block
    dispatch.LAUNCH_OPTIONS["num_warps"] = warps
    try:
        return fn()
    finally:
        module.BLOCK = old_block
        dispatch.LAUNCH_OPTIONS.clear()
        dispatch.LAUNCH_OPTIONS.update(old_options)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="200M")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    n = int(float(args.n.rstrip("M")) * 1e6) if args.n.endswith("M") else int(args.n)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    base = torch.randn(n, device=device, generator=gen).bfloat16()
    experts = [(base.float() + 2e-3 * torch.randn(n, device=device, generator=gen)).bfloat16() for _ in range(2)]
    absdelta = (experts[0].float() - base.float()).abs()
    ranks = [keep_count(f, n) for f in FRACTIONS]
    rows = []
    copy_dst = torch.empty_like(base)
    copy_s = timed(lambda: copy_dst.copy_(base))
    copy_gbs = 2 * n * 2 / copy_s / 1e9
    topk_s = timed(lambda: torch.topk(absdelta, max(ranks)).values[[k - 1 for k in ranks]].tolist())
    rows.append({"kernel": "copy", "seconds": copy_s, "gb_per_s": copy_gbs})
    rows.append({"kernel": "torch.topk", "seconds": topk_s})
    print(f"n={n:,} bf16; copy {copy_s * 1e3:.3f} ms ({copy_gbs:.0f} GB/s); torch.topk {topk_s * 1e3:.3f} ms",
          flush=True)

    want = [torch.kthvalue(absdelta, n - k + 1).values.item() for k in ranks]
    def radix():
        return [s.tau for s in topk_select(base, experts[0], FRACTIONS, algorithm="radix")]

    radix_s = timed(radix)
    rows.append({"kernel": "thresholds radix", "block": radix_passes.BLOCK, "seconds": radix_s,
                 "equal": radix() == want, "vs_topk": topk_s / radix_s})
    print(json.dumps(rows[-1]), flush=True)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            def run():
                got = topk_thresholds(base, experts[0], FRACTIONS)
                return got, timed(lambda: topk_thresholds(base, experts[0], FRACTIONS))
            try:
                got, s = with_shape(bracket_select, block, warps, run)
                row = {"kernel": "thresholds", "block": block, "warps": warps, "seconds": s,
                       "equal": got == want, "vs_topk": topk_s / s, "gb_per_s": 2 * n * 2 / s / 1e9}
            except Exception as e:  # a shape that does not compile is a result of the sweep
                row = {"kernel": "thresholds", "block": block, "warps": warps, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)

    pairs = [(base, experts[0])]
    want_stats = delta_stats(pairs)[0]
    for block in (1024, 2048, 4096):
        for warps in (4, 8):
            def run():
                got = delta_stats(pairs)[0]
                return got, timed(lambda: delta_stats(pairs))
            try:
                got, s = with_shape(delta_stats_module, block, warps, run)
                close = abs(got.sum_sq - want_stats.sum_sq) <= 1e-5 * want_stats.sum_sq and got.max_abs == want_stats.max_abs
                row = {"kernel": "delta_stats", "block": block, "warps": warps, "seconds": s, "equal": close,
                       "copy_share": (2 * n * 2 / s / 1e9) / copy_gbs}
            except Exception as e:
                row = {"kernel": "delta_stats", "block": block, "warps": warps, "error": f"{type(e).__name__}: {e}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)

    sels = [topk_select(base, e, FRACTIONS) for e in experts]
    keep, protect = [s[0] for s in sels], [s[1] for s in sels]
    out = torch.empty_like(base)
    from workbench.kernels import ties as ties_module
    ties_merge(base, experts, keep=keep, protect=protect, out=out)
    want_out = out.clone()
    for warps in (2, 4, 8, 16):
        def run():
            ties_merge(base, experts, keep=keep, protect=protect, out=out)
            same = torch.equal(out, want_out)
            return same, timed(lambda: ties_merge(base, experts, keep=keep, protect=protect, out=out))
        try:
            same, s = with_shape(ties_module, ties_module.BLOCK, warps, run)
            row = {"kernel": "ties_merge", "block": ties_module.BLOCK, "warps": warps, "seconds": s, "equal": same,
                   "copy_share": (4 * n * 2 / s / 1e9) / copy_gbs}
        except Exception as e:
            row = {"kernel": "ties_merge", "warps": warps, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'kernel':<12} {'BLOCK':>6} {'warps':>5} {'ms':>8} {'check':>6} {'note'}")
    for r in rows:
        if r["kernel"] in ("copy", "torch.topk"):
            continue
        note = r.get("error") or (f"{r['vs_topk']:.2f}x topk" if "vs_topk" in r else f"{r['copy_share']:.1%} of copy")
        ms = f"{r['seconds'] * 1e3:8.3f}" if "seconds" in r else f"{'-':>8}"
        print(f"{r['kernel']:<12} {r.get('block', ''):>6} {r.get('warps', ''):>5} {ms} {str(r.get('equal', '')):>6} {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
