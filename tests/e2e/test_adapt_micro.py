"""End to end: `workbench adapt --lang sw --profile micro --fast` on the real SmolLM2-135M-Instruct base.

One run directory for the module: the first run is killed (SIGKILL) as soon as CT has finished, the rerun
completes it, and a third run changes one merge density. The tests read what those runs left: every artifact,
the stage records (to show what ran again and what did not: records, not timings), the report against the
evaluation outputs, and the merged models through transformers.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.cli import main

ADAPT = [sys.executable, "-m", "workbench", "adapt", "--lang", "sw", "--profile", "micro", "--fast"]
MERGES = ("task_arithmetic", "ties", "ties_sv", "layer_swap")
RUN_TIMEOUT = 900  # seconds; the --fast run takes a few minutes on 2 cores
# The runs own the machine while the test waits: OpenMP's default (spinning) waits are faster there than the
# passive ones tests/conftest.py sets for the many small in-process models.


def env() -> dict:
    """This process's environment (WORKBENCH_CACHE included: the session's converted base) without the
    passive-wait setting."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def records(run_dir: Path) -> dict:
    """{stage folder name ("merge-ties"): its stage.json}: the stages of the last finished run (run.json),
    else every finished one."""
    if (run_dir / "run.json").is_file():
        stages = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["stages"]
        paths = [Path(s["path"]) / "stage.json" for s in stages.values()]
    else:
        paths = [Path(p) for p in glob.glob(str(run_dir / "stages" / "*" / "stage.json"))]
    return {rec["stage"]: rec for rec in (json.loads(p.read_text(encoding="utf-8")) for p in paths if p.is_file())}


def kill_after(run_dir: Path, stage: str, log: Path) -> None:
    """Start a run and SIGKILL it as soon as `stage` has written its record."""
    with open(log, "w") as out:
        proc = subprocess.Popen(ADAPT + ["--run-dir", str(run_dir)], stdout=out, stderr=subprocess.STDOUT,
                                env=env(), start_new_session=True)
        deadline = time.monotonic() + RUN_TIMEOUT
        while stage not in records(run_dir):
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before {stage} finished:\n"
                            f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"{stage} did not finish within {RUN_TIMEOUT} s")
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def adapt(run_dir: Path, *extra) -> subprocess.CompletedProcess:
    done = subprocess.run(ADAPT + ["--run-dir", str(run_dir), *extra], capture_output=True, text=True,
                          env=env(), timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_dir):
    """The killed run, its completion and the density change; what each left behind."""
    run_dir = tmp_path_factory.mktemp("adapt") / "sw-micro-fast"
    kill_after(run_dir, "language_expert", run_dir.parent / "killed.log")
    after_kill = records(run_dir)
    resumed = adapt(run_dir)
    after_resume = records(run_dir)
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    # report.md as the completed run wrote it: the density change below writes a new one (and a new export).
    report_md = (run_dir / "report.md").read_text(encoding="utf-8")
    results = json.loads((run_dir / "evaluation" / "results.json").read_text(encoding="utf-8"))
    jsonl = {p.relative_to(run_dir / "evaluation").as_posix(): [json.loads(l) for l in p.read_text().splitlines()]
             for p in (run_dir / "evaluation").glob("*/*.jsonl")}
    changed = adapt(run_dir, "--set", "merges.ties.models[0].density=0.5")
    return {"dir": run_dir, "after_kill": after_kill, "resumed": resumed, "after_resume": after_resume,
            "report": report, "report_md": report_md, "results": results, "jsonl": jsonl, "changed": changed,
            "after_change": records(run_dir)}


def test_the_killed_run_resumes_without_repeating_corpus_or_ct(run):
    before, after = run["after_kill"], run["after_resume"]
    assert {"fetch", "corpus", "tokenizer", "blocks", "language_expert"} <= set(before)
    assert "report" not in before
    for name in ("fetch", "corpus", "tokenizer", "blocks", "language_expert"):
        assert after[name] == before[name], f"{name} ran again after the kill"
    assert "language_expert: done earlier" in run["resumed"].stdout
    # The CT stage's folder (its record, model and log) was finished once and not redone.
    ct = [json.loads(p.read_text()) for p in (run["dir"] / "stages").glob("language_expert-*/stage.json")]
    assert len(ct) == 1 and ct[0]["outputs"]["summary"]["steps"] == 2


