"""Batched greedy generation with left padding and a stop rule.

Stop rule: a sequence ends at the end-of-sequence / end-of-turn token (the tokenizer's EOS, the
generation config's EOS ids, and `<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>` where the
vocabulary has them), or when it writes one of the stop strings, normally the prompt template's question
prefix ("Question:", "Swali:"): a model that starts a new question has finished its answer. The output is
cut before the first stop string, so the answer extractor never reads a made-up follow-up question.
"""
import torch

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def load_model(path, *, device: str | None = None):
    """(model, tokenizer) from a model directory, in eval mode: fp32 on CPU, bf16 on a GPU that has it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS and end-of-turn token ids that end a generated answer."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


def question_prefix(template: str) -> str | None:
    """The words before `{question}` in a prompt template ("Swali:"), the natural stop string."""
    prefix = template.split("{question}")[0].strip()
    return prefix or None


def cut_at_stop(text: str, stop_strings) -> str:
    """`text` up to the first stop string."""
    for s in stop_strings:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 8,
             stop_strings=()) -> list[str]:
    """Greedy continuations of `prompts` (in their order), cut at the stop strings.

    Prompts rendered by a chat template already hold their special tokens, so the tokenizer adds none
    to them; plain prompts get the tokenizer's own (e.g. BOS).
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    add_special = not getattr(tokenizer, "chat_template", None)
    stop_strings = [s for s in stop_strings if s]
    eos = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths per batch
    outputs = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=add_special).to(model.device)
        extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, **extra)
        for i, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            outputs[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings)
    return outputs
