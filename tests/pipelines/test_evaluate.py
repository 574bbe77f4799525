"""Evaluation end to end on tiny real Llamas: `workbench eval` writes the table, JSONL and chart; perplexity
equals a direct computation; generation pads on the left and stops at the stop rule; lm-eval is optional."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.config.language import EvalConfig
from workbench.config.loader import load_language
from workbench.errors import ConfigError
from workbench.evaluation.generation import generate
from workbench.evaluation.perplexity import perplexity, token_batches, windows
from workbench.pipelines import evaluate as evaluate_module
from workbench.pipelines.evaluate import (
    PerplexitySet, TaskSet, answer_statement, evaluate_models, generated_task, run_lm_eval, tasks_from_config
)


@pytest.fixture
def heldout_docs(shared_data, tiny_tokenizer):
    """Real Swahili paragraphs short enough for one forward pass of the tiny model (context 256)."""
    lines = (shared_data / "corpus" / "sw.txt").read_text(encoding="utf-8").splitlines()[600:]
    docs = [line for line in lines if 20 < len(tiny_tokenizer(line)["input_ids"]) < 200][:6]
    assert len(docs) == 6
    return docs


def direct_perplexity(model_dir, docs) -> float:
    """exp(token-weighted mean NLL), one plain forward pass per document."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    with torch.inference_mode():
        for doc in docs:
            ids = torch.tensor([tokenizer(doc)["input_ids"]])
            logits = model(ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count)