def test_every_artifact_is_written(run):
    d = run["dir"]
    for name in ("report.md", "report.json", "report_assets/delta_heatmap.png", "report_assets/results.png",
                 "evaluation/results.md", "evaluation/results.json", "evaluation/results.png", "run.json"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    # One folder scheme: each stage's record and everything it made in <run>/stages/<name>-<key>/.
    assert sorted(p.name for p in d.iterdir()) == ["evaluation", "report.json", "report.md", "report_assets",
                                                   "run.json", "stages"]
    fetch = Path(run["after_resume"]["fetch"]["path"])
    assert (fetch / "fetch.json").is_file() and run["after_resume"]["fetch"]["outputs"]["manifest"] == str(
        fetch / "fetch.json")
    recs = run["after_resume"]
    for merge in MERGES:
        model = Path(recs[f"merge-{merge}"]["path"]) / recs[f"merge-{merge}"]["outputs"]["model"]
        for name in ("config.json", "model.safetensors", "README.md", "merge_report.json", "tokenizer.json"):
            assert (model / name).is_file(), f"{merge}: {name}"
    for model in ("base", "language", "math") + MERGES:
        for task in ("mgsm_sw", "generated_sw", "generated_en"):
            items = run["jsonl"][f"{model}/{task}.jsonl"]
            assert len(items) == 2 and {"prompt", "output", "extracted", "gold"} <= set(items[0])
    for model in ("base", "language", "math", "ct_then_sft", "model_soup") + MERGES:
        for task in ("nll_mgsm_sw", "nll_generated_sw", "nll_generated_en"):
            items = run["jsonl"][f"{model}/{task}.jsonl"]
            assert len(items) == 4 and all(i["tokens"] > 0 and i["nll"] > 0 for i in items)
            record = run["results"]["rows"][model][task]
            assert record["kind"] == "solution_nll" and record["n"] == 4 and record["low"] <= record["mean"]
    # Each merge against both experts and both baselines, item by item, on every paired metric.
    pairs = {(c["a"], c["b"]) for c in run["report"]["comparisons"]}
    assert pairs == {(m, o) for m in MERGES for o in ("language", "math", "ct_then_sft", "model_soup")}
    assert {c["metric"] for c in run["report"]["comparisons"]} == {
        "mgsm_sw", "generated_sw", "generated_en", "nll_mgsm_sw", "nll_generated_sw", "nll_generated_en"}
    assert "Best on the target language" in run["report_md"] and "Decided by" in run["report_md"]
    assert "## Paired comparisons" in run["report_md"]
    swap = run["report"]["merges"]["layer_swap"]["layer_swap"]
    assert swap["bottom"] + swap["top"] > 0 and any(a == 1.0 for a in swap["alphas"])


def test_the_recommended_model_is_exported_and_every_merge_has_a_hub_card(run):
    from workbench.provenance import file_sha256

    d, recs, report = run["dir"], run["after_resume"], run["report"]
    export = report["export"]
    assert export["model"] == report["verdict"]["best"] and export["type"] == "q8_0"
    gguf = Path(export["gguf"])
    assert gguf.is_file() and gguf.stat().st_size == export["bytes"] and file_sha256(gguf) == export["sha256"]
    assert json.loads(gguf.with_name(gguf.name + ".json").read_text())["sha256"] == export["sha256"]
    modelfile = (gguf.parent / "Modelfile").read_text()
    assert f"FROM ./{gguf.name}" in modelfile and "TEMPLATE" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    text = run["report_md"]
    assert "## Run it locally" in text and export["commands"]["ollama"] in text and f"llama-cli -m {gguf}" in text
    assert f"GGUF (q8_0, " in run["resumed"].stdout and "ollama create sw-micro-" in run["resumed"].stdout
    for merge in MERGES:
        card = (Path(recs[f"merge-{merge}"]["path"]) / "model" / "README.md").read_text(encoding="utf-8")
        head = card.split("\n---\n", 1)[0]
        assert "base_model:\n- HuggingFaceTB/SmolLM2-135M-Instruct\n" in head and "base_model_relation: merge" in head
        assert "license: apache-2.0" in head and "language:\n- sw\n- en" in head and f"- {report['merges'][merge]['method']}" in head
        assert str(Path.home()) not in head and "/tmp" not in head and ".cache" not in head  # no local path
        assert "local: sw-language-expert" in head and "## Evaluation" in card and "| base |" in card


def test_report_numbers_equal_the_evaluation_outputs(run):
    d, report, results = run["dir"], run["report"], run["results"]
    assert report["table"]["rows"] == results["rows"]
    for model, row in results["rows"].items():
        for task, metric in row.items():
            if metric["kind"] != "accuracy":
                continue
            items = run["jsonl"][f"{model}/{task}.jsonl"]
            assert (metric["correct"], metric["n"]) == (sum(i["correct"] for i in items), len(items)), (model, task)
    ppl = results["rows"]["language"]["perplexity_sw"]["perplexity"]
    assert f"{ppl:.2f}" in run["report_md"]


def test_perplexity_scores_the_heldout_documents_text(run):
    """Every token after each document's first, of the held-out documents' text (not of heldout.jsonl's lines)."""
    from transformers import AutoTokenizer

    from workbench.pipelines.corpus import read_heldout

    blocks = run["after_resume"]["blocks"]["outputs"]["corpus_stage"]
    docs = read_heldout(blocks)[:4]  # eval.perplexity_docs of the fast variant
    tokenizer = AutoTokenizer.from_pretrained(run["after_resume"]["fetch"]["outputs"]["models"]["base"])
    want = sum(len(tokenizer(doc, add_special_tokens=True)["input_ids"]) - 1 for doc in docs)
    for model, row in run["results"]["rows"].items():
        assert (row["perplexity_sw"]["documents"], row["perplexity_sw"]["tokens"]) == (4, want), model


def test_merged_models_load_and_give_finite_logits(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for merge in MERGES:
        rec = run["after_resume"][f"merge-{merge}"]
        path = Path(rec["path"]) / rec["outputs"]["model"]
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(["Swali: Roger ana mipira 5 ya tenisi."], return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all(), merge


def test_changing_a_density_reruns_only_that_merge_its_evaluation_and_the_report(run):
    before, after = run["after_resume"], run["after_change"]
    rerun = {name for name in after if name not in before or after[name]["key"] != before[name]["key"]}
    assert rerun == {"merge-ties", "evaluate", "export", "report"}  # export: the recommendation may change
    # The evaluation stage scored only the changed model again; the others' metrics were reused.
    out = run["changed"].stdout
    assert "ties: /" in out and "ties_sv: /" not in out and "base: /" not in out


def test_dry_run_of_a_paper_profile_lists_hub_ids_without_network(tmp_path, monkeypatch, capsys):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(tmp_path)
    assert main(["adapt", "--lang", "te", "--profile", "paper-ties-sv", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for hub_id in ("meta-llama/Llama-2-7b-hf", "pkupie/Llama-2-7b-tel", "pkupie/Llama-2-7b-FLAN-step884"):
        assert hub_id in out
    assert "access agreement" in out
    assert calls == [] and not (tmp_path / "runs").exists()


def test_unknown_language_and_profile_list_the_choices(capsys):
    assert main(["adapt", "--lang", "xx", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "xx" in err and "sw" in err and "bo" in err and "\n" == err[-1] and err.count("\n") == 1
    assert main(["adapt", "--lang", "sw", "--profile", "nope", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "micro" in err and "paper-layer-swap" in err
