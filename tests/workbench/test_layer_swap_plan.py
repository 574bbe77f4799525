"""Layer-swap planning: tensor places, per-layer shares α, default and `auto` blocks."""
import pytest

from workbench.errors import ConfigError
from workbench.merge.layer_swap import auto_blocks, default_blocks, layer_alphas, plan_layer_swap
from workbench.merge.layers import num_layers, place_of
from workbench.merge.recipe import LayerSwap


def lk(name):
    place = place_of(name)
    return place.layer, place.kind


def test_places_of_llama_tensor_names():
    assert lk("model.layers.12.self_attn.q_proj.weight") == (12, "attn_q")
    assert lk("model.layers.0.mlp.down_proj.weight") == (0, "mlp_down")
    assert lk("model.layers.3.post_attention_layernorm.weight") == (3, "norm")
    assert lk("model.embed_tokens.weight") == (None, "embed")
    assert lk("model.norm.weight") == (None, "final_norm")
    assert lk("lm_head.weight") == (None, "lm_head")
    assert num_layers(["model.layers.0.mlp.up_proj.weight", "model.layers.29.mlp.up_proj.weight"]) == 30


def test_alphas_with_one_and_two_transition_layers():
    # 10 layers, bottom 2, top 1: swapped 0, 1 and 9; transitions next to each block.
    assert layer_alphas(10, 2, 1, 1) == [1, 1, 0.5, 0, 0, 0, 0, 0, 0.5, 1]
    two = layer_alphas(10, 2, 1, 2)
    assert two[:5] == pytest.approx([1, 1, 2 / 3, 1 / 3, 0])
    assert two == pytest.approx([1, 1, 2 / 3, 1 / 3, 0, 0, 0, 1 / 3, 2 / 3, 1])
    assert layer_alphas(6, 0, 1, 1) == [0, 0, 0, 0, 0.5, 1]  # no bottom block, so no bottom transition


def test_default_blocks_scale_the_32_layer_setting():
    assert default_blocks(32) == (5, 2)
    assert default_blocks(30) == (5, 2)  # SmolLM2-135M
    assert default_blocks(16) == (3, 1)
    assert default_blocks(4) == (1, 1)  # at least one each


def test_auto_blocks_take_the_largest_winning_runs_at_each_end():
    lang = [5, 4, 1, 1, 1, 1, 3, 4]
    task = [1, 1, 2, 2, 2, 2, 2, 5]
    assert auto_blocks(lang, task) == (2, 0)
    plan = plan_layer_swap(LayerSwap(task="math", language="language", bottom="auto", top="auto"), 8, lang, task)
    assert (plan.bottom, plan.top) == (2, 0) and plan.chosen_by == {"bottom": "auto", "top": "auto"}
    assert plan.alphas == (1, 1, 0.5, 0, 0, 0, 0, 0)


def test_auto_that_finds_nothing_falls_back_to_the_defaults_and_says_so():
    lang, task = [1.0] * 30, [2.0] + [1.0] * 28 + [2.0]  # the task expert, not the language one, peaks at the ends
    assert auto_blocks(lang, task) == (0, 0)
    plan = plan_layer_swap(LayerSwap(task="math", language="language", bottom="auto", top="auto"), 30, lang, task)
    assert (plan.bottom, plan.top) == (5, 2) and plan.chosen_by == {"bottom": "default", "top": "default"}
    assert "auto found no layer at either end" in plan.notes[0]
    one_end = plan_layer_swap(LayerSwap(task="math", language="language", bottom="auto", top=1), 30, lang, task)
    assert (one_end.bottom, one_end.top) == (0, 1) and not one_end.notes  # one block asked for: kept as asked


def test_auto_compares_each_experts_profile_to_its_own_mean():
    # The language expert was trained harder: larger everywhere, but above its own mean only at the ends.
    lang = [9.0, 8.0, 4.0, 4.0, 4.0, 4.0, 8.0, 9.0]
    task = [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]
    assert auto_blocks(lang, task) == (2, 2)
    assert auto_blocks([x * 100 for x in lang], task) == auto_blocks(lang, task)  # scale does not matter
    assert auto_blocks([0.0] * 8, task) == (0, 0)


def test_auto_blocks_are_capped_to_fit():
    lang, task = [3.0, 3.0, 3.0, 1.0, 3.0, 3.0], [1.0, 1.0, 1.0, 3.0, 1.0, 1.0]  # wins: bottom 3, top 2
    plan = plan_layer_swap(LayerSwap(task="math", language="language", bottom="auto", top="auto"), 6, lang, task)
    assert (plan.bottom, plan.top) == (2, 2) and plan.alphas == (1, 1, 0.5, 0.5, 1, 1)
    assert any("capped" in n for n in plan.notes)
    no_zone = plan_layer_swap(LayerSwap(task="math", language="language", bottom="auto", top="auto", transition=0),
                              6, lang, task)
    assert no_zone.bottom + no_zone.top == 5  # the task expert keeps one layer


def test_explicit_blocks_that_leave_no_middle_are_rejected():
    with pytest.raises(ConfigError, match="do not fit in a 6-layer model \\(they need 7 layers"):
        plan_layer_swap(LayerSwap(task="math", language="language", bottom=3, top=2, transition=1), 6)
    with pytest.raises(ConfigError, match="'auto' needs the delta heatmap"):
        plan_layer_swap(LayerSwap(task="math", language="language", bottom="auto"), 6)


def test_defaults_are_named_as_defaults():
    plan = plan_layer_swap(LayerSwap(task="math", language="language"), 30)
    assert (plan.bottom, plan.top, plan.transition) == (5, 2, 1)
    assert plan.chosen_by == {"bottom": "default", "top": "default"}
    assert "default blocks scaled from the setting reported for a 32-layer Llama 3.1 8B" in plan.notes[0]
