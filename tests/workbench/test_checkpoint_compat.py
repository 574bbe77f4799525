"""check_compatible: every difference between N models in one error, before anything is written."""
import json
import shutil

import pytest
import torch

from workbench.checkpoint import ModelReader, check_compatible, write_state_dict
from workbench.errors import ConfigError, IncompatibleModelsError, InvalidModelError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _readers(**dirs):
    return {label: ModelReader(path) for label, path in dirs.items()}


def _snapshot(root):
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def _differences(models, **kwargs) -> list[str]:
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible(models, **kwargs)
    assert str(err.value).count("\n  - ") == len(err.value.differences)
    return err.value.differences


def _extended_tokenizer(tiny_tokenizer_dir, out_dir, extra):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    n = len(tok)
    tok.add_tokens([f"swx{i}" for i in range(extra)])
    tok.save_pretrained(out_dir)
    return n


def test_a_family_is_compatible(tiny_family):
    models = _readers(**{label: path for label, (path, _) in tiny_family.items()})
    report = check_compatible(models)
    assert report.reference == "base" and report.labels == ["base", "language", "task"]
    assert report.names == models["base"].names and len(report.names) == 39
    assert report.shapes[EMBED] == (512, 64) and report.output_shape(EMBED) == (512, 64)
    assert report.dtypes[EMBED] == torch.float32
    assert report.vocab_sizes == {"base": 512, "language": 512, "task": 512}
    assert report.tied == {"base": False, "language": False, "task": False}
    assert report.warnings == [] and report.extended_shapes == {}


def test_every_difference_is_listed_at_once_and_nothing_is_written(tiny_llama_factory, tmp_path):
    base_dir, base = tiny_llama_factory("base")
    dropped = "model.layers.3.mlp.up_proj.weight"
    write_state_dict(tmp_path / "missing", {k: v for k, v in base.items() if k != dropped}, source_dir=base_dir)
    write_state_dict(tmp_path / "extra", {**base, "model.layers.0.extra.weight": torch.ones(3)}, source_dir=base_dir)
    wide_dir, _ = tiny_llama_factory("wide", intermediate=192)
    deep_dir, _ = tiny_llama_factory("deep", layers=5)
    vocab_dir, _ = tiny_llama_factory("vocab", vocab_size=600)
    models = _readers(base=base_dir, missing=tmp_path / "missing", extra=tmp_path / "extra", wide=wide_dir,
                      deep=deep_dir, vocab=vocab_dir)
    before = _snapshot(tmp_path)
    diffs = _differences(models)
    assert _snapshot(tmp_path) == before

    expected = [
        f"missing: missing tensor '{dropped}' (stored in 'base')",
        "extra: extra tensor 'model.layers.0.extra.weight' (not stored in 'base')",
        "wide: config intermediate_size = 192, 'base' has 160",
        "deep: config num_hidden_layers = 5, 'base' has 4",
        "vocab: config vocab_size = 600, 'base' has 512",
    ]
    for layer in range(4):
        for proj, shape, ref in (("gate", [192, 64], [160, 64]), ("up", [192, 64], [160, 64]),
                                 ("down", [64, 192], [64, 160])):
            expected.append(f"wide: tensor 'model.layers.{layer}.mlp.{proj}_proj.weight' has shape {shape}, "
                            f"'base' has {ref}")
    deep_extra = [n for n in models["deep"].names if n.startswith("model.layers.4.")]
    assert len(deep_extra) == 9
    expected += [f"deep: extra tensor '{n}' (not stored in 'base')" for n in deep_extra]
    for name in (EMBED, HEAD):
        expected.append(f"vocab: tensor '{name}' has shape [600, 64], 'base' has [512, 64] (if 'vocab' extends "
                        f"the vocabulary, name it as the extended-vocabulary model)")
    assert sorted(diffs) == sorted(expected)


