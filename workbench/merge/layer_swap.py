"""Layer swapping with transition zones (Bandarkar et al., 2024; docs/design.md §4.6): which layers, which share.

Start from the task expert; its bottom `b` and top `t` layers are replaced by the language expert's, and
`z` transition layers on each inner edge blend the two. α_ℓ is the language expert's share of layer ℓ:
1 in the swapped blocks, 0 in the kept middle, and a linear ramp across each transition zone.

The ramp (docs/design.md §4.6): α = (z + 1 − j)/(z + 1) for the j-th transition layer away from the
swapped block, j = 1 … z, strictly between the block (1) and the middle (0): 1/2 for z = 1, and 2/3, 1/3
for z = 2 (the paper's transition layer is an even blend of the two experts).
"""
from dataclasses import dataclass, field

from workbench.errors import ConfigError


def transition_alpha(j: int, z: int) -> float:
    """The language expert's share in the j-th transition layer (1-based) away from a swapped block."""
    return (z + 1 - j) / (z + 1)


def default_blocks(num_layers: int) -> tuple[int, int]:
    """The setting reported for a 32-layer Llama 3.1 8B (bottom 5, top 2), scaled to L layers, at least 1 each."""
    return max(1, int(5 * num_layers / 32 + 0.5)), max(1, int(2 * num_layers / 32 + 0.5))


def auto_blocks(rel_language, rel_task) -> tuple[int, int]:
    """The largest blocks at each end where the language expert's relative change exceeds the task expert's,
    each expert's per-layer profile taken relative to its own mean over the layers.

    Why the profiles are normalized: the raw magnitudes measure how long and how hard each expert was
    trained, not where it changed the model. Measured on the micro profile (SmolLM2, LoRA CT of 20 steps,
    LoRA SFT of 16): the language expert's ‖δ‖/‖θ_b‖ exceeded the task expert's in all 30 layers, so the
    raw rule swapped every layer it could (the "merge" was the language expert); with fewer CT steps it
    swapped none. The normalized rule asks which layers each expert changed more than its own average, the
    pattern the Layer Swapping paper reads off its heatmaps, and equals the raw rule when both experts moved
    the model by the same total amount.
    """
    mean_language = sum(rel_language) / len(rel_language) if len(rel_language) else 0.0
    mean_task = sum(rel_task) / len(rel_task) if len(rel_task) else 0.0
    if mean_language <= 0 or mean_task <= 0:
        return 0, 0  # an expert that changed nothing has no profile to compare
    wins = [lang / mean_language > task / mean_task for lang, task in zip(rel_language, rel_task)]
    bottom = next((i for i, w in enumerate(wins) if not w), len(wins))
    top = next((i for i, w in enumerate(reversed(wins)) if not w), len(wins))
    return bottom, top


def layer_alphas(num_layers: int, bottom: int, top: int, transition: int) -> list[float]:
    """α_ℓ for every layer ℓ (language expert's share)."""
    alphas = [0.0] * num_layers
    for layer in range(bottom):
        alphas[layer] = 1.0
    for layer in range(num_layers - top, num_layers):
        alphas[layer] = 1.0
    for j in range(1, transition + 1):
        if bottom:
            alphas[bottom - 1 + j] = max(alphas[bottom - 1 + j], transition_alpha(j, transition))
        if top:
            alphas[num_layers - top - j] = max(alphas[num_layers - top - j], transition_alpha(j, transition))
    return alphas


def _span(num_layers, bottom, top, z):
    """Layers the blocks and their transition zones cover."""
    return bottom + top + (z if bottom else 0) + (z if top else 0)


@dataclass(frozen=True)
class SwapPlan:
    num_layers: int
    bottom: int
    top: int
    transition: int
    alphas: tuple
    chosen_by: dict = field(default_factory=dict)  # bottom/top -> "recipe" | "auto" | "default"
    notes: tuple = ()

    def describe(self) -> str:
        swapped = [i for i, a in enumerate(self.alphas) if a == 1.0]
        blended = {i: round(a, 3) for i, a in enumerate(self.alphas) if 0 < a < 1}
        return (f"{self.num_layers} layers: bottom {self.bottom} ({self.chosen_by.get('bottom')}), top {self.top} "
                f"({self.chosen_by.get('top')}), transition {self.transition}; swapped {swapped}, "
                f"transition α {blended}")


def plan_layer_swap(cfg, num_layers: int, rel_language=None, rel_task=None, where="layer_swap") -> SwapPlan:
    """Resolve a recipe's `layer_swap` section to per-layer shares.

    `rel_language`/`rel_task` are per-layer relative changes ‖δ‖/‖θ_b‖ (needed only for `auto`).
    """
    z = cfg.transition
    if z >= num_layers:  # checked first: a ramp longer than the model never fits, and z would size loops
        raise ConfigError(f"{where}.transition: expected fewer transition layers than the model's {num_layers} "
                          f"layers, got {z}")
    chosen, notes = {}, []
    default_b, default_t = default_blocks(num_layers)
    auto_b = auto_t = None
    given_b, given_t = cfg.bottom, cfg.top
    if "auto" in (given_b, given_t):
        if rel_language is None or rel_task is None:
            raise ConfigError(f"{where}: 'auto' needs the delta heatmap of both experts against the base")
        auto_b, auto_t = auto_blocks(rel_language, rel_task)
        if given_b == given_t == "auto" and auto_b == auto_t == 0:
            # Swapping nothing would write the task expert back unchanged: not a merge anyone asked for.
            notes.append("auto found no layer at either end where the language expert's relative change (to its "
                         "own mean over the layers) exceeds the task expert's, so an automatic swap would copy "
                         "the task expert unchanged; the default blocks are used instead")
            given_b = given_t = None
    values = {}
    for key, given, default, auto in (("bottom", given_b, default_b, auto_b),
                                      ("top", given_t, default_t, auto_t)):
        if given == "auto":
            values[key], chosen[key] = auto, "auto"
        elif given is None:
            values[key], chosen[key] = default, "default"
        else:
            values[key], chosen[key] = given, "recipe"
    b, t = values["bottom"], values["top"]
    if chosen["bottom"] == "default" or chosen["top"] == "default":
        notes.append(f"default blocks scaled from the setting reported for a 32-layer Llama 3.1 8B (bottom 5, "
                     f"top 2): bottom {default_b}, top {default_t} for {num_layers} layers")
    # The blocks and their transition zones must fit without overlapping, and the task expert must keep
    # a share of at least one layer (otherwise the "merge" is the language expert).
    def fits(b, t):
        return _span(num_layers, b, t, z) <= num_layers and b + t < num_layers

    while not fits(b, t):
        shrink = [k for k in ("bottom", "top") if chosen[k] == "auto" and (b if k == "bottom" else t) > 0]
        if not shrink:
            raise ConfigError(f"{where}: bottom {b} + top {t} with {z} transition layer(s) on each inner edge do not "
                              f"fit in a {num_layers}-layer model (they need {_span(num_layers, b, t, z)} layers and "
                              f"must leave the task expert a share of at least one); expected fewer layers")
        if "bottom" in shrink and (b >= t or "top" not in shrink):
            b -= 1
        else:
            t -= 1
    if (b, t) != (values["bottom"], values["top"]):
        notes.append(f"auto blocks capped from bottom {values['bottom']}, top {values['top']} to bottom {b}, "
                     f"top {t} so that the blocks and their transition zones fit in {num_layers} layers")
    return SwapPlan(num_layers=num_layers, bottom=b, top=t, transition=z,
                    alphas=tuple(layer_alphas(num_layers, b, t, z)), chosen_by=chosen, notes=tuple(notes))
