"""Whole-merge benchmark (pytest-benchmark; skipped in the normal run by --benchmark-skip): a generated
~270M-parameter bf16 Llama and two experts merged by workbench and, when `mergekit-yaml` is found, by mergekit,
each as its own process. The same code as `workbench bench merge`.

    python -m pytest tests/benchmarks/test_merge_bench.py --benchmark-only -q -s

WORKBENCH_BENCH_MERGE_SIZE=tiny gives a quick run. The figures (and mergekit's error, if it failed on a
case) go into the benchmark's extra_info.
"""
import os

from workbench.pipelines.bench.merge import CASE_NAMES, format_table, run_merge_benchmark

SIZE = os.environ.get("WORKBENCH_BENCH_MERGE_SIZE", "270m")


def test_merge_benchmark(benchmark, tmp_path):
    benchmark.extra_info["loadavg_before"] = os.getloadavg()[0]
    results = benchmark.pedantic(run_merge_benchmark, args=(tmp_path,), kwargs=dict(size=SIZE),
                                 rounds=1, iterations=1)
    benchmark.extra_info["loadavg_after"] = os.getloadavg()[0]
    benchmark.extra_info.update(results)
    print("\n" + format_table(results))
    assert set(results["cases"]) == set(CASE_NAMES)
    for name, row in results["cases"].items():
        assert row["workbench"]["seconds"] > 0 and row["workbench"]["peak_rss_gb"] > 0, name
