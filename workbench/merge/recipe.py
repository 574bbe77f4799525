"""Merge recipes: a merge is data before it is computation (validated in full before any tensor is read).

A recipe is a YAML file for `workbench merge`, or an entry under `profiles.<p>.merges` of a language config.
Model references are model directories in a standalone recipe, or roles in a profile (`base`, `language`,
or a task expert's name such as `math`).
"""
from dataclasses import dataclass
from typing import Literal, Optional, Union

from workbench.config.schema import Where, number, option

METHODS = ("linear", "task_arithmetic", "ties", "ties_sv", "dare_ties", "layer_swap")
Method = Literal["linear", "task_arithmetic", "ties", "ties_sv", "dare_ties", "layer_swap"]
PAPERS = {
    "linear": "Wortsman et al., 2022, Model soups (arXiv:2203.05482)",
    "task_arithmetic": "Ilharco et al., 2023, Editing Models with Task Arithmetic (arXiv:2212.04089)",
    "ties": "Yadav et al., 2023, TIES-Merging (arXiv:2306.01708)",
    "ties_sv": "Tao et al., 2024, Unlocking the Potential of Model Merging for Low-Resource Languages "
               "(arXiv:2407.03994): TIES with a slack variable (this project's reading: docs/design.md §4.5)",
    "dare_ties": "Yu et al., 2024, Language Models are Super Mario (DARE, arXiv:2311.03099) with TIES",
    "layer_swap": "Bandarkar et al., 2024, Layer Swapping for Zero-Shot Cross-Lingual Transfer "
                  "in Large Language Models (arXiv:2410.01335)",
}
TRIMMED = ("ties", "ties_sv", "dare_ties")
# Bound of |w_t| and |λ|: merges use scales near 1; beyond 100 a value is a slip (1e2 for 1e-2) that turns
# the output into noise or, at 1e308, into Inf (λ·w·δ stays finite even in float16 for |δ| below 6).
MAX_SCALE = 100.0


@dataclass(kw_only=True)
class ModelEntry:
    """One expert in a merge with its weight, density (top-k share kept) and slack (TIES-SV)."""

    model: str = option(nonempty=True, doc="model directory, or a role in a profile")
    weight: float = number(1.0, lo=-MAX_SCALE, hi=MAX_SCALE, doc="w_t")
    density: float = number(1.0, lo=0, hi=1, lo_open=True, doc="k_t: share of |delta| kept by the trim")
    slack: float = number(0.0, lo=0, hi=1, doc="s_t: share of |delta| whose sign votes alone in the election "
                                                "(TIES-SV, docs/design.md §4.5); at most the density")

    def validate(self, where: Where):
        if self.slack > self.density:
            raise (where / "slack").error(
                f"expected slack <= density (the protected elements are the top s·n of the kept ones), "
                f"got slack {self.slack:g} > density {self.density:g}")


