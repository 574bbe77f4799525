"""The shared fixtures build what the other tests rely on."""
import torch
from transformers import AutoModelForCausalLM


def test_tiny_family_loads_and_differs(tiny_family, tiny_tokenizer):
    base_dir, base = tiny_family["base"]
    _, lang = tiny_family["language"]
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    ids = tiny_tokenizer("Habari ya asubuhi", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(base[name], lang[name])
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.chat_template
