"""The Ollama `Modelfile` that goes beside an exported GGUF: FROM the file, the chat template in Ollama's (Go)
template syntax, the default system prompt, and the stop tokens.

A Jinja chat template cannot be translated to Go templates in general. Chat formats can: a format here is
data (how a turn starts and ends, the generation prompt), and the Go template is written from that data.
The model's Jinja template is recognised as a format by rendering both on probe conversations (as
transformers renders it) and comparing the text; a template that matches no format gets no TEMPLATE line,
and Ollama then picks one from the chat template stored in the GGUF, as it does for any GGUF it imports.
"""
from dataclasses import dataclass
from pathlib import Path

PROBE = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: each message is `turn` with {role} and {content} filled in; `generation` opens the
    assistant's reply; `stops` end a reply."""

    name: str
    turn: str
    generation: str
    stops: tuple

    def render(self, messages) -> str:
        """What Ollama's template renders for `messages` (the Go template below, in Python)."""
        return "".join(self.turn.format(role=m["role"], content=m["content"]) for m in messages) + self.generation

    def go_template(self) -> str:
        turn = self.turn.replace("{role}", "{{ .Role }}").replace("{content}", "{{ .Content }}")
        return "{{- range .Messages }}" + turn + "{{ end }}" + self.generation


FORMATS = (
    ChatFormat("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFormat("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
)


@dataclass(frozen=True)
class RecognisedTemplate:
    format: ChatFormat
    default_system: str | None  # what the template says when the conversation has no system message


def render_jinja(template: str, messages, *, add_generation_prompt=True, bos_token="", eos_token="") -> str:
    """A chat template rendered as transformers renders it (sandboxed Jinja, trimmed blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)


def recognise(template: str | None, *, bos_token: str = "") -> RecognisedTemplate | None:
    """The chat format a Jinja template renders, or None."""
    from jinja2.exceptions import TemplateError

    if not template:
        return None
    if "bos_token" not in template:
        bos_token = ""  # the template writes no BOS of its own (SmolLM2's BOS is <|im_start|>: never strip that)
    try:
        full = _strip(render_jinja(template, PROBE, bos_token=bos_token), bos_token)
        alone = _strip(render_jinja(template, PROBE[1:2], bos_token=bos_token), bos_token)
    except TemplateError:  # e.g. a template that refuses system messages: not a format we know
        return None
    for fmt in FORMATS:
        if full != fmt.render(PROBE):
            continue
        if alone == fmt.render(PROBE[1:2]):
            return RecognisedTemplate(fmt, None)
        for_user = fmt.render(PROBE[1:2])
        head = alone[: len(alone) - len(for_user)]
        prefix, _, suffix = fmt.turn.format(role="system", content="\0").partition("\0")
        if alone.endswith(for_user) and head.startswith(prefix) and head.endswith(suffix):
            return RecognisedTemplate(fmt, head[len(prefix): len(head) - len(suffix)])
    return None


def _strip(text: str, bos: str) -> str:
    """llama.cpp adds BOS itself where the model wants it, so a template's own BOS is not compared."""
    return text[len(bos):] if bos and text.startswith(bos) else text


def render_modelfile(gguf_name: str, *, chat_template: str | None, stop_tokens=(), bos_token: str = "",
                     model_name: str = "MODEL") -> str:
    """The Modelfile text for the GGUF file `gguf_name` in the same folder."""
    recognised = recognise(chat_template, bos_token=bos_token)
    lines = [f"# Ollama: ollama create {model_name} -f Modelfile && ollama run {model_name}",
             f"FROM ./{gguf_name}", ""]
    stops = list(stop_tokens)
    if recognised is None:
        lines += ["# The model's chat template matches no format workbench translates; Ollama takes one from",
                  "# the chat template stored in the GGUF file.", ""]
    else:
        lines += [f"# Chat format: {recognised.format.name} (translated from the model's chat template)",
                  f'TEMPLATE """{recognised.format.go_template()}"""', ""]
        if recognised.default_system:
            lines += [f'SYSTEM """{recognised.default_system}"""', ""]
        stops += [s for s in recognised.format.stops if s not in stops]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines).rstrip() + "\n"


def write_modelfile(gguf_path, *, chat_template, stop_tokens=(), bos_token="", model_name="MODEL") -> Path:
    """Write `Modelfile` beside `gguf_path` (replacing one that is there) and return its path."""
    import os

    gguf_path = Path(gguf_path)
    path = gguf_path.parent / "Modelfile"
    tmp = path.with_name(f".Modelfile.tmp-{os.getpid()}")
    tmp.write_text(render_modelfile(gguf_path.name, chat_template=chat_template, stop_tokens=stop_tokens,
                                    bos_token=bos_token, model_name=model_name), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_commands(gguf_path, name: str) -> dict:
    """How to run an exported file: {"ollama": ..., "llama_cpp": ...} (the Modelfile is beside the file)."""
    gguf_path = Path(gguf_path)
    return {"ollama": f"cd {gguf_path.parent} && ollama create {name} -f Modelfile && ollama run {name}",
            "llama_cpp": f"llama-cli -m {gguf_path} -cnv"}


def ollama_name(text: str) -> str:
    """A name Ollama accepts for a model: lower case letters, digits, '-', '_' and '.'."""
    import re

    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"