@dataclass(kw_only=True)
class LayerSwap:
    """Layer swapping with transition zones (Bandarkar et al., 2024; docs/design.md §4.6)."""

    task: str = option(nonempty=True, doc="the task expert: its middle layers are kept")
    language: str = option(nonempty=True, doc="the language expert: its bottom and top layers are swapped in")
    bottom: Union[Literal["auto"], int, None] = option(
        None, doc="layers taken from the language expert at the bottom; 'auto' reads the delta heatmap; "
                  "default round(5L/32), at least 1")
    top: Union[Literal["auto"], int, None] = option(None, doc="likewise at the top; default round(2L/32)")
    transition: int = number(1, lo=0, doc="z: ramp layers on each inner edge of a swapped block")
    embeddings: Literal["language", "task", "base"] = option("language")
    lm_head: Literal["language", "task", "base"] = option("language")
    final_norm: Literal["language", "task", "base"] = option("language")
    middle: Optional["MergeRecipe"] = option(None, doc="a recipe for the kept middle block (e.g. TIES with base)")

    def validate(self, where: Where):
        for key in ("bottom", "top"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 0:
                raise (where / key).error(f"expected 'auto' or an integer >= 0, got {value!r}")
        if self.task == self.language:
            raise (where / "language").error(f"expected a model other than the task expert, got {self.language!r}")


@dataclass(kw_only=True)
class MergeRecipe:
    """A whole merge: method, inputs and parameters (docs/design.md §4)."""

    method: Method = option()
    base: Optional[str] = option(None, doc="θ_b: the model every delta is taken from")
    models: list[ModelEntry] = option(default_factory=list)
    lam: float = number(1.0, lo=-MAX_SCALE, hi=MAX_SCALE, key="lambda", doc="λ: scale of the merged delta")
    normalize: bool = option(True, doc="disjoint mean (true) or plain sum (false) of the agreeing deltas")
    consensus: Literal["sum", "count"] = option("sum", doc="sign election by weighted sum or by count")
    trim_ties: Literal["exact", "keep_all"] = option(
        "exact", doc="elements at the trim threshold: the first ones in flat order until exactly max(1, floor(k·n)) "
                     "are kept (exact, as mergekit counts), or all of them (keep_all, the TIES reference code)")
    scope: Literal["tensor", "model"] = option("tensor", doc="rank |delta| per tensor or over the whole model")
    scope_exclude: list[str] = option(default_factory=lambda: ["embed_tokens", "lm_head"],
                                      doc="name parts kept out of the model-scope pool")
    seed: int = number(0, lo=0, doc="DARE's drop mask seed")
    layer_swap: Optional[LayerSwap] = option(None)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", doc="output dtype")
    device: Literal["auto", "cpu", "cuda"] = option("auto")
    description: Optional[str] = option(None)

    def validate(self, where: Where):
        if self.method == "layer_swap":
            if self.layer_swap is None:
                raise (where / "layer_swap").error("missing required key for method 'layer_swap'; "
                                                   "expected a mapping (task, language, bottom, top, transition, ...)")
            if self.models:
                raise (where / "models").error("method 'layer_swap' takes its models from layer_swap.task and "
                                               "layer_swap.language; expected no models list")
            uses_auto = "auto" in (self.layer_swap.bottom, self.layer_swap.top)
            if uses_auto and self.base is None:
                raise (where / "base").error("layer_swap 'auto' reads the delta heatmap against the base; "
                                             "expected a base model")
            return
        if self.layer_swap is not None:
            raise (where / "layer_swap").error(f"only method 'layer_swap' takes this key, got method {self.method!r}")
        if not self.models:
            raise (where / "models").error("expected a list of at least one model entry, got none")
        if self.method != "linear" and self.base is None:
            raise (where / "base").error(f"method {self.method!r} computes deltas; expected a base model")
        for i, entry in enumerate(self.models):
            if entry.slack > 0 and self.method != "ties_sv":
                raise (where / "models" / i / "slack").error(
                    f"slack applies to method 'ties_sv' only, got {entry.slack:g} with method {self.method!r}")
            if entry.density < 1 and self.method not in TRIMMED:
                raise (where / "models" / i / "density").error(
                    f"density applies to methods {', '.join(TRIMMED)}, got {entry.density:g} "
                    f"with method {self.method!r}")
        if self.method == "linear" and abs(sum(e.weight for e in self.models)) < 1e-12:
            raise (where / "models").error("linear merge weights sum to 0; expected a non-zero sum")
        if self.trim_ties != "exact" and self.method not in ("ties", "ties_sv"):
            raise (where / "trim_ties").error(f"trim_ties applies to ties and ties_sv, got {self.trim_ties!r} "
                                              f"with method {self.method!r}")
        if self.scope == "model" and self.method not in ("ties", "ties_sv"):
            raise (where / "scope").error(f"scope 'model' applies to ties and ties_sv, got method {self.method!r}")

    def references(self) -> list[str]:
        """Every model this recipe reads, base first, without repeats."""
        refs = [self.base] if self.base else []
        if self.layer_swap is not None:
            refs += [self.layer_swap.task, self.layer_swap.language]
            if self.layer_swap.middle is not None:
                refs += self.layer_swap.middle.references()
        refs += [e.model for e in self.models]
        return list(dict.fromkeys(refs))
