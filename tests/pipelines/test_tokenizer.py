"""Tokenizer stage: fertility figures on real text, and a vocabulary extension that lowers fertility, keeps the
round trip exact, initializes new rows as the mean of their spelling, and leaves a model that runs (tied or not)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.config.loader import load_language
from workbench.pipelines.corpus import read_heldout
from workbench.pipelines.tokenizer import extension_reasons, fertility, write_tokenizer_report


def lines(shared_data, lang, n=60):
    return [l for l in (shared_data / "corpus" / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if l][:n]


def test_fertility_figures(tiny_tokenizer, shared_data):
    sw = fertility(tiny_tokenizer, lines(shared_data, "sw"), script="Latn")
    te = fertility(tiny_tokenizer, lines(shared_data, "te"), script="Telu")
    ja = fertility(tiny_tokenizer, lines(shared_data, "ja"), script="Jpan")
    # The tokenizer was trained on Swahili and English: Telugu and Japanese fall apart into byte pieces.
    assert sw["chars_per_token"] > 1.5 > 0.6 > te["chars_per_token"]
    assert sw["partial_char_share"] == 0 and te["partial_char_share"] > 0.5
    assert sw["tokens_per_word"] == pytest.approx(sw["tokens"] / sw["words"])
    assert ja["tokens_per_word"] is None and ja["chars_per_token"] < 0.6  # no spaces between Japanese words
    assert sw["byte_fallback_share"] == sw["unknown_share"] == 0  # byte-level BPE: no <0x..> pieces, no unknowns


def test_extension_is_recommended_on_either_figure(tiny_tokenizer, shared_data):
    sw = fertility(tiny_tokenizer, lines(shared_data, "sw"), script="Latn")
    ug = fertility(tiny_tokenizer, lines(shared_data, "ug"), script="Arab")
    bo = fertility(tiny_tokenizer, lines(shared_data, "bo"), script="Tibt")
    assert extension_reasons(sw, 0.6, 4.0) == []
    # Tokens per word alone: Uyghur spelled in bytes needs many tokens a word.
    assert ug["tokens_per_word"] > 4
    assert extension_reasons(ug, min_chars_per_token=0.01, max_tokens_per_word=4.0) == [
        f"{ug['tokens_per_word']:.2f} tokens per word > tokenizer.max_tokens_per_word = 4.0"]
    assert len(extension_reasons(ug, 0.6, 4.0)) == 2
    # Tibetan does not space its words: only characters per token count.
    assert bo["tokens_per_word"] is None and extension_reasons(bo, 0.01, 1.0) == []
    assert extension_reasons(bo, 0.6, 1.0) == [
        f"{bo['chars_per_token']:.2f} characters per token < tokenizer.min_chars_per_token = 0.6"]


@pytest.mark.parametrize("lang,tie", [("te", True), ("ja", False)])
def test_vocabulary_extension_lowers_fertility_and_the_model_runs(lang, tie, tmp_path, tiny_llama_factory,
                                                                  corpus_text):
    base_dir, base_state = tiny_llama_factory("base", tie=tie)
    loaded = load_language(lang, overrides=["tokenizer.extend_vocab=true", "tokenizer.new_pieces=200",
                                            "tokenizer.sp_vocab_size=1500"])
    text = corpus_text(loaded, tmp_path / "text")
    out = tmp_path / "tokenizer"
    out.mkdir()
    report = write_tokenizer_report(loaded, base_dir, text, out)
    assert json.loads((out / "fertility.json").read_text()) == report
    assert report["recommend_extension"]
    for split in ("train", "heldout"):  # held-out text was not seen by sentencepiece either
        assert report["extended"][split]["chars_per_token"] > 1.4 * report["base"][split]["chars_per_token"]
    assert report["extension"]["added"] == 200 and report["extension"]["vocab_after"] == 712

    model_dir = out / "model"
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for doc in read_heldout(text)[:20]:
        assert tok.decode(tok(doc, add_special_tokens=False)["input_ids"]) == doc

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 712
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    doc = read_heldout(text)[0]
    ids = tok(doc, return_tensors="pt").input_ids[:, :200]
    assert (ids >= 512).any()  # the new pieces are used
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    pieces = json.loads((out / "pieces.json").read_text())
    stored = load_file(str(model_dir / "model.safetensors"))
    for piece in pieces[:5]:
        spelled = base_tok(piece["piece"], add_special_tokens=False)["input_ids"]
        assert spelled == piece["spelled_by"] and len(spelled) > 1
        want = base_state["model.embed_tokens.weight"][spelled].mean(0)
        torch.testing.assert_close(stored["model.embed_tokens.weight"][piece["id"]], want)
        if not tie:
            torch.testing.assert_close(stored["lm_head.weight"][piece["id"]], base_state["lm_head.weight"][spelled].mean(0))
    # The base rows are untouched.
    torch.testing.assert_close(stored["model.embed_tokens.weight"][:512], base_state["model.embed_tokens.weight"],
                               rtol=0, atol=0)
