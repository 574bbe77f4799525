"""How a word problem is put to a model, the same way in SFT (training) and evaluation (testing).

With a chat template, a question is a user turn holding the language's template filled in (after an
optional system turn, and n-shot exemplars as earlier user/assistant turns); the model's answer is the
assistant turn. Without one, the same texts are joined by blank lines and the answer follows the template
after a space. Training and evaluation both call `prompt_text`, so a task expert trained on English
problems is tested on exactly the format it learned, in the target language's words.
"""
from dataclasses import dataclass, field

from workbench.errors import ConfigError

# MGSM's English prompt words (Shi et al., 2022), used for English SFT and English evaluation.
ENGLISH_TEMPLATE = "Question: {question}\nStep-by-Step Answer:"


@dataclass(frozen=True)
class PromptFormat:
    """A language's prompt: the template (with {question}), an optional system turn and exemplars."""

    template: str = ENGLISH_TEMPLATE
    system: str | None = None
    exemplars: tuple = field(default=())  # ((question, answer), ...)

    @classmethod
    def from_config(cls, prompt_cfg) -> "PromptFormat":
        """From a language config's `prompt` section."""
        return cls(template=prompt_cfg.template, system=prompt_cfg.system,
                   exemplars=tuple((e.question, e.answer) for e in prompt_cfg.exemplars))


def messages(fmt: PromptFormat, question: str, n_shot: int = 0) -> list[dict]:
    """The chat turns that ask `question` (the model's answer comes next)."""
    if n_shot > len(fmt.exemplars):
        raise ConfigError(f"n_shot {n_shot} asks for more exemplars than the prompt has ({len(fmt.exemplars)}); "
                          f"add exemplars to the language config's prompt.exemplars or lower eval.n_shot")
    turns = [{"role": "system", "content": fmt.system}] if fmt.system else []
    for q, a in fmt.exemplars[:n_shot]:
        turns += [{"role": "user", "content": fmt.template.format(question=q)},
                  {"role": "assistant", "content": a}]
    turns.append({"role": "user", "content": fmt.template.format(question=question)})
    return turns


def prompt_text(tokenizer, fmt: PromptFormat, question: str, n_shot: int = 0) -> str:
    """The exact text the model sees before its answer (special tokens included where the template adds them)."""
    turns = messages(fmt, question, n_shot)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    parts = []
    for turn in turns:
        if turn["role"] == "assistant":
            parts[-1] = parts[-1] + " " + turn["content"]
        else:
            parts.append(turn["content"])
    return "\n\n".join(parts) + " "


def answer_text(tokenizer, answer: str) -> str:
    """The target the model learns after `prompt_text`: the answer, then the end of its turn."""
    eos = tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        # The chat template ends an assistant turn with its own end marker; use what it renders.
        full = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}],
                                             tokenize=False)
        head = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True)
        if full.startswith(head):
            return full[len(head):]
    return answer + eos
