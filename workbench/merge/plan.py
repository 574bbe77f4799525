"""Plan a merge: for every output tensor, which operation, which inputs, which shape and dtype.

validate (recipe, compatibility) → plan (this module) → stream (engine). A plan reads no tensor data;
the only data it needs is the delta profile when a layer swap chooses its blocks `auto`.
"""
from dataclasses import dataclass, field

import torch

from workbench.errors import ConfigError
from workbench.merge.layer_swap import SwapPlan, plan_layer_swap
from workbench.merge.layers import num_layers, place_of
from workbench.merge.recipe import MergeRecipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TensorOp:
    """How one output tensor is made.

    kind `merge`: `recipe`'s method over its base and models; `copy`: the tensor of model `source`;
    `swap`: (1 − α)·middle + α·language, where middle is `recipe`'s merge or the task expert's tensor.
    """

    name: str
    shape: tuple
    dtype: torch.dtype
    kind: str
    recipe: MergeRecipe | None = None
    source: str | None = None
    alpha: float | None = None
    language: str | None = None
    layer: int | None = None
    extra: tuple = ()  # more models read: the extended-vocabulary model, for its new rows


    def inputs(self) -> list[str]:
        """Every model this op reads."""
        refs = []
        if self.kind == "copy":
            refs.append(self.source)
        if self.recipe is not None and self.kind in ("merge", "swap"):
            refs += self.recipe.references()
        elif self.kind == "swap":
            refs.append(self.source)
        if self.kind == "swap":
            refs.append(self.language)
        return list(dict.fromkeys(refs + list(self.extra)))


@dataclass
class MergePlan:
    ops: list
    config_source: str  # the model whose config and tokenizer files go with the output
    extended: str | None  # the model with an extended vocabulary, if any (docs/design.md §4.6a)
    shared_rows: int | None  # V: rows the models share in the embedding and LM head
    swap: SwapPlan | None = None
    notes: list = field(default_factory=list)


def _primary(recipe: MergeRecipe) -> str:
    """The model whose tensors an `auto` dtype follows: the base, the task expert for a swap, else the first."""
    if recipe.method == "layer_swap":
        return recipe.layer_swap.task
    return recipe.base or recipe.models[0].model


def _source_role(recipe: MergeRecipe, role: str) -> str:
    swap = recipe.layer_swap
    ref = {"language": swap.language, "task": swap.task, "base": recipe.base}[role]
    if ref is None:
        raise ConfigError(f"layer_swap takes a tensor from the base, but the recipe names no base model")
    return ref


def build_plan(recipe: MergeRecipe, compat, dtypes: dict, profiles: dict | None = None) -> MergePlan:
    """`compat` is the CompatReport of all inputs; `dtypes[ref][name]` their stored dtypes; `profiles` the
    per-layer delta profiles (only for layer_swap `auto`), keyed by model reference."""
    if recipe.layer_swap is not None and recipe.layer_swap.middle is not None:
        middle = recipe.layer_swap.middle
        if middle.method == "layer_swap" or middle.scope == "model":
            raise ConfigError("layer_swap.middle: expected a per-tensor recipe (linear, task_arithmetic, ties, "
                              f"ties_sv, dare_ties with scope 'tensor'), got method {middle.method!r} "
                              f"with scope {middle.scope!r}")
    primary = _primary(recipe)
    fixed = DTYPES.get(recipe.dtype)
    extended = compat.extended_vocab
    swap = None
    if recipe.method == "layer_swap":
        cfg = recipe.layer_swap
        rel_lang = rel_task = None
        if profiles is not None:
            rel_lang = profiles[cfg.language]["layer_relative_change"]
            rel_task = profiles[cfg.task]["layer_relative_change"]
        swap = plan_layer_swap(cfg, num_layers(compat.names), rel_lang, rel_task)
    ops = []
    for name in compat.names:
        shape = tuple(compat.output_shape(name))
        dtype = fixed or dtypes[primary].get(name) or compat.dtypes[name]
        if swap is None:
            ops.append(TensorOp(name, shape, dtype, "merge", recipe=recipe))
            continue
        ops.append(_swap_op(recipe, swap, name, shape, dtype))
    config_source = extended or primary
    rows = None
    if extended is not None:
        embed = next((n for n in compat.names if place_of(n).kind == "embed"), None)
        rows = compat.shapes[embed][0] if embed else None
        for op in ops:
            if op.shape != tuple(compat.shapes[op.name]):
                op.extra = (extended,)
    return MergePlan(ops=ops, config_source=config_source, extended=extended, shared_rows=rows, swap=swap,
                     notes=list(swap.notes) if swap else [])


def _swap_op(recipe, swap: SwapPlan, name, shape, dtype) -> TensorOp:
    cfg = recipe.layer_swap
    place = place_of(name)
    if place.layer is None:
        role = {"embed": cfg.embeddings, "lm_head": cfg.lm_head, "final_norm": cfg.final_norm}.get(place.kind, "task")
        return TensorOp(name, shape, dtype, "copy", source=_source_role(recipe, role))
    alpha = swap.alphas[place.layer]
    if alpha == 1.0:
        return TensorOp(name, shape, dtype, "copy", source=cfg.language, layer=place.layer)
    if alpha == 0.0:
        if cfg.middle is not None:
            return TensorOp(name, shape, dtype, "merge", recipe=cfg.middle, layer=place.layer)
        return TensorOp(name, shape, dtype, "copy", source=cfg.task, layer=place.layer)
    return TensorOp(name, shape, dtype, "swap", recipe=cfg.middle, source=cfg.task, alpha=alpha,
                    language=cfg.language, layer=place.layer)
