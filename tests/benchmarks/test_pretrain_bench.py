"""CT throughput (real tokens per second): the CT stage on packed blocks against a plain Trainer that pads each
document to the block length, same tiny Llama, batch shape and LoRA. Run with:

    python -m pytest tests/benchmarks/test_pretrain_bench.py --benchmark-enable -s
"""
import torch

from workbench.pipelines.bench.pretrain import pretrain_throughput


def test_ct_packed_vs_padded_throughput(benchmark, tiny_llama_factory, shared_data, tmp_path):
    base_dir, _ = tiny_llama_factory("base")
    texts = [l for l in (shared_data / "corpus" / "sw.txt").read_text(encoding="utf-8").splitlines() if len(l) >= 20]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared 2-core machine; both sides alike
    try:
        result = benchmark.pedantic(pretrain_throughput, args=(base_dir, texts[:600]),
                                    kwargs=dict(block_size=256, batch_size=8, steps=30, repeats=2, work_dir=tmp_path),
                                    rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(result)
    print(f"\nCT throughput: packed {result['packed_tokens_per_second']:.0f} tokens/s, padded baseline "
          f"{result['padded_tokens_per_second']:.0f} tokens/s, ratio {result['ratio']:.2f}x "
          f"(padded rows are {result['padded_real_share']:.0%} real tokens)")
    assert result["ratio"] >= 1.0