def test_workbench_eval_end_to_end(tiny_llama_factory, shared_data, heldout_docs, tmp_path):
    base_dir, _ = tiny_llama_factory("base", seed=0)
    tied_dir, _ = tiny_llama_factory("tied", seed=3, tie=True)
    (tmp_path / "heldout.txt").write_text("\n".join(heldout_docs) + "\n", encoding="utf-8")
    out_dir = tmp_path / "eval"
    cmd = [sys.executable, "-m", "workbench", "eval", str(base_dir), f"tied model={tied_dir}", "--out", str(out_dir),
           "--lang", "sw", "--mgsm", str(shared_data / "mgsm" / "mgsm_sw.tsv"), "--samples", "6",
           "--heldout", str(tmp_path / "heldout.txt"), "--generated", "3", "--solution-nll", "5",
           "--max-new-tokens", "8", "--batch-size", "4", "--lm-eval", "belebele_swh_Latn"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr

    table = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    assert list(table["columns"]) == ["mgsm_sw", "nll_mgsm_sw", "generated_sw", "nll_generated_sw", "generated_en",
                                      "nll_generated_en", "perplexity_sw"]
    assert table["columns"]["nll_generated_sw"] == {"kind": "solution_nll", "n": 5, "n_shot": 0}
    assert list(table["rows"]) == ["base", "tied model"]
    for model in ("base", "tied model"):
        mgsm = table["rows"][model]["mgsm_sw"]
        assert mgsm["n"] == 6 and 0 <= mgsm["low"] <= mgsm["accuracy"] <= mgsm["high"] <= 1
    md = (out_dir / "results.md").read_text(encoding="utf-8")
    # Without lm-eval, or here without the hub, the standard task is skipped and the table says why.
    assert "| base |" in md and "| tied model |" in md and "skipped: belebele_swh_Latn" in md
    assert "skipped: belebele_swh_Latn" in table["notes"][0]
    assert (out_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    records = [json.loads(line) for line in (out_dir / "tied_model" / "mgsm_sw.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert {"prompt", "output", "extracted", "gold", "correct", "source"} <= set(records[0])
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and "Swali: " in r["prompt"] for r in records)
    assert all(r["source"].startswith("mgsm_sw.tsv:") for r in records)
    for column in ("nll_mgsm_sw", "nll_generated_sw", "nll_generated_en"):
        record = table["rows"]["base"][column]
        assert record["kind"] == "solution_nll" and record["n"] == 5
        assert record["low"] < record["mean"] < record["high"]
        items = [json.loads(line) for line in (out_dir / "base" / f"{column}.jsonl").read_text().splitlines()]
        assert record["mean"] == pytest.approx(sum(i["nll"] for i in items) / 5)
        assert record["tokens"] == sum(i["tokens"] for i in items)
        assert record["characters"] == sum(len(i["solution"]) for i in items)
        assert record["bits_per_char"]["mean"] == pytest.approx(sum(i["bits_per_char"] for i in items) / 5)
        assert all(i["bits_per_char"] == pytest.approx(i["nll"] * i["tokens"] / math.log(2) / len(i["solution"]))
                   for i in items)
    assert json.loads((out_dir / "base" / "nll_mgsm_sw.jsonl").read_text().splitlines()[0])["solution"].startswith(
        "Jibu ni ")
    assert "solution NLL" in md and table["files"]["predictions"]["base"]["nll_generated_sw"].endswith(
        "nll_generated_sw.jsonl")
    generated = (out_dir / "base" / "generated_en.jsonl").read_text().splitlines()
    assert len(generated) == 3 and "Question: " in json.loads(generated[0])["prompt"]

    for model, path in (("base", base_dir), ("tied model", tied_dir)):
        ppl = table["rows"][model]["perplexity_sw"]
        assert math.isfinite(ppl["perplexity"]) and ppl["documents"] == 6
        assert ppl["perplexity"] == pytest.approx(direct_perplexity(path, heldout_docs), rel=1e-5)


def test_perplexity_windows_score_every_token_once(tiny_llama_factory, heldout_docs):
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows(list(range(11)), 4)[-1] == [9, 10] and windows([5], 4) == []
    model_dir, _ = tiny_llama_factory("m", seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    result = perplexity(model, tokenizer, heldout_docs, max_length=16, batch_size=5)
    assert result["tokens"] == sum(len(tokenizer(d)["input_ids"]) - 1 for d in heldout_docs)
    total = 0.0
    with torch.inference_mode():  # the same windows, one at a time
        for doc in heldout_docs:
            for w in windows(tokenizer(doc)["input_ids"], 16):
                ids = torch.tensor([w])
                total += F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
    assert result["nll"] == pytest.approx(total / result["tokens"], rel=1e-5)
    # Bits per character: the same summed NLL over the documents' characters, whatever the tokenizer.
    assert result["characters"] == sum(len(d) for d in heldout_docs)
    assert result["bits_per_char"] == pytest.approx(total / math.log(2) / result["characters"], rel=1e-5)
    budget = perplexity(model, tokenizer, heldout_docs, max_length=16, batch_size=5, max_batch_tokens=40)
    assert budget["tokens"] == result["tokens"] and budget["nll"] == pytest.approx(result["nll"], rel=1e-5)


def test_perplexity_batches_keep_to_the_token_budget():
    pieces = [[0] * n for n in (3, 3, 4, 5, 9, 20, 30)]
    batches = token_batches(pieces, batch_size=3, max_batch_tokens=12)
    assert [[len(p) for p in b] for b in batches] == [[3, 3, 4], [5], [9], [20], [30]]
    assert all(len(b) * max(map(len, b)) <= 12 or len(b) == 1 for b in batches)
    assert [p for b in batches for p in b] == pieces  # every window once, in order


def test_generation_pads_left_and_stops_at_the_stop_string(tiny_llama_factory):
    model_dir, _ = tiny_llama_factory("m", seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    prompts = ["Swali: Juma ana maembe 3.", "Swali: Amina ana maembe 12 na ananunua maembe 4 zaidi. Sasa ana?",
               "Question: Tom has 2 books and buys 5 more. How many books does Tom have now?"]
    alone = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=3) == alone
    # Stop at a piece of what the model writes anyway: the output ends right before it.
    full = alone[1]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0
    cut = generate(model, tokenizer, [prompts[1]], max_new_tokens=12, stop_strings=[stop])[0]
    assert cut == full[:full.index(stop)].strip()


def test_tasks_from_the_profile_and_its_fast_variant(heldout_docs):
    full = tasks_from_config(load_language("sw"), heldout_docs=heldout_docs)
    assert [t.name for t in full] == ["mgsm_sw", "nll_mgsm_sw", "generated_sw", "nll_generated_sw", "generated_en",
                                      "nll_generated_en", "perplexity_sw"]
    mgsm, nll_mgsm, gen_sw, nll_sw, gen_en, nll_en, ppl = full
    assert len(nll_mgsm.items) == len(nll_sw.items) == len(nll_en.items) == 40  # eval.solution_nll_items
    # The accuracy items are among the likelihood items; MGSM's gold is stated in the exemplar's words.
    assert {i.question for i in mgsm.items} <= {i.question for i in nll_mgsm.items}
    assert [i.question for i in gen_sw.items] == [i.question for i in nll_sw.items[:8]]
    assert nll_mgsm.items[0].solution.startswith("Jibu ni ") and nll_sw.items[0].solution.endswith(
        f"Jibu ni {gen_sw.items[0].answer}.")
    assert nll_en.fmt.template.startswith("Question: ") and nll_en.items[0].solution.endswith(
        f"The answer is {gen_en.items[0].answer}.")
    assert len(mgsm.items) == 8 and mgsm.fmt.template.startswith("Swali: ")
    assert len(gen_sw.items) == 8 and gen_en.fmt.template.startswith("Question: ")
    assert [i.answer for i in gen_sw.items] == [i.answer for i in gen_en.items]  # parallel sets
    assert len(ppl.docs) == 6
    fast = tasks_from_config(load_language("sw", fast=True))
    assert len(fast[0].items) == 2 and set(fast[0].items) <= set(mgsm.items)
    assert load_language("bn").language.digits == tasks_from_config(load_language("bn"))[0].digits


def test_mgsm_answers_in_each_language_format():
    statements = {code: answer_statement(tasks_from_config(load_language(code))[0].fmt, 18)
                  for code in ("sw", "te", "bn", "ja")}
    assert statements == {"sw": "Jibu ni 18.", "te": "సమాధానం 18.", "bn": "উত্তর হল 18।", "ja": "答えは18です。"}
    assert answer_statement(evaluate_module.ENGLISH_FORMAT, 2.5) == "The answer is 2.5."
    assert answer_statement(evaluate_module.PromptFormat(), 3) is None


def test_finished_models_are_not_evaluated_again(tiny_llama_factory, tmp_path, monkeypatch):
    model_dir, _ = tiny_llama_factory("m", seed=0)
    tasks = [generated_task("sw", 2, 0), PerplexitySet("ppl", ("Juma ana maembe matatu.",))]
    settings = EvalConfig(max_new_tokens=4)
    first = evaluate_models({"m": model_dir}, tasks=tasks, out_dir=tmp_path, settings=settings, log=lambda *_: None)
    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **k: pytest.fail("evaluated again"))
    lines = []
    second = evaluate_models({"m": model_dir}, tasks=tasks, out_dir=tmp_path, settings=settings, log=lines.append)
    assert second["rows"] == first["rows"] and "already evaluated" in lines[0]


TINY_TASK = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
TINY_ITEMS = [("Mama ana maembe", ["matatu", "mbili na tano", "kumi"], 0),
              ("The answer is", ["eleven", "six", "four hundred"], 1),
              ("Kila mkebe una", ["mipira", "kalamu tatu", "vitabu"], 2),
              ("Roger has five", ["balls", "cans of tennis balls", "apples"], 0),
              ("Jumla ni", ["nane", "kumi na mbili", "sita"], 1),
              ("She bought two", ["pens", "books about cats", "cups"], 2)]


def _choice_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), encoded as lm-eval's HF model encodes a pair."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


def test_lm_eval_bridge_runs_a_local_task_and_joins_the_table(tiny_llama_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local task needs no hub
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    data = tasks_dir / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n"
                            for q, c, a in TINY_ITEMS), encoding="utf-8")
    (tasks_dir / "tiny_choice.yaml").write_text(TINY_TASK.format(data=data), encoding="utf-8")
    model_dir, _ = tiny_llama_factory("m", seed=0)
    settings = EvalConfig(max_new_tokens=4, batch_size=1, lm_eval=["tiny_choice"], lm_eval_include=str(tasks_dir))
    table = evaluate_models({"m": model_dir}, tasks=[TaskSet("t", generated_task("en", 2, 0).items)],
                            out_dir=tmp_path / "eval", settings=settings, log=lambda *_: None)
    record = table["rows"]["m"]["tiny_choice (acc,none)"]
    # The same accuracy computed here from the model's own log-probabilities (lm-eval puts a space between
    # the question and each choice).
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    picks = [max(range(len(c)), key=lambda j: _choice_logprob(model, tokenizer, q, " " + c[j])) for q, c, _ in TINY_ITEMS]
    expected = sum(p == a for p, (_, _, a) in zip(picks, TINY_ITEMS)) / len(TINY_ITEMS)
    assert record["kind"] == "lm_eval" and record["metric"] == "acc,none"
    assert record["value"] == pytest.approx(expected) and record["stderr"] > 0
    assert table["notes"] == []
    assert f"{expected:.4f} ± " in (tmp_path / "eval" / "results.md").read_text(encoding="utf-8")


def test_lm_eval_include_must_be_a_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.lm_eval_include: .*nowhere is not a folder"):
        run_lm_eval(tmp_path, ["x"], 1, include=tmp_path / "nowhere")
