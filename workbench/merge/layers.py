"""Where a tensor sits in a Llama-family model: its transformer layer and its module kind."""
import re
from dataclasses import dataclass

# Module kinds in the order the heatmap shows them (docs/design.md §4.1).
KINDS = ("embed", "attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm",
         "final_norm", "lm_head", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_KIND_PATTERNS = (
    ("attn_q", re.compile(r"\.(q_proj|query)\.")),
    ("attn_k", re.compile(r"\.(k_proj|key)\.")),
    ("attn_v", re.compile(r"\.(v_proj|value)\.")),
    ("attn_o", re.compile(r"\.(o_proj|dense|out_proj)\.")),
    ("mlp_gate", re.compile(r"\.(gate_proj|w1)\.")),
    ("mlp_up", re.compile(r"\.(up_proj|w3)\.")),
    ("mlp_down", re.compile(r"\.(down_proj|w2)\.")),
    ("norm", re.compile(r"(layernorm|_norm|\.ln_\d?)")),
)


@dataclass(frozen=True)
class TensorPlace:
    name: str
    layer: int | None  # None outside the transformer layers
    kind: str


def place_of(name: str) -> TensorPlace:
    """Classify a parameter name: `model.layers.3.mlp.up_proj.weight` -> layer 3, kind `mlp_up`."""
    m = _LAYER.search(name)
    if m is not None:
        layer = int(m.group(1))
        for kind, pattern in _KIND_PATTERNS:
            if pattern.search("." + name):
                return TensorPlace(name, layer, kind)
        return TensorPlace(name, layer, "other")
    if "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
        return TensorPlace(name, None, "embed")
    if name.startswith("lm_head") or ".lm_head." in name:
        return TensorPlace(name, None, "lm_head")
    if re.search(r"(^|\.)(norm|ln_f|final_layernorm)\.", name):
        return TensorPlace(name, None, "final_norm")
    return TensorPlace(name, None, "other")


def num_layers(names) -> int:
    """Number of transformer layers from the tensor names (max layer index + 1)."""
    layers = [p.layer for p in map(place_of, names) if p.layer is not None]
    return max(layers) + 1 if layers else 0
