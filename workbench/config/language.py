"""The per-language pipeline config (`languages/*.yaml`): data sources, prompt, and profiles.

A profile names everything one run needs: the base model, the corpus settings, the tokenizer check,
the language expert (continual pretraining, or fetched), the task experts (fetched, or SFT), the merge
recipes and the evaluation. Stages read only their own section, so a stage's cache key is the hash of
its section plus the outputs it consumes.
"""
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from workbench.config.schema import Where, exactly_one, number, option
from workbench.merge.recipe import MergeRecipe

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_HUB_NAME = re.compile(r"[A-Za-z0-9_.-]{1,96}")


def hub_id_problem(text: str, owner_required: bool = True) -> str | None:
    """What is wrong with a Hugging Face Hub id (the hub's own rules: OWNER/NAME, each 1-96 letters, digits,
    '-', '_' or '.', neither starting nor ending with '-' or '.', no '--' or '..'), or None."""
    parts = text.split("/")
    if len(parts) > 2 or (owner_required and len(parts) != 2):
        return "expected OWNER/NAME" if owner_required else "expected NAME or OWNER/NAME"
    for part in parts:
        if not _HUB_NAME.fullmatch(part) or part[0] in "-." or part[-1] in "-." or "--" in part or ".." in part:
            shown = part if len(part) <= 100 else f"{part[:40]}...({len(part)} characters)"
            return (f"{shown!r} is not a hub name (1 to 96 letters, digits, '-', '_' or '.', not starting or "
                    f"ending with '-' or '.', without '--' or '..')")
    return None


@dataclass(kw_only=True)
class DataSource:
    """Text from a local file (path relative to the YAML) or a Hugging Face data set."""

    path: Optional[str] = option(None, doc=".txt (one document a line), .jsonl, .parquet or .tsv")
    hub: Optional[str] = option(None, doc="data set id on the Hugging Face Hub")
    config: Optional[str] = option(None, doc="data set config (subset) name")
    split: str = option("train")
    revision: Optional[str] = option(None)
    text_field: str = option("text", doc="column holding the text (jsonl, parquet, tsv, hub)")
    streaming: bool = option(False, doc="stream a large hub data set instead of downloading it whole")
    filter: dict[str, str] = option(default_factory=dict, doc="keep rows whose column equals the value")
    max_rows: Optional[int] = number(None, lo=1, doc="read at most this many rows")
    gated: bool = option(False, doc="the data set needs an access agreement on the hub")
    license: Optional[str] = option(None)
    description: Optional[str] = option(None)

    def validate(self, where: Where):
        exactly_one(self, ("path", "hub"), where)
        problem = hub_id_problem(self.hub, owner_required=False) if self.hub is not None else None
        if problem:
            raise (where / "hub").error(f"{problem}, got {self.hub!r}")


@dataclass(kw_only=True)
class ModelSource:
    """A model: hub id + revision, a local directory, or a GGUF file (local, or carried by a Python package)."""

    hub: Optional[str] = option(None, doc="model id on the Hugging Face Hub")
    revision: str = option("main", nonempty=True, doc="branch, tag or commit of the hub repository")
    path: Optional[str] = option(None, doc="local model directory (relative to the YAML or absolute)")
    gguf: Optional[str] = option(None, doc="a .gguf file: a local path, or a file inside `package`")
    package: Optional[str] = option(None, doc="Python package (import name) that carries the gguf file")
    install: Optional[str] = option(None, doc="the command that installs `package`")
    gated: bool = option(False, doc="the model needs an access agreement on the hub")
    license: Optional[str] = option(None)
    description: Optional[str] = option(None)
    provenance: Optional[str] = option(None, doc="the hub model (OWNER/NAME[@REVISION]) a gguf or local copy "
                                                 "comes from; model cards name it")
    allow_pickle: Optional[Literal["weights_only"]] = option(
        None, doc="read a model released only as pickled *.bin/*.pt weights: loaded with "
                  "torch.load(weights_only=True) (tensors only, never code) and converted once to safetensors "
                  "in the cache; without it pickles are refused")

    def validate(self, where: Where):
        exactly_one(self, ("hub", "path", "gguf"), where)
        problem = hub_id_problem(self.hub) if self.hub is not None else None
        if problem:
            raise (where / "hub").error(f"{problem}, got {self.hub!r}")
        if self.package is not None and self.gguf is None:
            raise (where / "package").error("a package carries a gguf file; expected the key gguf too")
        if self.allow_pickle is not None and self.gguf is not None:
            raise (where / "allow_pickle").error("a GGUF file holds no pickles; expected allow_pickle only on a "
                                                 "hub or path source")
        if self.provenance is not None:
            repo = self.provenance.partition("@")[0]
            if repo.count("/") != 1 or not all(repo.split("/")) or " " in self.provenance:
                raise (where / "provenance").error(f"expected a hub id OWNER/NAME or OWNER/NAME@REVISION, "
                                                   f"got {self.provenance!r}")

    def label(self) -> str:
        if self.hub:
            return f"{self.hub}@{self.revision}"
        if self.gguf and self.package:
            return f"{self.package}:{self.gguf}"
        return self.path or self.gguf


