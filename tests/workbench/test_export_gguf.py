"""GGUF export on tiny real Llamas: transformers' own GGUF reader loads the file back, and its logits and token
ids are compared with the safetensors model and its tokenizer.

Tolerances (logits of the same token ids, float32 forward passes, scaled by the largest |logit| of the
source model):
- f16 and bf16 weights: max |Δ| <= 2e-3 and 1e-2 of max |logit| (rounding of every weight to 11 or 8 bits);
- q8_0 weights (one 8-bit code per weight, one f16 scale per block of 32): max |Δ| <= 0.1 of max |logit|,
  mean KL divergence of the next-token distributions <= 0.01 nats, and the same top token at >= 90% of the
  positions. Measured on SmolLM2-135M (2026-12): f16 1.1e-3 of max |logit|; q8_0 5.3e-2, mean KL 0.0026,
  top token 94.5%.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.errors import CheckpointError, ConfigError, UnsupportedModelError
from workbench.export.gguf_export import export_gguf

REPO = Path(__file__).resolve().parents[2]
CORPORA = sorted((REPO / "languages" / "corpora").glob("*.txt"))
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 0.1}


def one_sentence_per_language() -> dict:
    """The first line of at least 40 characters of every shipped corpus, cut at 300 characters."""
    out = {}
    for path in CORPORA:
        line = next(l for l in path.read_text(encoding="utf-8").splitlines() if len(l) >= 40)
        out[path.stem] = line[:300]
    return out


def load_back(gguf_path):
    from workbench.pipelines.fetch import load_gguf

    return load_gguf(Path(gguf_path))


def source(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def assert_logits_close(src, back, ids, out_type):
    with torch.no_grad():
        expected, got = src(ids).logits, back(ids).logits
    scale = expected.abs().max().item()
    worst = (expected - got).abs().max().item()
    assert worst <= TOLERANCE[out_type] * scale, f"{out_type}: max |Δlogit| {worst:.4g} of max |logit| {scale:.4g}"
    if out_type == "q8_0":
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        assert kl.mean().item() <= 0.01, f"q8_0: mean KL {kl.mean().item():.4g} nats"
        assert (expected.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.9


def assert_same_token_ids(src_tok, back_tok):
    for lang, text in one_sentence_per_language().items():
        assert back_tok(text)["input_ids"] == src_tok(text)["input_ids"], lang
    chat = [{"role": "user", "content": "Habari?"}]
    assert back_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        src_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_round_trip_through_transformers(tmp_path, tiny_llama_factory, out_type):
    model_dir, _ = tiny_llama_factory("tiny", seed=3)
    result = export_gguf(model_dir, tmp_path / "tiny.gguf", out_type=out_type, progress=False)
    assert result.path.is_file() and result.tensors == 4 * 9 + 3
    src, src_tok = source(model_dir)
    back, back_tok = load_back(result.path)
    assert not back.config.tie_word_embeddings
    ids = torch.tensor([src_tok(t)["input_ids"][:48] for t in list(one_sentence_per_language().values())[:4]])
    assert_logits_close(src, back, ids, out_type)
    assert_same_token_ids(src_tok, back_tok)


def test_tied_embeddings_store_no_output_tensor(tmp_path, tiny_llama_factory):
    from gguf import GGUFReader

    model_dir, _ = tiny_llama_factory("tied", seed=4, tie=True)
    result = export_gguf(model_dir, tmp_path / "tied.gguf", out_type="f16", progress=False)
    names = {t.name for t in GGUFReader(result.path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    src, src_tok = source(model_dir)
    back, _ = load_back(result.path)
    assert back.config.tie_word_embeddings
    assert_logits_close(src, back, torch.tensor([src_tok("Habari ya asubuhi, rafiki yangu.")["input_ids"]]), "f16")


def test_metadata_that_llama_cpp_reads(tmp_path, tiny_llama_factory):
    from gguf import GGUFReader

    model_dir, _ = tiny_llama_factory("meta", seed=5)
    result = export_gguf(model_dir, tmp_path / "meta.gguf", out_type="q8_0", progress=False)
    fields = GGUFReader(result.path).fields

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama" and value("general.file_type") == 7  # MOSTLY_Q8_0
    assert (value("llama.block_count"), value("llama.embedding_length"), value("llama.feed_forward_length")) == \
        (4, 64, 160)
    assert (value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (4, 2)
    assert value("llama.rope.dimension_count") == 16 and value("llama.rope.freq_base") == 10000.0
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == 512 and tokens[3] == "<|im_end|>" and types[3] == 3  # CONTROL
    assert value("tokenizer.ggml.eos_token_id") == 3 and value("tokenizer.ggml.bos_token_id") == 1
    assert value("tokenizer.chat_template").startswith("{% for message in messages %}")
    assert len(value("tokenizer.ggml.merges")) > 100
    manifest = json.loads(result.manifest.read_text())
    from workbench.provenance import file_sha256

    assert manifest["sha256"] == file_sha256(result.path) == result.sha256
    assert manifest["bytes"] == result.path.stat().st_size and manifest["type"] == "q8_0"
    assert manifest["stop_tokens"] == ["<|im_end|>"]


def test_extended_vocabulary_is_exported_with_all_rows(tmp_path, tiny_llama_factory, shared_data):
    """A vocabulary extension (DESIGN §4.6a) made by the tokenizer stage, plus padding rows beyond it."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.pipelines.tokenizer import extend_vocabulary

    base_dir, _ = tiny_llama_factory("base", seed=6)
    texts = (shared_data / "corpus" / "sw.txt").read_text(encoding="utf-8").splitlines()[:300]
    extended = tmp_path / "extended"
    info = extend_vocabulary(base_dir, extended, texts, new_pieces=20, sp_vocab_size=600, sp_model_type="bpe")
    assert info["vocab_after"] > 512
    model = AutoModelForCausalLM.from_pretrained(extended)
    rows = 64 * -(-info["vocab_after"] // 64) + 64  # padded past the tokenizer, as some checkpoints are
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(extended)
    result = export_gguf(extended, tmp_path / "ext.gguf", out_type="f16", progress=False)
    reader = GGUFReader(result.path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert int(embd.shape[1]) == rows
    tokens, types = reader.fields["tokenizer.ggml.tokens"].contents(), reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == rows and reader.fields["llama.vocab_size"].contents() == rows
    tok = AutoTokenizer.from_pretrained(extended)
    for piece in info["pieces"]:  # new pieces: user-defined, raw text (llama.cpp matches them on the input)
        assert tokens[piece["id"]] == piece["piece"] and types[piece["id"]] == 4
    assert tokens[-1] == f"[PAD{rows - 1}]" and types[-1] == 5 and result.notes
    src = AutoModelForCausalLM.from_pretrained(extended, dtype=torch.float32)
    back, _ = load_back(result.path)
    new_ids = [p["id"] for p in info["pieces"]]
    ids = torch.tensor([tok(texts[0])["input_ids"][:20] + new_ids + [rows - 1]])
    assert_logits_close(src, back, ids, "f16")


def test_sentencepiece_tokenizer_round_trip(tmp_path, tiny_llama_factory, shared_data):
    """A Llama-2-style tokenizer (SentencePiece BPE with byte fallback) exported as `llama` with scores."""
    import sentencepiece as spm
    from gguf import GGUFReader
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    text = tmp_path / "train.txt"
    lines = []
    for lang in ("sw", "en"):
        lines += (shared_data / "corpus" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:300]
    text.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    tok_dir = tmp_path / "sp_tok"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores))  # as transformers converts it
    assert tokenizer("Habari ✓", add_special_tokens=False)["input_ids"] == sp.encode("Habari ✓")
    tokenizer.save_pretrained(tok_dir)
    model_dir, _ = tiny_llama_factory("spm", seed=7, vocab_size=len(tokenizer), tokenizer_dir=tok_dir)
    result = export_gguf(model_dir, tmp_path / "spm.gguf", out_type="f16", progress=False)
    fields = GGUFReader(result.path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types.count(6) == 256  # byte-fallback pieces <0x00>..<0xFF>
    src, src_tok = source(model_dir)
    back, back_tok = load_back(result.path)
    for lang in ("sw", "en"):
        sentence = one_sentence_per_language()[lang]
        assert back_tok(sentence)["input_ids"] == src_tok(sentence)["input_ids"], lang
    assert_logits_close(src, back, torch.tensor([src_tok(one_sentence_per_language()["sw"])["input_ids"][:40]]),
                        "f16")


def llama_cpp_llama3_divisors(theta, dim, factor, low, high, original):
    """llama.cpp converter's rope_freqs for Llama 3 scaling, written out here as an independent reference."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_rope_settings(tmp_path, tiny_llama_factory):
    from gguf import GGUFReader

    model_dir, _ = tiny_llama_factory("rope", seed=8)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (model_dir / "config.json").write_text(json.dumps(config))
    reader = GGUFReader(export_gguf(model_dir, tmp_path / "l3.gguf", progress=False).path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    expected = llama_cpp_llama3_divisors(500000.0, 16, 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(np.asarray(freqs.data, dtype=np.float64), expected, rtol=1e-6)
    assert reader.fields["llama.rope.freq_base"].contents() == 500000.0
    config["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    fields = GGUFReader(export_gguf(model_dir, tmp_path / "lin.gguf", progress=False).path).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"rope type 'yarn'.*expected one of: default, linear, llama3"):
        export_gguf(model_dir, tmp_path / "yarn.gguf", progress=False)
    assert not (tmp_path / "yarn.gguf").exists()


def leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def test_bad_input_is_refused_before_anything_is_written(tmp_path, tiny_llama_factory, tiny_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=512)).save_pretrained(gpt2)
    with pytest.raises(UnsupportedModelError, match=r"config.json: architecture GPT2LMHeadModel cannot be exported.*"
                                                    r"expected one of: LlamaForCausalLM, MistralForCausalLM"):
        export_gguf(gpt2, out_dir / "a.gguf", progress=False)
    bare, _ = tiny_llama_factory("bare", seed=9, tokenizer_dir=None)
    with pytest.raises(CheckpointError, match=r"bare: no tokenizer \(expected tokenizer.json or a SentencePiece"):
        export_gguf(bare, out_dir / "b.gguf", progress=False)
    with pytest.raises(ConfigError, match=r"expected an output file name ending in .gguf"):
        export_gguf(bare, out_dir / "b.bin", progress=False)
    assert leftovers(out_dir) == []
    good, _ = tiny_llama_factory("good", seed=10)
    existing = out_dir / "c.gguf"
    existing.write_bytes(b"an older export")
    with pytest.raises(ConfigError, match=r"c.gguf exists; pass --force to replace it"):
        export_gguf(good, existing, progress=False)
    assert existing.read_bytes() == b"an older export"
    export_gguf(good, existing, force=True, progress=False)
    assert existing.read_bytes()[:4] == b"GGUF" and leftovers(out_dir) == ["c.gguf", "c.gguf.json"]


def test_a_failure_while_writing_leaves_no_partial_file(tmp_path, tiny_llama_factory, monkeypatch):
    """An export that fails midway (here: the fifth tensor cannot be converted) leaves the folder as it was,
    including an earlier export it was asked to replace."""
    from workbench.export import gguf_export

    model_dir, _ = tiny_llama_factory("m", seed=11)
    out = tmp_path / "out" / "m.gguf"
    first = export_gguf(model_dir, out, progress=False)
    before = out.read_bytes(), first.manifest.read_text()
    calls = []
    real = gguf_export.tensor_data

    def failing(plan, reader, model):
        calls.append(plan.name)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(plan, reader, model)

    monkeypatch.setattr(gguf_export, "tensor_data", failing)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(model_dir, out, out_type="q8_0", force=True, progress=False)
    assert len(calls) == 5
    assert (out.read_bytes(), first.manifest.read_text()) == before
    assert leftovers(out.parent) == ["m.gguf", "m.gguf.json"]


@pytest.fixture(scope="module")
def smollm2_source(smollm2_dir):
    return source(smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_smollm2_round_trip(tmp_path, smollm2_dir, smollm2_source, out_type):
    """The real micro base: tied embeddings, a 49152-token byte-level BPE with 17 control tokens, ChatML."""
    from gguf import GGUFReader

    result = export_gguf(smollm2_dir, tmp_path / f"smollm2-{out_type}.gguf", out_type=out_type, progress=False)
    reader = GGUFReader(result.path)
    assert "output.weight" not in {t.name for t in reader.tensors} and result.tensors == 272
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # what the converted tokenizer.json does
    assert result.stop_tokens == ["<|im_end|>"]
    src, src_tok = smollm2_source
    back, back_tok = load_back(result.path)
    ids = torch.tensor([src_tok(t)["input_ids"][:32] for t in list(one_sentence_per_language().values())[:4]])
    assert_logits_close(src, back, ids, out_type)
    assert_same_token_ids(src_tok, back_tok)
