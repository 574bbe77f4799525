"""The evaluation table and chart: solution NLL is shown per token, with bits per character beside it, and
drawn in bits per character when the models' tokenizers differ (their token counts on a set differ)."""
from workbench.evaluation.table import markdown_table, nll_per_character, plot_table


def record(mean, tokens, bpc):
    return {"kind": "solution_nll", "mean": mean, "low": mean - 0.1, "high": mean + 0.1, "n": 40,
            "tokens": tokens, "characters": 9000, "bits_per_char": {"mean": bpc, "low": bpc - 0.05,
                                                                    "high": bpc + 0.05}}


def table(ties_tokens):
    return {"columns": {"nll_mgsm_te": {"kind": "solution_nll"}},
            "rows": {"math": {"nll_mgsm_te": record(0.811, 4000, 1.90)},
                     "ties": {"nll_mgsm_te": record(1.124, ties_tokens, 1.60)}}}


def test_cells_carry_bits_per_character():
    md = markdown_table(table(2500))
    assert "| math | 0.811 [0.711, 0.911] (n=40; 1.900 bpc) |" in md
    assert "bits per character of the solution" in md


def test_the_chart_draws_bits_per_character_only_across_tokenizers(tmp_path):
    assert nll_per_character(table(2500)) and not nll_per_character(table(4000))
    old = table(2500)
    del old["rows"]["ties"]["nll_mgsm_te"]["bits_per_char"]  # a record saved before it: per token
    assert not nll_per_character(old)
    path = plot_table(table(2500), tmp_path / "results.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
