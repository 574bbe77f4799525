"""Perplexity on held-out text: token-weighted mean negative log-likelihood over documents, exponentiated.

Each document is tokenized on its own (with the special tokens the tokenizer adds, e.g. BOS) and cut into
windows of at most `max_length` tokens that overlap by one token, so every token after the document's
first is scored exactly once, with the context of its own window (the context restarts at a window
boundary: a cheaper, slightly pessimistic choice than a sliding window). Windows are batched (`row_nll`);
the NLL is computed in fp32 from the logits.

Per-token perplexity compares only models that share a tokenizer: a tokenizer that cuts a script into
byte pieces predicts many easy tokens. Bits per character (the summed NLL over the documents' characters)
compares across tokenizers, e.g. a model with an extended vocabulary against its base; a document's first
token, when no BOS precedes it, is not scored by either.
"""
import math

import torch
import torch.nn.functional as F


def windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most `max_length` tokens with a one-token overlap (each scores tokens 1..)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    stride = max_length - 1
    return [ids[start:start + max_length] for start in range(0, max(len(ids) - 1, 1), stride)
            if len(ids[start:start + max_length]) >= 2]


@torch.inference_mode()
def row_nll(model, batch: list[list[int]], starts: list[int] | None = None) -> tuple[list[float], list[int]]:
    """Teacher-forced NLL of each row of a batch: (summed NLL, scored tokens) per row.

    Row i scores its tokens from position `starts[i]` on (default 1: every token after the first), each given
    all the tokens before it; the NLL is computed in fp32 from the logits. Rows are padded on the left (with
    their own position ids), so every row's scored tokens end at the last position and the model computes
    logits only for the last positions any row scores: where only a short answer is scored after a long
    prompt, the vocabulary-wide logits of the prompt are never made.
    """
    starts = starts or [1] * len(batch)
    width = max(len(w) for w in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    scored = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, (w, start) in enumerate(zip(batch, starts)):
        if not 1 <= start <= len(w):
            raise ValueError(f"row {i}: the first scored position must be in 1..{len(w)}, got {start}")
        pad = width - len(w)
        input_ids[i, pad:] = torch.tensor(w)
        mask[i, pad:] = 1
        scored[i, pad + start:] = True
    keep = int(scored.sum(dim=1).max()) + 1  # logits at the positions before the scored tokens
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    input_ids, mask, scored = input_ids.to(model.device), mask.to(model.device), scored.to(model.device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions.to(model.device),
                   logits_to_keep=keep).logits[:, :-1].float()
    labels = input_ids[:, width - keep + 1:].masked_fill(~scored[:, width - keep + 1:], -100)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(dim=1).tolist(), (labels != -100).sum(dim=1).tolist()


def window_nll(model, batch: list[list[int]]) -> tuple[float, int]:
    """Summed NLL and the number of scored tokens of a batch of windows."""
    sums, counts = row_nll(model, batch)
    return sum(sums), sum(counts)


def token_batches(pieces: list[list[int]], batch_size: int, max_batch_tokens: int) -> list[list[list[int]]]:
    """Consecutive batches of at most `batch_size` windows and `max_batch_tokens` padded tokens (a window
    longer than the budget goes alone): the logits, vocabulary-wide per token, stay within a fixed size."""
    batches, current, width = [], [], 0
    for piece in pieces:
        wider = max(width, len(piece))
        if current and (len(current) == batch_size or (len(current) + 1) * wider > max_batch_tokens):
            batches.append(current)
            current, wider = [], len(piece)
        current.append(piece)
        width = wider
    return batches + ([current] if current else [])


def perplexity(model, tokenizer, docs: list[str], *, max_length: int | None = None, batch_size: int = 8,
               max_batch_tokens: int = 2048) -> dict:
    """{"perplexity", "nll" (mean per token), "tokens" (scored), "documents", "characters",
    "bits_per_char"} of `docs` under `model`.

    `max_length` defaults to the model's context (`max_position_embeddings`), capped at 1024. A batch holds
    at most `batch_size` windows and `max_batch_tokens` padded tokens (with a 49K vocabulary, 2048 tokens
    of fp32 logits are 0.4 GB).
    """
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    max_length = min(max_length or 1024, limit)
    pieces = [w for doc in docs if doc.strip()
              for w in windows(tokenizer(doc, add_special_tokens=True)["input_ids"], max_length)]
    pieces.sort(key=len)  # similar lengths per batch: less padding
    total, count = 0.0, 0
    for batch in token_batches(pieces, batch_size, max_batch_tokens):
        nll, n = window_nll(model, batch)
        total += nll
        count += n
    chars = sum(len(doc) for doc in docs if doc.strip())
    if count == 0:
        return {"perplexity": float("nan"), "nll": float("nan"), "tokens": 0, "documents": len(docs),
                "characters": chars, "bits_per_char": float("nan")}
    return {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count, "documents": len(docs),
            "characters": chars, "bits_per_char": total / math.log(2) / chars}
