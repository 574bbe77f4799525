"""CPU benchmarks of the merge kernels (pytest-benchmark; skipped in the normal run by --benchmark-skip).

    python -m pytest tests/benchmarks/test_kernels_bench.py --benchmark-only -q

One bf16 tensor of WORKBENCH_BENCH_N elements (default 50M) and two experts of it (δ ~ N(0, 0.01²) and
N(0, 0.02²)); WORKBENCH_BENCH_N=1000000 gives a quick run. Targets (issue 3): exact threshold selection
no slower than torch.kthvalue; a whole TIES-SV merge (thresholds included) of the tensor within 3 s.
The baselines (argsort, topk, kthvalue) get |δ| already materialized in fp32 (its 0.1–0.2 s is not
counted); the kernels recompute |δ| from base and expert in every pass.
"""
import functools
import os

import pytest
import torch

from workbench.pipelines.bench.kernels import FRACTIONS, benchmark_inputs, ties_sv_merge
from workbench.kernels.delta_stats import delta_stats
from workbench.kernels.layer_swap import lerp_
from workbench.kernels.ties import ties_merge
from workbench.kernels.topk_threshold import keep_count, topk_select, topk_thresholds

N = int(os.environ.get("WORKBENCH_BENCH_N", 50_000_000))


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WORKBENCH_KERNELS", "cpu")


@functools.cache
def tensors():
    """(base, expert_1, expert_2, |δ_1| materialized), built once, only when a benchmark runs; the inputs of
    `workbench bench kernels`."""
    base, experts = benchmark_inputs(N, torch.bfloat16)
    absdelta = (experts[0].float() - base.float()).abs()
    return base, experts[0], experts[1], absdelta


def ranks():
    return [keep_count(f, N) for f in FRACTIONS]


def run(benchmark, fn, rounds):
    """Rounds of one call each, after a warm-up; the 1-minute load average is recorded beside the figures
    (the benchmark machine may be shared: figures taken under load > 2.5 on 2 cores are not comparable)."""
    benchmark.extra_info["loadavg_before"] = os.getloadavg()[0]
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if rounds > 1 else 0)
    benchmark.extra_info["loadavg_after"] = os.getloadavg()[0]
    return result


def test_threshold_exact_radix_select(benchmark):
    base, expert, _, absdelta = tensors()
    got = run(benchmark, lambda: topk_thresholds(base, expert, FRACTIONS), rounds=5)
    assert got == [torch.kthvalue(absdelta, N - k + 1).values.item() for k in ranks()]


def test_threshold_baseline_kthvalue(benchmark):
    absdelta = tensors()[3]
    run(benchmark, lambda: [torch.kthvalue(absdelta, N - k + 1).values.item() for k in ranks()], rounds=3)


def test_threshold_baseline_topk(benchmark):
    absdelta = tensors()[3]
    k_max = max(ranks())
    run(benchmark, lambda: torch.topk(absdelta, k_max).values[[k - 1 for k in ranks()]], rounds=2)


def test_threshold_baseline_argsort(benchmark):
    absdelta = tensors()[3]
    run(benchmark, lambda: absdelta[torch.argsort(absdelta, descending=True)[[k - 1 for k in ranks()]]], rounds=1)


def test_ties_sv_merge_with_thresholds(benchmark):
    base, e1, e2, _ = tensors()
    out = torch.empty_like(base)
    _, counts = run(benchmark, lambda: ties_sv_merge(base, [e1, e2], out), rounds=3)
    assert sum(counts.protected) > 0


def test_ties_sv_merge_only(benchmark):
    base, e1, e2, _ = tensors()
    sels = [topk_select(base, e, FRACTIONS) for e in (e1, e2)]
    out = torch.empty_like(base)
    run(benchmark, lambda: ties_merge(base, [e1, e2], keep=[s[0] for s in sels], protect=[s[1] for s in sels],
                                      out=out), rounds=3)


def test_delta_stats(benchmark):
    base, expert, _, _ = tensors()
    [stats] = run(benchmark, lambda: delta_stats([(base, expert)]), rounds=5)
    assert stats.numel == N and stats.nonfinite == 0


def test_lerp(benchmark):
    base, expert, _, _ = tensors()
    buf = base.clone()
    run(benchmark, lambda: lerp_(buf, expert, 0.5), rounds=5)