@dataclass(kw_only=True)
class Exemplar:
    """A worked example for n-shot prompts."""

    question: str = option(nonempty=True)
    answer: str = option(nonempty=True, doc="the worked answer, ending in the number")


@dataclass(kw_only=True)
class PromptConfig:
    """How an MGSM-style question is put to the model in this language."""

    template: str = option(nonempty=True, doc="contains {question}")
    system: Optional[str] = option(None, doc="system message when the model has a chat template")
    exemplars: list[Exemplar] = option(default_factory=list)

    def validate(self, where: Where):
        if "{question}" not in self.template:
            raise (where / "template").error(f"expected a template containing {{question}}, got {self.template!r}")


@dataclass(kw_only=True)
class ReplayConfig:
    """English (or other) text mixed into the CT data so the model keeps what it knew."""

    sources: list[str] = option(nonempty=True, doc="names from the language's sources")
    ratio: float = number(0.2, lo=0, hi=1, hi_open=True, doc="share of replay tokens in the training mix")


@dataclass(kw_only=True)
class CorpusConfig:
    sources: list[str] = option(nonempty=True, doc="names from the language's sources")
    max_tokens: Optional[int] = number(None, lo=1, hi=10**13, doc="token budget of the target-language text")
    min_chars: int = number(20, lo=0, doc="shorter documents are dropped")
    dedup: bool = option(True, doc="exact deduplication by hash")
    heldout_fraction: float = number(0.05, lo=0, hi=0.5, lo_open=True, doc="documents kept aside for perplexity")
    replay: Optional[ReplayConfig] = option(None)
    block_size: int = number(256, lo=8, doc="tokens per packed training block")
    seed: int = number(0, lo=0)


@dataclass(kw_only=True)
class TokenizerConfig:
    check: bool = option(True, doc="write the fertility report")
    extend_vocab: bool = option(False, doc="train sentencepiece on the corpus and add new pieces")
    new_pieces: int = number(1000, lo=1, doc="how many new pieces to add at most")
    sp_vocab_size: int = number(4000, lo=100, doc="sentencepiece model size trained on the corpus")
    sp_model_type: Literal["bpe", "unigram"] = option("bpe", doc="sentencepiece model type")
    min_chars_per_token: float = number(0.6, lo=0, lo_open=True,
                                        doc="below this, the report recommends vocabulary extension")
    max_tokens_per_word: float = number(4.0, lo=1, doc="above this (scripts with spaces between words), the "
                                                       "report recommends vocabulary extension")


@dataclass(kw_only=True)
class LoraSettings:
    rank: int = number(16, lo=1)
    alpha: float = number(32, lo=0, lo_open=True)
    dropout: float = number(0.05, lo=0, hi=1, hi_open=True)
    target_modules: list[str] = option(default_factory=lambda: list(LORA_TARGETS), nonempty=True)
    train_embeddings: bool = option(False, doc="also train the embeddings and LM head (needed for new rows)")


