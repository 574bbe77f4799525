"""SFT stage: the loss mask covers exactly the rendered prompt, a few steps lower the loss on the training
problems, and data errors name their source."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.config.language import LoraSettings, SftConfig, SftData, TrainConfig
from workbench.errors import DataError, HubUnavailableError
from workbench.pipelines.prompts import ENGLISH_TEMPLATE, PromptFormat, answer_text, prompt_text
from workbench.pipelines.sft import load_pairs, tokenize_pair, train_sft

FMT = PromptFormat(template=ENGLISH_TEMPLATE)


def word_problems(n=48):
    """Short English problems with worked answers, as the task expert's SFT data looks."""
    out = []
    for i in range(n):
        a, b = 2 + i % 7, 3 + i % 5
        out.append((f"Amina has {a} apples and buys {b} more. How many apples does she have?",
                    f"She has {a} + {b} = {a + b} apples. The answer is {a + b}."))
    return out


def write_tsv(path, pairs, header=False):
    rows = (["question\tanswer"] if header else []) + [f"{q}\t{a}" for q, a in pairs]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("chat", [True, False])
def test_labels_are_ignored_exactly_on_the_prompt(chat, tiny_tokenizer_dir, shared_data):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    if not chat:
        tok.chat_template = None
    pairs = load_pairs(SftData(path=str(shared_data / "mgsm" / "mgsm_en.tsv"), max_rows=5))
    assert len(pairs) == 5 and pairs[0][1].strip().isdigit()  # MGSM: question<TAB>number, no header row
    for question, answer in pairs + word_problems(3):
        item = tokenize_pair(tok, FMT, question, answer, max_length=512)
        prompt_len = len(tok(prompt_text(tok, FMT, question), add_special_tokens=False)["input_ids"])
        assert item["prompt_tokens"] == prompt_len
        assert item["labels"][:prompt_len] == [-100] * prompt_len
        assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:] and -100 not in item["labels"][prompt_len:]
        assert tok.decode(item["input_ids"]) == prompt_text(tok, FMT, question) + answer_text(tok, answer)
    question, answer = word_problems(1)[0]
    full = tokenize_pair(tok, FMT, question, answer, max_length=512)
    cut = tokenize_pair(tok, FMT, question, answer, max_length=full["prompt_tokens"] + 3)
    assert len(cut["input_ids"]) == full["prompt_tokens"] + 3 and cut["labels"][-3:] == full["input_ids"][-len(full["input_ids"]) + full["prompt_tokens"]:][:3]
    assert tokenize_pair(tok, FMT, question, answer, max_length=full["prompt_tokens"]) is None


def answer_loss(model_dir, tok, pairs):
    """Mean loss over the answer tokens of the pairs (prompt tokens masked)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for q, a in pairs:
            item = tokenize_pair(tok, FMT, q, a, max_length=256)
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def test_sft_lowers_the_loss_on_the_training_problems(tmp_path, tiny_llama_factory, tiny_tokenizer):
    base_dir, _ = tiny_llama_factory("base", tie=True)
    pairs = word_problems(48)
    cfg = SftConfig(data=SftData(path=str(write_tsv(tmp_path / "train.tsv", pairs, header=True))), max_length=128,
                    train=TrainConfig(method="lora", lora=LoraSettings(rank=8, dropout=0.0, train_embeddings=True),
                                      learning_rate=1e-2, max_steps=12, batch_size=8, save_steps=6, eval_steps=6,
                                      logging_steps=3))
    out = tmp_path / "expert"
    out.mkdir()
    record = train_sft(cfg, base_dir, out, FMT, name="math")
    assert record["steps"] == 12 and sorted(p.name for p in out.iterdir()) == ["log_history.json", "model"]
    assert (record["pairs"], record["eval_pairs"], record["train_pairs"], record["dropped_too_long"]) == (48, 2, 46, 0)
    assert record["final_eval_loss"] < record["initial_eval_loss"]
    before = answer_loss(base_dir, tiny_tokenizer, pairs[:16])
    after = answer_loss(out / "model", tiny_tokenizer, pairs[:16])
    assert after < before - 1.0, (before, after)  # nats per answer token
    assert not (out / "model" / "adapter_config.json").exists()
    # Only real tokens are counted: the batches are padded per batch.
    lengths = [len(tokenize_pair(tiny_tokenizer, FMT, q, a, 128)["input_ids"]) for q, a in pairs]
    assert record["tokens_seen"] < 12 * 8 * max(lengths)


def test_jsonl_fields_and_errors_name_the_source(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in word_problems(4)))
    data = SftData(path=str(path), question_field="instruction", answer_field="output", max_rows=3)
    assert load_pairs(data) == word_problems(3)
    with pytest.raises(DataError, match=r"source '.*pairs.jsonl': no column 'question'; the data has: instruction, output"):
        load_pairs(SftData(path=str(path)))
    with pytest.raises(DataError, match=r"source 'missing.tsv': .*missing.tsv: no such file"):
        load_pairs(SftData(path="missing.tsv"), config_dir=tmp_path)
    with pytest.raises(HubUnavailableError, match=r"cannot reach the data set 'microsoft/orca-math-word-problems-200k'"):
        load_pairs(SftData(hub="microsoft/orca-math-word-problems-200k"))  # HF_HUB_OFFLINE=1 in the tests


def test_generated_problems_feed_sft(tmp_path, tiny_llama_factory):
    base_dir, _ = tiny_llama_factory("base")
    pairs = load_pairs(SftData(generated=24, lang="en", seed=0))
    assert len(pairs) == 24 and all(q and a for q, a in pairs)
    cfg = SftConfig(data=SftData(generated=24, lang="en", seed=0), max_length=192,
                    train=TrainConfig(max_steps=2, batch_size=4, save_steps=2, eval_steps=2))
    (tmp_path / "expert").mkdir()
    assert train_sft(cfg, base_dir, tmp_path / "expert", FMT)["steps"] == 2
