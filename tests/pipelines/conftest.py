"""Fixtures for the training stages: one CPU thread, and the Swahili config pointed at test files."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from two threads, and on a shared 2-core machine OpenMP's spinning makes
    each step up to 30 times slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sw_config():
    """`load(*overrides)`: the shipped Swahili `micro` profile with `--set`-style overrides (keys relative to the
    profile unless they start with `sources.`), sized for tiny models."""
    from workbench.config.loader import load_language

    small = ["corpus.block_size=64", "language_expert.pretrain.batch_size=4", "language_expert.pretrain.grad_accum=1",
             "language_expert.pretrain.logging_steps=2"]

    def load(*overrides):
        return load_language("sw", profile="micro", overrides=[*small, *overrides])

    return load



def _corpus_text(loaded, folder):
    from workbench.pipelines.corpus import write_corpus_text

    folder.mkdir(parents=True, exist_ok=True)
    write_corpus_text(loaded, folder)
    return folder


def _corpus_blocks(loaded, tokenizer_dir, root):
    from workbench.pipelines.corpus import write_blocks

    text = _corpus_text(loaded, root / "text")
    blocks = root / "blocks"
    blocks.mkdir(exist_ok=True)
    write_blocks(loaded, tokenizer_dir, text, blocks)
    return text, blocks


@pytest.fixture
def corpus_text():
    """`make(loaded, folder)`: the corpus stage's work (`write_corpus_text`) in `folder`; returns the folder."""
    return _corpus_text


@pytest.fixture
def corpus_blocks():
    """`make(loaded, tokenizer_dir, root)`: the corpus and blocks stages' work in two folders under `root`, as
    each stage does in its own; returns (text folder, blocks folder)."""
    return _corpus_blocks