@dataclass(kw_only=True)
class TrainConfig:
    """One Trainer run (CT or SFT): LoRA or full fine-tuning."""

    method: Literal["lora", "full"] = option("lora")
    lora: LoraSettings = option(default_factory=LoraSettings)
    learning_rate: float = number(2e-4, lo=0, hi=1, lo_open=True)
    max_steps: int = number(100, lo=1)
    batch_size: int = number(8, lo=1, doc="sequences per device per step")
    grad_accum: int = number(1, lo=1)
    warmup_ratio: float = number(0.05, lo=0, hi=1, hi_open=True)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine")
    weight_decay: float = number(0.0, lo=0, hi=1)
    max_grad_norm: float = number(1.0, lo=0, lo_open=True)
    gradient_checkpointing: bool = option(False)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", doc="auto: bf16 on GPU, fp32 on CPU")
    save_steps: int = number(50, lo=1, doc="checkpoint every N steps (resume from the last)")
    eval_steps: int = number(50, lo=1, doc="held-out perplexity every N steps")
    logging_steps: int = number(5, lo=1)
    seed: int = number(0, lo=0)


@dataclass(kw_only=True)
class SftData:
    """Instruction pairs for a task expert's SFT."""

    generated: Optional[int] = number(None, lo=1, doc="this many generated English word problems")
    hub: Optional[str] = option(None, doc="data set id, e.g. microsoft/orca-math-word-problems-200k")
    path: Optional[str] = option(None, doc="local .tsv (question<TAB>answer) or .jsonl")
    config: Optional[str] = option(None)
    split: str = option("train")
    revision: Optional[str] = option(None)
    question_field: str = option("question")
    answer_field: str = option("answer")
    filter: dict[str, str] = option(default_factory=dict, doc="keep rows whose column equals the value")
    max_rows: Optional[int] = number(None, lo=1)
    lang: str = option("en", doc="language of generated problems")
    seed: int = number(0, lo=0)

    def validate(self, where: Where):
        exactly_one(self, ("generated", "hub", "path"), where)


@dataclass(kw_only=True)
class SftConfig:
    data: SftData = option()
    train: TrainConfig = option(default_factory=TrainConfig)
    max_length: int = number(256, lo=16, doc="tokens per rendered (prompt, answer) pair")
    from_: Literal["base", "language"] = option("base", key="from", doc="the model SFT starts from: the base, or "
                                                "the language expert (Tao et al.'s CT-then-SFT baseline)")


@dataclass(kw_only=True)
class LanguageExpertConfig:
    """The language expert: continual pretraining of the base (default), SFT on target-language
    instructions (the Layer Swapping paper's choice), or a released model."""

    fetch: Optional[ModelSource] = option(None, doc="use this model; CT is skipped")
    sft: Optional[SftConfig] = option(None, doc="instruction SFT instead of CT")
    pretrain: TrainConfig = option(default_factory=TrainConfig, doc="CT settings (used when neither is set)")

    def validate(self, where: Where):
        if self.fetch is not None and self.sft is not None:
            raise where.error("expected at most one of fetch, sft, got both")


@dataclass(kw_only=True)
class TaskExpertConfig:
    """A task expert (math, chat, ...): fetched, or trained by the SFT stage."""

    task: str = option("math", nonempty=True)
    fetch: Optional[ModelSource] = option(None)
    sft: Optional[SftConfig] = option(None)

    def validate(self, where: Where):
        exactly_one(self, ("fetch", "sft"), where)


@dataclass(kw_only=True)
class MgsmEvalConfig:
    """A sample of the real MGSM file of the language (local TSV, or the hub copy)."""

    path: Optional[str] = option(None, doc="question<TAB>answer file")
    hub: Optional[str] = option(None, doc="e.g. juletxara/mgsm")
    config: Optional[str] = option(None)
    split: str = option("test")
    samples: int = number(40, lo=1)


@dataclass(kw_only=True)
class EvalConfig:
    perplexity_docs: int = number(40, lo=1, doc="held-out documents scored for perplexity")
    generated_problems: int = number(40, lo=0, doc="generated problems per language (target and English)")
    generated_in: Literal["target_and_english", "english"] = option(
        "target_and_english", doc="english: only the English problems (task retention), for a language without "
                                  "word-problem templates")
    generated_seed: int = number(1234, lo=0)
    solution_nll_items: int = number(200, lo=0, doc="problems per set scored by solution NLL (generated in the "
                                                    "language and in English, MGSM): likelihood, no generation")
    mgsm: Optional[MgsmEvalConfig] = option(None)
    n_shot: int = number(0, lo=0)
    max_new_tokens: int = number(48, lo=1)
    batch_size: int = number(8, lo=1)
    lm_eval: list[str] = option(default_factory=list, doc="lm-eval task names, when lm-eval and the hub are there")
    baselines: list[str] = option(default_factory=list, doc="task experts or merges that are the papers' baselines "
                                  "(ct_then_sft, model_soup): every other merge is compared with each of them")
    lm_eval_include: Optional[str] = option(None, doc="a folder of your own lm-eval task YAMLs (relative to the "
                                                      "language file); tasks whose data is local run offline")


