"""Compile every Triton kernel for an sm_90 GPU without a GPU (Triton's offline compiler, down to cubin).

Run as a script in a process where TRITON_INTERPRET is unset (test_gpu_codegen.py does that): the
interpreter tests check what the kernels compute, this checks that real Triton accepts them.
Prints one line per compiled variant and exits non-zero on the first failure.
"""
import os
import sys
import time

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import importlib  # noqa: E402

# Modules by import_module: the package re-exports functions under some of the same names.
dare, delta_stats, layer_swap, masks, ties, topk_threshold = (
    importlib.import_module(f"workbench.kernels.{m}")
    for m in ("dare", "delta_stats", "layer_swap", "masks", "ties", "topk_threshold"))
from workbench.kernels.dispatch import LAUNCH_OPTIONS, triton_kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def variants():
    for dt in ("bf16", "fp16", "fp32"):
        yield delta_stats, "_delta_stats_kernel", {
            "base_ptr": f"*{dt}", "expert_ptr": f"*{dt}", "tile_start_ptr": "*i64", "tile_end_ptr": "*i64",
            "sums_ptr": "*fp32", "bad_ptr": "*i32"}, {"BLOCK": delta_stats.BLOCK}
        yield topk_threshold, "_high_histogram_kernel", {
            "base_ptr": f"*{dt}", "expert_ptr": f"*{dt}", "hist_ptr": "*i64", "n": "i64"}, {"BLOCK": 1024}
        yield topk_threshold, "_low_histogram_kernel", {
            "base_ptr": f"*{dt}", "expert_ptr": f"*{dt}", "buckets_ptr": "*i32", "hist_ptr": "*i64",
            "n": "i64"}, {"NUM_BUCKETS": 2, "BLOCK": 1024}
        yield layer_swap, "_lerp_kernel", {"buf_ptr": f"*{dt}", "other_ptr": f"*{dt}", "n": "i64",
                                           "c0": "fp32", "c1": "fp32"}, {"BLOCK": 1024}
        yield masks, "_masks_kernel", {"base_ptr": f"*{dt}", "expert_ptr": f"*{dt}", "keep_ptr": "*u8",
                                       "slack_ptr": "*u8", "n": "i64", "nbytes": "i64", "tau_hi": "fp32",
                                       "tau_lo": "fp32"}, {"BLOCK": masks.BLOCK}
        yield dare, "_dare_kernel", {"expert_ptr": f"*{dt}", "base_ptr": f"*{dt}", "keys_ptr": "*i64",
                                     "n": "i64", "threshold": "i32", "scale": "fp32"}, {"BLOCK": 1024}
        for method, slack, count, normalize in ((0, 1, 0, 1), (0, 0, 1, 0), (1, 0, 0, 1), (2, 0, 0, 1)):
            yield ties, "_ties_kernel", {
                "base_ptr": f"*{dt}", "experts": (f"*{dt}",) * 3, "params_ptr": "*fp32", "out_ptr": f"*{dt}",
                "counts_ptr": "*i32", "n": "i64", "lam": "fp32"}, {
                "T": 3, "METHOD": method, "COUNT_CONSENSUS": count, "NORMALIZE": normalize,
                "HAS_SLACK": slack, "HAS_BASE": int(method != 2), "BLOCK": ties.BLOCK}


def main():
    for module, name, signature, constexprs in variants():
        kernel = getattr(triton_kernels(vars(module), "cuda"), name)
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        start = time.time()
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=TARGET, options=dict(LAUNCH_OPTIONS))
        assert compiled.asm.get("cubin"), name
        print(f"ok {module.__name__.split('.')[-1]}.{name} {signature.get('base_ptr', signature.get('buf_ptr'))} "
              f"{constexprs} {time.time() - start:.2f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
