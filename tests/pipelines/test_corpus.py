"""Corpus stage on real text and the tiny tokenizer: dedup, budget, replay ratio and packing are exact
(counted in tokens), held-out documents never reach the training blocks, and each user error names its source."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from workbench.errors import ConfigError, DataError, HubUnavailableError
from workbench.pipelines.adapt import build_graph
from workbench.pipelines.corpus import clean_text, read_heldout


def test_clean_text_nfc_whitespace_and_blank_lines():
    assert clean_text("cafe\u0301  na\tchai \u00a0 ") == "caf\u00e9 na chai"
    assert clean_text("  a \r\n\r\n\r\n\n b\x00 ") == "a\n\nb"


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def messy_sw(tmp_path, shared_data):
    """300 real Swahili paragraphs + 20 duplicates (some differing only in whitespace) + 5 short lines + blanks."""
    real = (shared_data / "corpus" / "sw.txt").read_text(encoding="utf-8").splitlines()
    real = [line for line in real if len(clean_text(line)) >= 20][:300]
    dups = [real[i] for i in range(0, 20, 2)] + ["  " + real[i].replace(" ", "   ") for i in range(1, 20, 2)]
    lines = real[:150] + dups + ["fupi", "ndiyo", "hapana.", "asante", "sawa"] + ["", "   "] + real[150:]
    return write_lines(tmp_path / "sw.txt", lines), real


def test_dedup_budget_replay_and_packing_are_exact(tmp_path, messy_sw, shared_data, sw_config, tiny_tokenizer_dir,
                                                   corpus_blocks):
    path, real = messy_sw
    replay = write_lines(tmp_path / "en.txt", (shared_data / "corpus" / "en.txt").read_text().splitlines()[:400])
    loaded = sw_config(f"sources.shipped.path={path}", f"sources.english.path={replay}", "corpus.max_tokens=6000",
                       "corpus.replay.ratio=0.25", "corpus.heldout_fraction=0.1", "corpus.seed=3")
    text_dir, blocks_dir = corpus_blocks(loaded, tiny_tokenizer_dir, tmp_path / "run")
    stats = json.loads((blocks_dir / "stats.json").read_text())
    t, tok = stats["target"], stats["tokens"]
    assert (t["documents_read"], t["dropped_short"], t["dropped_duplicate"], t["kept"]) == (325, 5, 20, 300)
    assert t["heldout"] == 30 and t["train"] == 270  # round(0.1 · 300)

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    eos = tokenizer.eos_token_id
    import datasets

    train_docs = list(datasets.load_from_disk(str(text_dir / "target"))["text"])
    lengths = [len(ids) for ids in tokenizer(train_docs, add_special_tokens=False)["input_ids"]]
    # The budget: whole documents in order, the one crossing 6000 cut so that exactly 6000 tokens are taken.
    used = int(np.searchsorted(np.cumsum(lengths), 6000) + 1)
    assert tok["target"] == 6000 and t["used"] == used
    assert tok["replay"] == round(0.25 / 0.75 * 6000) == 2000
    assert tok["replay_share"] == pytest.approx(0.25, abs=1e-3)
    assert tok["eos"] == used + stats["replay"]["used"]

    blocks = np.load(blocks_dir / "train_blocks.npy")
    stream_len = tok["target"] + tok["replay"] + tok["eos"]
    assert blocks.shape == (stream_len // 64, 64) and tok["dropped_tail"] == stream_len % 64
    assert blocks.dtype == np.int32

    # Split the packed stream at EOS: every whole segment is a training or replay document (or one of the two
    # budget-cut ones); no segment is a held-out document.
    segments = np.split(blocks.reshape(-1), np.flatnonzero(blocks.reshape(-1) == eos) + 1)
    texts = [tokenizer.decode(s[:-1]) for s in segments if len(s) and s[-1] == eos]
    heldout = read_heldout(blocks_dir)
    assert len(heldout) == 30 and not set(heldout) & set(texts)
    replay_docs = set(datasets.load_from_disk(str(text_dir / "replay"))["text"])
    assert sum(text not in set(train_docs) and text not in replay_docs for text in texts) <= 2
    assert not set(heldout) & set(train_docs)
    held_blocks = np.load(blocks_dir / "heldout_blocks.npy")
    held_tokens = sum(len(i) + 1 for i in tokenizer(heldout, add_special_tokens=False)["input_ids"])
    assert held_blocks.shape == (held_tokens // 64, 64)


def test_corpus_stages_are_cached_by_their_inputs(tmp_path, messy_sw, sw_config, tiny_llama_factory):
    path, _ = messy_sw
    base_dir, _ = tiny_llama_factory("base")
    loaded = sw_config(f"sources.shipped.path={path}", "corpus.replay=null", f"base={{path: {base_dir}}}")

    def blocks():
        return build_graph(loaded, tmp_path / "run").execute(until="blocks", log=lambda *_: None)["blocks"]

    first = blocks()
    folder = Path(first["outputs"]["corpus_stage"])
    assert folder == Path(first["path"]) and folder.parent == tmp_path / "run" / "stages"
    mtime = (folder / "train_blocks.npy").stat().st_mtime_ns
    again = blocks()
    assert again == first and (folder / "train_blocks.npy").stat().st_mtime_ns == mtime
    assert json.loads((folder / "stats.json").read_text())["tokens"]["replay"] == 0
    with open(path, "a", encoding="utf-8") as f:
        f.write("Sentensi mpya kabisa ambayo haikuwepo kabla ya leo.\n")
    assert blocks()["path"] != first["path"]


def test_jsonl_parquet_and_tsv_sources_with_filter_and_max_rows(tmp_path, shared_data, sw_config, corpus_text):
    lines = [l for l in (shared_data / "corpus" / "sw.txt").read_text().splitlines() if len(l) > 40][:120]
    rows = [{"body": line, "lang": "sw" if i % 3 else "en"} for i, line in enumerate(lines)]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "docs.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "docs.tsv", sep="\t", index=False)
    for name in ("docs.jsonl", "docs.parquet", "docs.tsv"):
        loaded = sw_config(f"sources.shipped.path={tmp_path / name}", "sources.shipped.text_field=body",
                           "sources.shipped.filter={lang: sw}", "sources.shipped.max_rows=50", "corpus.replay=null")
        folder = corpus_text(loaded, tmp_path / name.replace(".", "-"))
        stats = json.loads((folder / "stats.json").read_text())["target"]
        assert stats["documents_read"] == 50 and stats["kept"] == 50, name


def test_missing_local_source_names_it(tmp_path, sw_config, tiny_tokenizer_dir, corpus_blocks):
    loaded = sw_config(f"sources.shipped.path={tmp_path / 'nowhere.txt'}")
    with pytest.raises(DataError, match=r"source 'shipped': .*nowhere\.txt: no such file"):
        corpus_blocks(loaded, tiny_tokenizer_dir, tmp_path / "run")


def test_unreachable_hub_source_names_the_data_set_and_the_local_way(tmp_path, sw_config, tiny_tokenizer_dir,
                                                                    corpus_blocks):
    loaded = sw_config("corpus.sources=[wikipedia]", "corpus.replay=null")
    with pytest.raises(HubUnavailableError, match=r"source 'wikipedia': cannot reach the data set 'wikimedia/wikipedia' "
                                                  r"\(config '20231101.sw'\).*point the source at a local file"):
        corpus_blocks(loaded, tiny_tokenizer_dir, tmp_path / "run")


def test_empty_after_filter_names_source_and_filter(tmp_path, sw_config, tiny_tokenizer_dir, corpus_blocks):
    (tmp_path / "d.jsonl").write_text('{"text": "Habari ya asubuhi, rafiki yangu mpendwa.", "lang": "sw"}\n')
    loaded = sw_config(f"sources.shipped.path={tmp_path / 'd.jsonl'}", "sources.shipped.filter={lang: xx}")
    with pytest.raises(DataError, match=r"source 'shipped': no documents after filter \{'lang': 'xx'\}"):
        corpus_blocks(loaded, tiny_tokenizer_dir, tmp_path / "run")
    loaded = sw_config(f"sources.shipped.path={tmp_path / 'd.jsonl'}", "corpus.min_chars=100", "corpus.replay=null")
    with pytest.raises(DataError, match=r"corpus: no documents left from sources shipped .*1 shorter than "
                                        r"corpus.min_chars = 100"):
        corpus_blocks(loaded, tiny_tokenizer_dir, tmp_path / "run")


def test_budget_smaller_than_a_block_names_the_keys(tmp_path, sw_config, tiny_tokenizer_dir, corpus_blocks):
    loaded = sw_config("corpus.max_tokens=50")
    with pytest.raises(ConfigError, match=r"profiles.micro.corpus.max_tokens: a budget of 50 tokens is smaller than "
                                          r"one block \(languages/sw.yaml: profiles.micro.corpus.block_size = 64\)"):
        corpus_blocks(loaded, tiny_tokenizer_dir, tmp_path / "run")


def test_tokenizer_without_eos_is_named(tmp_path, sw_config, tiny_tokenizer_dir, corpus_blocks):
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        (no_eos / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"no_eos: the tokenizer has no EOS token"):
        corpus_blocks(sw_config(), no_eos, tmp_path / "run")