@dataclass(kw_only=True)
class ExportConfig:
    """The optional export stage: the recommended model as one GGUF file with an Ollama Modelfile."""

    gguf: Literal["f16", "bf16", "q8_0"] = option("q8_0", doc="storage of the weight matrices")


@dataclass(kw_only=True)
class Profile:
    description: str = option(nonempty=True)
    base: ModelSource = option()
    corpus: CorpusConfig = option()
    tokenizer: TokenizerConfig = option(default_factory=TokenizerConfig)
    language_expert: LanguageExpertConfig = option(default_factory=LanguageExpertConfig)
    experts: dict[str, TaskExpertConfig] = option(nonempty=True, doc="task experts by name")
    merges: dict[str, MergeRecipe] = option(nonempty=True, doc="merge recipes by name")
    eval: EvalConfig = option(default_factory=EvalConfig)
    export: Optional[ExportConfig] = option(None, doc="export the recommended model to GGUF after evaluation")
    fast: dict[str, Any] = option(default_factory=dict, doc="dotted-key overrides applied by --fast")
    seed: int = number(0, lo=0)


RESERVED_ROLES = ("base", "language")


@dataclass(kw_only=True)
class LanguageConfig:
    code: str = option(nonempty=True, doc="the code users type: workbench adapt --lang sw")
    name: str = option(nonempty=True)
    native_name: str = option(nonempty=True)
    iso639_3: str = option(nonempty=True)
    iso639_1: Optional[str] = option(None)
    script: str = option(nonempty=True, doc="ISO 15924 code, e.g. Latn, Telu, Beng, Jpan, Tibt, Arab, Cyrl")
    digits: Optional[str] = option(None, doc="the script's own digits 0-9, when it has them")
    sources: dict[str, DataSource] = option(nonempty=True)
    prompt: PromptConfig = option()
    profiles: dict[str, Profile] = option(nonempty=True)

    def validate(self, where: Where):
        if self.digits is not None and len(self.digits) != 10:
            raise (where / "digits").error(f"expected the ten digits 0-9 of the script, got {self.digits!r}")
        for pname, profile in self.profiles.items():
            pw = where / "profiles" / pname
            named = list(profile.corpus.sources) + (profile.corpus.replay.sources if profile.corpus.replay else [])
            for i, src in enumerate(named):
                if src not in self.sources:
                    raise (pw / "corpus").error(f"source {src!r} is not defined; expected one of: "
                                                f"{', '.join(self.sources)}")
            for role in profile.experts:
                if role in RESERVED_ROLES:
                    raise (pw / "experts" / role).error(f"{role!r} is reserved; expected another expert name")
            if profile.language_expert.sft is not None and profile.language_expert.sft.from_ != "base":
                raise (pw / "language_expert" / "sft" / "from").error(
                    f"the language expert's SFT starts from the base; expected 'base', got "
                    f"{profile.language_expert.sft.from_!r}")
            candidates = list(profile.experts) + list(profile.merges)
            for i, name in enumerate(profile.eval.baselines):
                if name not in candidates:
                    raise (pw / "eval" / "baselines" / i).error(
                        f"{name!r} is neither a task expert nor a merge of this profile; expected one of: "
                        f"{', '.join(candidates)}")
            roles = set(RESERVED_ROLES) | set(profile.experts)
            for mname, recipe in profile.merges.items():
                if mname in roles:
                    raise (pw / "merges" / mname).error(f"a merge named {mname!r} would share its name with a model "
                                                        f"of the profile; expected another name")
                for ref in recipe.references():
                    if ref not in roles:
                        raise (pw / "merges" / mname).error(
                            f"model {ref!r} is not a role of this profile; expected one of: {', '.join(sorted(roles))}")
