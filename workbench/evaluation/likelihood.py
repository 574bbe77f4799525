"""Solution NLL: how likely a model finds the gold worked solution of a problem, given the prompt.

Per item, the mean negative log-likelihood per token of the solution's tokens, teacher-forced after the
prompt's tokens (which are context, not scored):

    nll(item) = -(1/|s|) Σ_{t in s} log p(x_t | x_<t),   s = the solution's token positions

and, of the same sum, bits per character of the solution text that was scored:

    bpc(item) = -(1/(ln 2 · chars(s))) Σ_{t in s} log p(x_t | x_<t)

Per token, two models compare only when they cut the solution into the same tokens: a model with an extended
vocabulary scores fewer, longer tokens of a Telugu solution than the base, so its NLL per token is higher for
the same likelihood of the text. Per character they compare across tokenizers, as bits per character of
held-out text do (`perplexity.py`).

A continuous measure of the task skill where accuracy sits at the floor: a model that cannot yet solve a
problem may still find its worked answer more or less likely. No generation, so it is cheap enough for many
more items than accuracy; the per-item values are kept for paired comparisons (`paired.py`).

The prompt is tokenized as generation tokenizes it (the tokenizer's special tokens unless the prompt came from
a chat template) and the solution on its own without special tokens, then the two are concatenated: the
token boundary the SFT stage trains on.
"""
import math

from workbench.evaluation.perplexity import row_nll, token_batches


def solution_token_ids(tokenizer, prompt: str, solution: str, max_length: int) -> tuple[list[int], int]:
    """(prompt + solution token ids, index of the first solution token), cut to `max_length` from the left
    (the prompt's start goes first; a solution longer than `max_length - 1` tokens keeps its beginning)."""
    add_special = not getattr(tokenizer, "chat_template", None)
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    if not solution_ids:
        raise ValueError(f"the solution {solution!r} has no tokens")
    solution_ids = solution_ids[:max_length - 1]
    keep = max(1, max_length - len(solution_ids))
    return prompt_ids[-keep:] + solution_ids, min(len(prompt_ids), keep)


def solution_nll(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 8,
                 max_batch_tokens: int = 2048, max_length: int | None = None) -> list[dict]:
    """Per (prompt, solution) pair, in order: {"nll" (mean per solution token), "tokens" (solution tokens),
    "characters" (of the solution text scored), "bits_per_char"}.

    Pairs are batched by length (`row_nll`), at most `batch_size` rows and `max_batch_tokens` padded
    tokens a batch. `max_length` defaults to the model's context, capped at 1024.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    max_length = min(max_length or 1024, limit)
    rows = [solution_token_ids(tokenizer, p, s, max_length) for p, s in pairs]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    results = [None] * len(rows)
    done = 0
    for batch in token_batches([rows[i][0] for i in order], batch_size, max_batch_tokens):
        index = order[done:done + len(batch)]
        sums, counts = row_nll(model, batch, [rows[i][1] for i in index])
        for i, total, count in zip(index, sums, counts):
            chars = _scored_characters(tokenizer, pairs[i][1], rows[i][0][rows[i][1]:])
            results[i] = {"nll": total / count, "tokens": count, "characters": chars,
                          "bits_per_char": total / math.log(2) / chars}
        done += len(batch)
    return results


def _scored_characters(tokenizer, solution: str, kept_ids: list[int]) -> int:
    """Characters of the solution text behind `kept_ids`: the whole solution unless `max_length` cut it, then
    the decoded kept tokens (at least 1)."""
    whole = tokenizer(solution, add_special_tokens=False)["input_ids"]
    if len(kept_ids) == len(whole):
        return len(solution)
    return max(1, len(tokenizer.decode(kept_ids)))
