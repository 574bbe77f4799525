"""check_compatible: do N models share tensor names, shapes and architecture? Every difference, at once."""
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from workbench.checkpoint.consistency import check_consistent
from workbench.checkpoint.reader import EMBED, LM_HEAD, ModelReader
from workbench.checkpoint.tokenizer_vocab import token_strings
from workbench.errors import ConfigError, IncompatibleModelsError, InvalidModelError

ARCH_KEYS = ("model_type", "architectures", "num_hidden_layers", "hidden_size", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size")
VOCAB_TENSORS = (EMBED, LM_HEAD)
_ABSENT = object()


@dataclass
class CompatReport:
    """What the models share: `names` (in the reference's file order) with the reference's shapes and dtypes.

    With an extended vocabulary, `extended_shapes` holds the extended model's larger embedding and LM head
    shapes (rows [0, V) are shared, rows [V, V') are its own; docs/design.md §4.6a).
    """

    reference: str
    labels: list[str]
    names: list[str] = field(repr=False)
    shapes: dict[str, tuple] = field(repr=False)
    dtypes: dict[str, torch.dtype] = field(repr=False)
    vocab_sizes: dict[str, int | None]
    tied: dict[str, bool]
    extended_vocab: str | None = None
    extended_shapes: dict[str, tuple] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def output_shape(self, name) -> tuple:
        """The shape of tensor `name` in a merge of these models (the extended one's where it is larger)."""
        return self.extended_shapes.get(name, self.shapes[name])


def check_compatible(models: dict[str, ModelReader], *, extended_vocab: str | None = None,
                     strict_dtype: bool = False) -> CompatReport:
    """Compare `models` ({label: reader}) against the first one not named by `extended_vocab`.

    Raises IncompatibleModelsError listing every missing or extra tensor, shape difference, architecture
    difference and tokenizer difference (its `differences` and `warnings` attributes hold them one per
    line). Dtype differences are warnings (merges compute in fp32) unless `strict_dtype`.
    """
    labels = list(models)
    if not labels:
        raise ConfigError("check_compatible: no models given")
    if extended_vocab is not None and extended_vocab not in models:
        raise ConfigError(f"extended_vocab {extended_vocab!r} is not one of the models ({', '.join(labels)})")
    ref = next((label for label in labels if label != extended_vocab), labels[0])
    base = models[ref]
    for label, model in models.items():
        check_consistent(model, label)
    if extended_vocab is not None and extended_vocab != ref:
        _check_extension_proven(ref, base, extended_vocab, models[extended_vocab])
    diffs, warnings, extended_shapes = [], [], {}
    for label in labels:
        if label == ref:
            continue
        model = models[label]
        diffs += _config_differences(ref, base, label, model, extended=label == extended_vocab)
        diffs += [f"{label}: missing tensor {n!r} (stored in {ref!r})" for n in base.names if n not in model]
        diffs += [f"{label}: extra tensor {n!r} (not stored in {ref!r})" for n in model.names if n not in base]
        diffs += _shape_differences(ref, base, label, model, extended_vocab, extended_shapes)
        dtype_diffs = _dtype_differences(ref, base, label, model, strict_dtype)
        (diffs if strict_dtype else warnings).extend(dtype_diffs)
        tok_diffs, tok_warnings = _tokenizer_differences(ref, base, label, model, label == extended_vocab)
        diffs += tok_diffs
        warnings += tok_warnings
    if diffs:
        msg = (f"the models are incompatible ({len(diffs)} difference(s); compared with {ref!r}):\n"
               + "\n".join(f"  - {d}" for d in diffs))
        if warnings:
            msg += "\nwarnings:\n" + "\n".join(f"  ~ {w}" for w in warnings)
        err = IncompatibleModelsError(msg)
        err.differences, err.warnings = diffs, warnings
        raise err
    names = [n for n in base.names if all(n in m for m in models.values())]
    return CompatReport(
        reference=ref, labels=labels, names=names,
        shapes={n: base.spec(n).shape for n in names}, dtypes={n: base.spec(n).dtype for n in names},
        vocab_sizes={label: _vocab_size(m) for label, m in models.items()},
        tied={label: m.is_tied for label, m in models.items()},
        extended_vocab=extended_vocab, extended_shapes=extended_shapes, warnings=warnings)


def _config_differences(ref, base, label, model, extended) -> list[str]:
    if bool(base.config) != bool(model.config):
        has, lacks = (ref, label) if base.config else (label, ref)
        return [f"{lacks}: no config.json, so its architecture cannot be compared with {has!r}"]
    out = []
    for key in ARCH_KEYS:
        a, b = base.config.get(key, _ABSENT), model.config.get(key, _ABSENT)
        if a == b:
            continue
        if key == "vocab_size" and extended and isinstance(a, int) and isinstance(b, int) and b > a:
            continue
        out.append(f"{label}: config {key} = {_show(b)}, {ref!r} has {_show(a)}")
    if base.is_tied != model.is_tied:
        out.append(f"{label}: config tie_word_embeddings = {model.is_tied}, {ref!r} has {base.is_tied}")
    return out


def _shape_differences(ref, base, label, model, extended_vocab, extended_shapes) -> list[str]:
    out = []
    for name in base.names:
        if name not in model:
            continue
        a, b = base.spec(name).shape, model.spec(name).shape
        if a == b:
            continue
        grows_vocab = name in VOCAB_TENSORS and len(a) == len(b) >= 1 and a[1:] == b[1:] and b[0] > a[0]
        if label == extended_vocab and grows_vocab:
            extended_shapes[name] = b
            continue
        msg = f"{label}: tensor {name!r} has shape {list(b)}, {ref!r} has {list(a)}"
        if label == extended_vocab and name in VOCAB_TENSORS:
            msg += " (an extended vocabulary may only add rows)"
        elif label == extended_vocab:
            msg += " (an extended vocabulary may change only the embedding and LM head)"
        elif grows_vocab:
            msg += f" (if {label!r} extends the vocabulary, name it as the extended-vocabulary model)"
        out.append(msg)
    return out


def _dtype_differences(ref, base, label, model, strict) -> list[str]:
    """Strict: one line per tensor. Otherwise one line per dtype pair (whole models usually differ)."""
    groups = defaultdict(list)
    for name in base.names:
        if name in model and base.spec(name).dtype != model.spec(name).dtype:
            groups[(model.spec(name).dtype, base.spec(name).dtype)].append(name)
    out = []
    for (mine, theirs), names in groups.items():
        if strict:
            out += [f"{label}: tensor {n!r} is {mine}, {ref!r} has {theirs}" for n in names]
        else:
            shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            out.append(f"{label}: {len(names)} tensor(s) stored as {mine} where {ref!r} has {theirs} ({shown}); "
                       f"the merge computes in fp32")
    return out


def _check_extension_proven(ref, base, label, model):
    """An extended vocabulary (docs/design.md §4.6a) must be proven by the tokenizers: the extended model's has
    more tokens, and its first V are the reference's. Without that proof the extra rows are refused."""
    rows, own = _vocab_rows(base), _vocab_rows(model)
    if rows is None or own is None or own <= rows:
        return  # no extra rows: the shape comparison reports whatever differs
    a, b = token_strings(base.path, rows), token_strings(model.path, own)
    if a is None or b is None:
        reason = f"{label if b is None else ref} has no readable tokenizer files"
    elif len(b) <= len(a):
        reason = f"the tokenizer of {label} has {len(b)} tokens, no more than the {len(a)} of {ref}"
    else:
        wrong = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if wrong is None:
            return
        reason = (f"its tokenizer differs from the one of {ref} at id {wrong} ({b[wrong]!r} vs {a[wrong]!r}), "
                  f"so its first {len(a)} tokens are not those of {ref}")
    raise InvalidModelError(
        f"{label}: has {own} vocabulary rows where {ref} has {rows}, which can be merged only as an extended "
        f"vocabulary, and nothing proves one: {reason}. Give {label} the tokenizer it was trained with (more "
        f"than {rows} tokens, the first {rows} those of {ref}), or merge a model with {rows} vocabulary rows")


def _tokenizer_differences(ref, base, label, model, extended) -> tuple[list[str], list[str]]:
    a, b = token_strings(base.path, _vocab_rows(base)), token_strings(model.path, _vocab_rows(model))
    if a is None or b is None:
        if (a is None) != (b is None):
            lacks = label if b is None else ref
            return [], [f"{lacks}: no readable tokenizer files, so the vocabularies were not compared"]
        return [], []
    if extended:
        b = b[:len(a)]  # the rest is the extension, proven by _check_extension_proven
    elif len(a) != len(b):
        return [f"{label}: tokenizer has {len(b)} tokens, {ref!r}'s has {len(a)}"], []
    wrong = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if not wrong:
        return [], []
    i = wrong[0]
    scope = f"the first {len(a)} tokens" if extended else "the vocabulary"
    return [f"{label}: tokenizer differs from {ref!r}'s in {scope}: {len(wrong)} token id(s) differ, "
            f"first id {i} ({b[i]!r} vs {a[i]!r})"], []


def _vocab_rows(model: ModelReader) -> int | None:
    """Rows of the input embedding (or of the LM head), the bound of every token id; None without either."""
    for name in VOCAB_TENSORS:
        if name in model and model.spec(name).shape:
            return model.spec(name).shape[0]
    return None


def _vocab_size(model: ModelReader) -> int | None:
    if isinstance(model.config.get("vocab_size"), int):
        return model.config["vocab_size"]
    return model.spec(EMBED).shape[0] if EMBED in model else None


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else repr(value)
