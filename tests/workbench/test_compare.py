"""Paired comparisons from real per-item evaluation records (JSONL files as the evaluation writes them): items
paired by source whatever their order, the NLL difference and its interval, McNemar's p by hand, verdicts."""
import json

import numpy as np
import pytest

from workbench.evaluation.compare import compare_models, describe_comparison


def write_items(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.normal(2.0, 0.5, 60)
    nll = {"merge": difficulty - 0.3 + rng.normal(0, 0.05, 60), "expert": difficulty + rng.normal(0, 0.05, 60),
           "same": difficulty + rng.normal(0, 0.05, 60)}
    right = {"merge": [1] * 8 + [0] * 4, "expert": [0] * 7 + [1] + [0] * 4, "same": [1] * 8 + [0] * 4}
    files = {}
    for model in nll:
        nll_items = [{"source": f"gen:{i}", "nll": float(v), "tokens": 10} for i, v in enumerate(nll[model])]
        acc_items = [{"source": f"mgsm:{i}", "correct": bool(v)} for i, v in enumerate(right[model])]
        if model == "expert":
            nll_items.reverse()  # paired by source, not by line
        files[model] = {"nll_generated_sw": write_items(tmp_path / f"{model}-nll.jsonl", nll_items),
                        "mgsm_sw": write_items(tmp_path / f"{model}-acc.jsonl", acc_items)}
    columns = {"mgsm_sw": {"kind": "accuracy"}, "nll_generated_sw": {"kind": "solution_nll"},
               "perplexity_sw": {"kind": "perplexity"}}
    return {"columns": columns, "files": {"predictions": files}, "nll": nll}


def test_each_pair_on_each_paired_metric(table):
    out = compare_models(table, [("merge", "expert"), ("merge", "same")])
    assert [(c["a"], c["b"], c["metric"]) for c in out] == [
        ("merge", "expert", "mgsm_sw"), ("merge", "expert", "nll_generated_sw"),
        ("merge", "same", "mgsm_sw"), ("merge", "same", "nll_generated_sw")]
    nll = out[1]
    assert nll["n"] == 60 and nll["difference"] == pytest.approx(float(np.mean(table["nll"]["merge"] -
                                                                                table["nll"]["expert"])))
    assert nll["low"] < -0.3 < nll["high"] < 0 and nll["verdict"] == "better"
    acc = out[0]
    # merge alone right on 7 items, expert alone on 0: p = 2 / 2^7.
    assert (acc["a_only"], acc["b_only"], acc["n"]) == (7, 0, 12) and acc["p"] == pytest.approx(2 / 128)
    assert acc["difference"] == pytest.approx(7 / 12) and acc["verdict"] == "better"
    assert out[2]["verdict"] == "tie" and out[2]["p"] == 1.0 and out[2]["difference"] == 0.0
    assert describe_comparison(acc).startswith("mgsm_sw: +58.3 points [")
    assert describe_comparison(nll).startswith("nll_generated_sw: -0.")


def test_models_without_records_are_left_out(table):
    assert compare_models(table, [("merge", "nowhere")]) == []


def test_models_with_different_tokenizers_compare_per_character(tmp_path):
    """An extended vocabulary cuts the same solution into fewer tokens: per token, its NLL is higher for the
    same likelihood of the text. Where token counts differ, the comparison is in bits per character."""
    chars = 40
    base = [{"source": f"s{i}", "nll": 1.0, "tokens": 20, "characters": chars,
             "bits_per_char": 1.0 * 20 / np.log(2) / chars + 0.01 * i} for i in range(30)]
    # Extended: 10 tokens a solution, 1.8 nats each (18 nats in all, less than the base's 20): worse per
    # token, better per character.
    extended = [{"source": f"s{i}", "nll": 1.8, "tokens": 10, "characters": chars,
                 "bits_per_char": 1.8 * 10 / np.log(2) / chars + 0.01 * i} for i in range(30)]
    table = {"columns": {"nll_mgsm_te": {"kind": "solution_nll"}},
             "files": {"predictions": {
                 "merge": {"nll_mgsm_te": write_items(tmp_path / "merge.jsonl", extended)},
                 "math": {"nll_mgsm_te": write_items(tmp_path / "math.jsonl", base)},
                 "twin": {"nll_mgsm_te": write_items(tmp_path / "twin.jsonl", extended)}}}}
    across, same = compare_models(table, [("merge", "math"), ("merge", "twin")])
    assert across["unit"] == "bits/char" and across["verdict"] == "better"
    assert across["difference"] == pytest.approx((18 - 20) / np.log(2) / chars)
    assert describe_comparison(across).startswith("nll_mgsm_te: -0.072 bits/char [")
    assert same["unit"] == "nats/token" and same["difference"] == 0.0 and same["verdict"] == "tie"
