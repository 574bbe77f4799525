"""The report's recommendation (target accuracy, then solution NLL, then perplexity; the deciding rule named),
the pairs it compares (each merge against the experts and the baselines) and its per-merge verdict lines."""
import pytest

from workbench.config.loader import load_language
from workbench.errors import ConfigError
from workbench.report import comparison_pairs, comparison_statements, recommend, verdicts


def acc(correct, n, task="mgsm_sw"):
    return {task: {"kind": "accuracy", "accuracy": correct / n, "low": 0.0, "high": 1.0, "correct": correct, "n": n}}


def nll(mean, task="nll_generated_sw", n=48):
    return {task: {"kind": "solution_nll", "mean": mean, "low": mean - 0.1, "high": mean + 0.1, "n": n}}


def ppl(value, code="sw"):
    return {f"perplexity_{code}": {"kind": "perplexity", "perplexity": value}}


def test_accuracy_decides_first():
    rows = {"math": {**acc(3, 12), **nll(1.0), **ppl(200)}, "ties": {**acc(4, 12), **nll(2.0), **ppl(300)}}
    assert recommend(rows, "sw") == {"best": "ties", "rule": "target-language accuracy", "tied": ["math"]}


def test_solution_nll_decides_a_tie_on_accuracy_then_perplexity():
    rows = {"base": {**acc(0, 12), **nll(2.5), **ppl(100)}, "language": {**acc(0, 12), **nll(1.9), **ppl(110)},
            "ties": {**acc(0, 12), **nll(1.7), **ppl(120)}, "english": {**nll(1.0, "nll_generated_en"), **ppl(50)}}
    choice = recommend(rows, "sw")
    assert choice == {"best": "ties", "rule": "target-language solution NLL", "tied": ["base", "language"]}
    rows["language"].update(nll(1.7))
    assert recommend(rows, "sw") == {"best": "language", "rule": "target-language perplexity",
                                     "tied": ["ties"]}
    # Item-weighted over the target-language sets: 1.0 on 10 items and 2.0 on 30 pool to 1.75.
    rows = {"a": {**nll(1.0, "nll_mgsm_sw", 10), **nll(2.0, n=30)}, "b": {**nll(1.8, n=40)}}
    assert recommend(rows, "sw")["best"] == "a"
    statement = verdicts(rows, "sw")["statements"][0]
    assert "**a**" in statement and "solution NLL 1.750 over 40 items" in statement
    assert "Decided by target-language solution NLL (among b)" in statement


def test_the_perplexity_rule_reads_bits_per_character_where_recorded():
    # An extended-vocabulary model has a higher per-token perplexity than the base on the same text and may
    # still read it better: bits per character decide, per-token perplexity only where it is all there is.
    rows = {"base": {**acc(0, 12), **ppl(20)}, "language": {**acc(0, 12), **ppl(70)}}
    rows["base"]["perplexity_sw"]["bits_per_char"] = 2.4
    rows["language"]["perplexity_sw"]["bits_per_char"] = 1.9
    assert recommend(rows, "sw") == {"best": "language", "rule": "target-language perplexity", "tied": ["base"]}


def test_solution_nll_compares_in_bits_per_character_across_tokenizers():
    # Telugu: the math expert keeps the base tokenizer (40 tokens a solution set), the merges carry the
    # extended vocabulary (25): per token the expert looks better, per character of the same text it is not.
    def scored(mean, tokens, bpc):
        rec = nll(mean, "nll_mgsm_te", n=40)
        rec["nll_mgsm_te"].update(tokens=tokens, bits_per_char={"mean": bpc, "low": bpc - 0.1, "high": bpc + 0.1})
        return rec
    rows = {"math": scored(0.81, 4000, 1.90), "ties": scored(1.12, 2500, 1.60)}
    choice = recommend(rows, "te")
    assert choice["best"] == "ties"
    assert choice["rule"] == ("target-language solution NLL in bits per character (the models' tokenizers "
                              "differ)")
    assert "solution NLL 1.120 (1.600 bits/char) over 40 items" in verdicts(rows, "te")["statements"][0]
    # One tokenizer (the same token counts): per token, as before.
    rows["ties"] = scored(1.12, 4000, 1.60)
    assert recommend(rows, "te") == {"best": "math", "rule": "target-language solution NLL", "tied": ["ties"]}


def test_no_target_language_task_recommends_nothing():
    rows = {"a": {**ppl(10), **nll(1.0, "nll_generated_en")}}
    assert recommend(rows, "sw") is None
    assert "No target-language task" in verdicts(rows, "sw")["statements"][0] and "best" not in verdicts(rows, "sw")


def test_every_merge_against_experts_and_baselines():
    profile = load_language("sw").profile
    pairs = comparison_pairs(profile)
    others = ["language", "math", "ct_then_sft", "model_soup"]
    assert pairs == [(m, o) for m in ("task_arithmetic", "ties", "ties_sv", "layer_swap") for o in others]


def test_one_line_per_merge_with_findings_and_one_for_the_rest():
    pairs = [("ties", "math"), ("ties", "language"), ("layer_swap", "math"), ("layer_swap", "language")]
    found = {"a": "ties", "b": "math", "metric": "nll_generated_sw", "kind": "solution_nll", "difference": -0.41,
             "low": -0.52, "high": -0.30, "n": 48, "verdict": "better"}
    tie = {**found, "b": "language", "low": -0.1, "high": 0.2, "difference": 0.05, "verdict": "tie"}
    lines = comparison_statements([found, tie, {**tie, "a": "layer_swap", "b": "math"},
                                   {**tie, "a": "layer_swap"}], pairs)
    assert lines[0] == ("**ties**: vs math, nll_generated_sw: -0.410 [-0.520, -0.300]: better; no detectable "
                        "difference in its 1 other comparisons.")
    assert lines[1].startswith("layer_swap: no detectable difference from math, language on any paired metric")
    assert len(lines) == 2


def test_baselines_must_name_an_expert_or_a_merge():
    with pytest.raises(ConfigError, match=r"sw\.yaml: profiles\.micro\.eval\.baselines\[1\]: 'soup' is neither"):
        load_language("sw", overrides=["eval.baselines=[ct_then_sft, soup]"])
    with pytest.raises(ConfigError, match=r"profiles\.micro\.experts\.ct_then_sft\.sft\.from: .*expected one of "
                                          r"'base', 'language'"):
        load_language("sw", overrides=["experts.ct_then_sft.sft.from=math"])
