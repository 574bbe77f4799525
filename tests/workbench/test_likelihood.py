"""Solution NLL on a tiny real Llama: the batched, masked value equals a hand computation from the model's
logits, item by item, whatever the batching."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workbench.evaluation.likelihood import solution_nll, solution_token_ids


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=3, pad_token_id=4)
    return LlamaForCausalLM(cfg).eval()


PAIRS = [("<|im_start|>user\nSwali: Juma ana maembe 3 na ananunua 4 zaidi.<|im_end|>\n<|im_start|>assistant\n",
          "3 + 4 = 7. Jibu ni 7."),
         ("<|im_start|>user\nQuestion: Tom has 12 books.<|im_end|>\n<|im_start|>assistant\n",
          "Tom has 12 books and gives away 5. 12 - 5 = 7. The answer is 7."),
         ("<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n", "7")]


def by_hand(model, tokenizer, prompt, solution):
    """-(1/|s|) Σ log softmax(logits[t-1])[x_t] over the solution's positions t, one unpadded sequence."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + solution_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    total = -sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1]))
    return total / len(solution_ids), len(solution_ids)


def test_solution_nll_matches_the_logits_by_hand(tiny_model, tiny_tokenizer):
    expected = [by_hand(tiny_model, tiny_tokenizer, p, s) for p, s in PAIRS]
    for batch_size, budget in ((1, 2048), (3, 2048), (3, 40)):
        got = solution_nll(tiny_model, tiny_tokenizer, PAIRS, batch_size=batch_size, max_batch_tokens=budget)
        assert [g["tokens"] for g in got] == [n for _, n in expected]
        for g, (nll, _) in zip(got, expected):
            assert g["nll"] == pytest.approx(nll, rel=1e-5)
        for g, (nll, n), (_, solution) in zip(got, expected, PAIRS):
            # The same sum per character of the solution: bits per character compare across tokenizers.
            assert g["characters"] == len(solution)
            assert g["bits_per_char"] == pytest.approx(nll * n / math.log(2) / len(solution), rel=1e-5)
    # Untrained, a model is close to uniform over the vocabulary: about log(512) nats a token.
    assert all(abs(g["nll"] - math.log(512)) < 1.0 for g in got)


def test_a_cut_solution_counts_only_the_characters_it_scored(tiny_model, tiny_tokenizer):
    whole = solution_nll(tiny_model, tiny_tokenizer, PAIRS[1:2])[0]
    cut = solution_nll(tiny_model, tiny_tokenizer, PAIRS[1:2], max_length=12)[0]
    ids, start = solution_token_ids(tiny_tokenizer, *PAIRS[1], max_length=12)
    assert cut["tokens"] == len(ids) - start < whole["tokens"]
    assert cut["characters"] == len(tiny_tokenizer.decode(ids[start:])) < len(PAIRS[1][1])


def test_long_pairs_keep_the_solution_and_the_prompt_end(tiny_tokenizer):
    ids, start = solution_token_ids(tiny_tokenizer, PAIRS[1][0], PAIRS[1][1], max_length=20)
    solution = tiny_tokenizer(PAIRS[1][1], add_special_tokens=False)["input_ids"]
    prompt = tiny_tokenizer(PAIRS[1][0], add_special_tokens=False)["input_ids"]
    assert len(ids) == 20 and ids[start:] == solution[:20 - start] and ids[:start] == prompt[-start:]
    with pytest.raises(ValueError, match="no tokens"):
        solution_token_ids(tiny_tokenizer, "a", "", max_length=20)
