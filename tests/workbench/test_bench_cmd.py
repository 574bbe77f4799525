"""`workbench bench kernels|merge|pretrain`: real, small runs through the CLI entry point."""
import json

import pytest
import torch

from workbench.cli import main

KERNELS = ("delta_stats", "thresholds", "ties_merge", "ties_sv_merge", "lerp_")
THRESHOLD_ALTERNATIVES = ("kthvalue", "topk", "argsort")


@pytest.fixture
def default_dispatch(monkeypatch):
    """The dispatcher as a user gets it (no forced backend, no Triton interpreter)."""
    monkeypatch.delenv("WORKBENCH_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_kernels_table_and_json(tmp_path, capsys, default_dispatch):
    out = tmp_path / "sub" / "kernels.json"
    assert main(["bench", "kernels", "--sizes", "4099", "--repeats", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {tuple(line.split()[1:3]) for line in table.splitlines() if line.strip().startswith("4,099")}
    expected = {(k, "fused") for k in KERNELS} | {(k, "reference") for k in KERNELS}
    expected |= {("thresholds", alt) for alt in THRESHOLD_ALTERNATIVES}
    assert rows == expected, table
    assert "DIFFERS" not in table and table.count("= kthvalue") == 5

    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["sizes"] == [4099] and results["dtype"] == "bf16" and results["device"] == "cpu"
    assert results["torch"] == torch.__version__ and results["threads"] >= 1
    assert len(results["loadavg_before"]) == 3 and len(results["loadavg_after"]) == 3
    assert {(e["kernel"], e["implementation"]) for e in results["entries"]} == expected
    for e in results["entries"]:
        assert e["median_s"] >= 0 and e["min_s"] <= e["median_s"] <= e["max_s"], e
        assert e["bytes"] > 0 and e["gb_per_s"] > 0, e
    by = {(e["kernel"], e["implementation"]): e for e in results["entries"]}
    assert by["thresholds", "fused"]["bytes"] == 2 * 2 * 4099 * 2       # 2 passes over base + expert, bf16
    assert by["ties_merge", "fused"]["bytes"] == 4 * 4099 * 2           # reads base + 2 experts, writes 1
    fused = by["thresholds", "fused"]
    from workbench.kernels import cpu_native

    assert fused["backend"] == ("c" if cpu_native.library() is not None else "torch") and fused["vs_fused"] == 1.0
    assert fused["equals_kthvalue"] and fused["thresholds"] == by["thresholds", "kthvalue"]["thresholds"]
    assert len(fused["thresholds"]) == 2 and 0 < fused["thresholds"][0] < fused["thresholds"][1]   # k, s < k


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert needle in err, err


def test_kernels_bad_size_is_one_line(capsys):
    _one_line_error(capsys, ["bench", "kernels", "--sizes", "1M", "12Q"],
                    "workbench bench: error: --sizes '12Q': expected a positive element count such as 4099, 4K, "
                    "1M or 50M")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_kernels_cuda_without_cuda_is_one_line(capsys):
    _one_line_error(capsys, ["bench", "kernels", "--device", "cuda", "--sizes", "4K"],
                    "--device cuda: CUDA is not available")


def test_merge_unknown_case_is_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["bench", "merge", "--size", "tiny", "--only", "ties,nope", "--work", str(tmp_path)],
                    "--only 'ties,nope': unknown case nope; expected a comma-separated list of ties, "
                    "ties_model_scope, ties_sv, dare_ties, task_arithmetic, layer_swap")
    _one_line_error(capsys, ["bench", "merge", "--mergekit", str(tmp_path / "no-such-mergekit-yaml"),
                             "--work", str(tmp_path)], "not an executable file")
    assert not (tmp_path / "models").exists()  # nothing generated before the arguments are checked


def test_merge_help_lists_every_case(capsys):
    from workbench.pipelines.bench.merge import CASE_NAMES

    with pytest.raises(SystemExit):
        main(["bench", "merge", "--help"])
    assert ", ".join(CASE_NAMES) in " ".join(capsys.readouterr().out.split())


def test_merge_tiny_workbench_only(tmp_path, capsys):
    out = tmp_path / "merge.json"
    argv = ["bench", "merge", "--size", "tiny", "--no-mergekit", "--only", "task_arithmetic,ties",
            "--work", str(tmp_path / "work"), "--repeats", "2", "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "mergekit not run" in table and "task_arithmetic" in table and "ties_sv" not in table
    assert "median of 2 runs each" in table
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["size"] == "tiny" and results["mergekit"] is False
    assert set(results["cases"]) == {"task_arithmetic", "ties"}
    assert results["repeat"] == 2
    for row in results["cases"].values():
        assert row["workbench"]["seconds"] > 0 and row["workbench"]["peak_rss_gb"] > 0
        assert len(row["workbench"]["runs_seconds"]) == 2
        assert abs(row["workbench"]["seconds"] - sum(row["workbench"]["runs_seconds"]) / 2) <= 0.01  # median of 2
        assert "mergekit" not in row


def test_pretrain_packed_vs_padded(tmp_path, capsys, tiny_llama_factory, shared_data):
    model_dir, _ = tiny_llama_factory("base")
    text = tmp_path / "sw.txt"
    lines = (shared_data / "corpus" / "sw.txt").read_text(encoding="utf-8").splitlines()[:80]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "pretrain.json"
    argv = ["bench", "pretrain", "--model", str(model_dir), "--text", str(text), "--steps", "2",
            "--batch-size", "2", "--block-size", "64", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "packed blocks" in printed and "padded baseline" in printed and "ratio" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["ratio"] > 0 and result["packed_tokens_per_second"] > 0
    assert result["steps"] == 2 and result["batch_size"] == 2 and result["block_size"] == 64
    assert result["documents"] == sum(1 for line in lines if len(line.strip()) >= 20)


def test_pretrain_bad_values_are_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["bench", "pretrain", "--model", str(tmp_path), "--steps", "0"],
                    "--steps 0: expected a positive integer")


def test_compare_puts_tie_choices_in_the_tied_band(tmp_path):
    # The exact trim against keep_all on the tiny benchmark model: the two differ only in which ties at a
    # threshold they keep, so every difference lies in the tied band, and keep_all changes more elements.
    from workbench.pipelines.bench.compare import compare_merges, targets_met
    from workbench.pipelines.bench.merge import ensure_models
    from workbench.merge.engine import run_merge
    from workbench.merge.recipe import MergeRecipe, ModelEntry

    models = ensure_models(tmp_path / "models", "tiny")
    outs = {}
    for rule in ("exact", "keep_all"):
        recipe = MergeRecipe(method="ties", base="base", trim_ties=rule, models=[
            ModelEntry(model="expert_a", density=0.2), ModelEntry(model="expert_b", density=0.2)])
        outs[rule] = run_merge(recipe, models, tmp_path / rule, device="cpu", progress=False).out_dir
    experts = [models["expert_a"], models["expert_b"]]
    same = compare_merges(outs["exact"], outs["exact"], models["base"], experts, [0.2, 0.2])
    assert same["differ_outside_band_share"] == 0 and same["max_changed_share_gap_pp"] == 0 and targets_met(same)
    c = compare_merges(outs["exact"], outs["keep_all"], models["base"], experts, [0.2, 0.2])
    assert c["tensors"] > 10 and 0 < c["threshold_band_share"] < 0.5 and c["zero_election_share"] > 0
    assert c["differ_outside_band_share"] == 0 and c["differ_outside_both_share"] == 0
    assert c["differ_inside_band_share"] > 0
    assert c["max_changed_share_gap_pp"] > 0
    assert all(t["changed_workbench"] <= t["changed_mergekit"] for t in c["per_tensor"].values())


def test_device_runs_report_the_first_run_apart_and_compare_bytes(tmp_path):
    # What bench merge --device cuda runs, on the CPU here: a first run, then the timed ones, every output
    # compared with the reference merge's bytes.
    import yaml

    from workbench.pipelines.bench.merge import device_runs, ensure_models
    from workbench.merge.engine import run_merge
    from workbench.merge.recipe import MergeRecipe, ModelEntry

    models = ensure_models(tmp_path / "models", "tiny")
    recipe = MergeRecipe(method="ties", base="base", models=[ModelEntry(model="expert_a", density=0.2),
                                                             ModelEntry(model="expert_b", density=0.2)])
    reference = run_merge(recipe, models, tmp_path / "reference", device="cpu", progress=False).out_dir
    path = tmp_path / "ties.yaml"
    path.write_text(yaml.safe_dump({"method": "ties", "base": str(models["base"]), "models": [
        {"model": str(models["expert_a"]), "density": 0.2}, {"model": str(models["expert_b"]), "density": 0.2}]}))
    files = [f for m in models.values() for f in m.glob("*.safetensors")]
    row = device_runs(path, reference, tmp_path, files, repeat=2, device="cpu")
    runs, serial = row["workbench_cpu"], row["workbench_cpu_serial"]
    assert row["same_bytes_as_cpu"] is True, row
    assert runs["first_seconds"] > 0 and len(runs["runs_seconds"]) == 2 and runs["seconds"] > 0
    assert len(serial["runs_seconds"]) == 2 and serial["seconds"] > 0
    assert not (tmp_path / "reference-cpu").exists()


def test_compare_needs_mergekit(capsys, tmp_path):
    _one_line_error(capsys, ["bench", "merge", "--size", "tiny", "--no-mergekit", "--compare", "--work",
                             str(tmp_path)], "--compare compares with mergekit's output")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_gpu_commands_without_cuda_are_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["bench", "gpu", "--work", str(tmp_path)], "bench gpu: CUDA is not available")
    _one_line_error(capsys, ["bench", "merge", "--size", "tiny", "--no-mergekit", "--device", "cuda",
                             "--work", str(tmp_path)], "--device cuda: CUDA is not available")
    _one_line_error(capsys, ["bench", "gpu", "--parts", "tests,nope"], "--parts 'tests,nope': unknown part nope")
    assert not any(tmp_path.iterdir())


def test_the_gpu_check_judges_a_real_kernel_benchmark(default_dispatch):
    """The verdicts and the summary of `bench gpu` from a real (CPU) kernel benchmark and a real tests record."""
    from workbench.pipelines.bench.gpu import format_summary, kernel_verdicts, summary
    from workbench.pipelines.bench.kernels import run_kernel_benchmark

    bench = run_kernel_benchmark("cpu", [4099], repeats=2, warmup=0, progress=lambda _: None)
    v = kernel_verdicts(bench)
    fused = next(e for e in bench["entries"] if (e["kernel"], e["implementation"]) == ("thresholds", "fused"))
    topk = next(e for e in bench["entries"] if (e["kernel"], e["implementation"]) == ("thresholds", "topk"))
    assert v["n"] == 4099 and v["threshold_ms"] == fused["median_s"] * 1e3
    assert v["threshold_vs_topk"] == topk["median_s"] / fused["median_s"] and v["thresholds_equal_kthvalue"]
    results = {"environment": {"torch": torch.__version__}, "kernels": {"verdicts": v},
               "tests": {"passed": 3, "failed": 1, "skipped": 0, "returncode": 1},
               "merges": {"cases": {"ties": {"workbench": {"seconds": 2.0}, "same_bytes_as_cpu": True,
                                             "workbench_cuda": {"seconds": 3.0}}}},
               "pretrain": {"lora": {"packed_tokens_per_second": 10.0, "padded_tokens_per_second": 5.0},
                            "seconds": 1.0}}
    rows = {what: ok for what, _, ok in summary(results)}
    assert rows["kernel tests compiled on CUDA: 0 failures"] is False
    assert rows["merge ties: CUDA bytes equal CPU bytes"] is True
    assert rows["merge ties: CUDA not slower than CPU"] is False
    assert rows["CT tokens/s, 135M shape, lora"] is None
    text = format_summary({**results, "summary": summary(results)})
    assert "MISS kernel tests compiled on CUDA" in text and "target(s) missed" in text


def test_the_gpu_checks_language_file_is_a_valid_micro_profile(tmp_path, tiny_llama_factory):
    """The language file `bench gpu` runs adapt with: Swahili's micro profile on a local model folder."""
    from workbench.config.loader import load_language
    from workbench.pipelines.bench.gpu import tiny_language_file

    model, _ = tiny_llama_factory("base")
    loaded = load_language(str(tiny_language_file(tmp_path, model)), profile="micro", fast=True)
    assert loaded.profile.base.path == str(model) and loaded.profile.base.gguf is None
    assert loaded.profile.eval.mgsm is not None and set(loaded.profile.merges) >= {"ties", "ties_sv"}