def test_extended_vocabulary_is_allowed_only_in_embedding_and_head(tiny_llama_factory, tiny_tokenizer_dir):
    base_dir, _ = tiny_llama_factory("base")
    task_dir, _ = tiny_llama_factory("task", seed=2)
    lang_dir, _ = tiny_llama_factory("lang", seed=1, vocab_size=600, tokenizer_dir=None)
    _extended_tokenizer(tiny_tokenizer_dir, lang_dir, 600 - 512)
    models = _readers(lang=lang_dir, base=base_dir, task=task_dir)
    with pytest.raises(IncompatibleModelsError):
        check_compatible(models)
    report = check_compatible(models, extended_vocab="lang")
    assert report.reference == "base"
    assert report.extended_shapes == {EMBED: (600, 64), HEAD: (600, 64)}
    assert report.shapes[EMBED] == (512, 64) and report.output_shape(HEAD) == (600, 64)
    assert report.vocab_sizes == {"lang": 600, "base": 512, "task": 512}
    assert report.warnings == []

    # Any other difference of the extended model is still rejected.
    odd_dir, _ = tiny_llama_factory("odd", seed=3, vocab_size=600, intermediate=192, tokenizer_dir=None)
    _extended_tokenizer(tiny_tokenizer_dir, odd_dir, 600 - 512)
    diffs = _differences(_readers(base=base_dir, odd=odd_dir), extended_vocab="odd")
    assert len(diffs) == 13 and "odd: config intermediate_size = 192, 'base' has 160" in diffs
    assert all("may change only the embedding and LM head" in d for d in diffs if "tensor" in d)
    # The extended model may only add rows.
    small_dir, _ = tiny_llama_factory("small", vocab_size=500, tokenizer_dir=None)  # 512 ids fit no 500 rows
    diffs = _differences(_readers(base=base_dir, small=small_dir), extended_vocab="small")
    assert "small: config vocab_size = 500, 'base' has 512" in diffs
    assert f"small: tensor '{EMBED}' has shape [500, 64], 'base' has [512, 64] (an extended vocabulary may " \
           f"only add rows)" in diffs


def test_extended_tokenizer_must_keep_the_first_tokens(tiny_llama_factory, tiny_tokenizer_dir):
    base_dir, _ = tiny_llama_factory("base")
    lang_dir, _ = tiny_llama_factory("lang", vocab_size=600, tokenizer_dir=None)
    _extended_tokenizer(tiny_tokenizer_dir, lang_dir, 88)
    _swap_tokens(lang_dir, 100, 101)
    with pytest.raises(InvalidModelError) as err:  # the tokenizers disprove the extension: no merge at all
        check_compatible(_readers(base=base_dir, lang=lang_dir), extended_vocab="lang")
    assert str(err.value).startswith("lang: has 600 vocabulary rows where base has 512, which can be merged only "
                                     "as an extended vocabulary, and nothing proves one: its tokenizer differs "
                                     "from the one of base at id 100")


def test_plain_tokenizers_must_match(tiny_llama_factory, tmp_path):
    base_dir, _ = tiny_llama_factory("base")
    shutil.copytree(base_dir, tmp_path / "retok")
    _swap_tokens(tmp_path / "retok", 7, 300)
    diffs = _differences(_readers(base=base_dir, retok=tmp_path / "retok"))
    assert len(diffs) == 1 and "retok: tokenizer differs from 'base''s in the vocabulary" in diffs[0]
    assert "first id 7" in diffs[0]


def test_missing_tokenizer_is_a_warning(tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    bare_dir, _ = tiny_llama_factory("bare", tokenizer_dir=None)
    report = check_compatible(_readers(base=base_dir, bare=bare_dir))
    assert len(report.warnings) == 1 and report.warnings[0].startswith("bare: no readable tokenizer")


def test_dtype_difference_is_a_warning_unless_strict(tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    half_dir, _ = tiny_llama_factory("half", dtype=torch.bfloat16)
    models = _readers(base=base_dir, half=half_dir)
    report = check_compatible(models)
    assert report.warnings == [f"half: 39 tensor(s) stored as torch.bfloat16 where 'base' has torch.float32 "
                               f"('{models['base'].names[0]}', '{models['base'].names[1]}', "
                               f"'{models['base'].names[2]}', ...); the merge computes in fp32"]
    diffs = _differences(models, strict_dtype=True)
    assert len(diffs) == 39 and f"half: tensor '{EMBED}' is torch.bfloat16, 'base' has torch.float32" in diffs


def test_tied_and_untied_models_differ(tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    tied_dir, _ = tiny_llama_factory("tied", tie=True)
    diffs = _differences(_readers(base=base_dir, tied=tied_dir))
    assert sorted(diffs) == ["tied: config tie_word_embeddings = True, 'base' has False",
                             f"tied: missing tensor '{HEAD}' (stored in 'base')"]
    report = check_compatible(_readers(a=tied_dir, b=tied_dir))
    assert report.tied == {"a": True, "b": True} and HEAD not in report.names


def test_extended_label_must_be_a_model(tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    with pytest.raises(ConfigError, match="extended_vocab 'lang' is not one of the models"):
        check_compatible(_readers(base=base_dir), extended_vocab="lang")


def _swap_tokens(model_dir, i, j):
    """Swap the ids of two tokens in a tokenizer.json (a tokenizer that looks alike but is not)."""
    path = model_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    by_id = {v: k for k, v in vocab.items()}
    vocab[by_id[i]], vocab[by_id[j]] = j, i
    path.write_text(json.dumps(data), encoding="utf-8")
