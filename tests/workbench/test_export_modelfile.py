"""The Ollama Modelfile: chat formats recognised by rendering the model's real Jinja template, and the
`workbench export` command end to end."""
import json
import subprocess
import sys

import pytest

from workbench.export.modelfile import FORMATS, PROBE, recognise, render_jinja, render_modelfile

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")


def test_chatml_with_a_default_system_prompt():
    found = recognise(SMOLLM2_TEMPLATE)
    assert found.format.name == "chatml"
    assert found.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = render_modelfile("m.gguf", chat_template=SMOLLM2_TEMPLATE, stop_tokens=["<|im_end|>"], model_name="sw-ties")
    assert text.splitlines()[:2] == ["# Ollama: ollama create sw-ties -f Modelfile && ollama run sw-ties",
                                     "FROM ./m.gguf"]
    assert ('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
            '<|im_start|>assistant\n"""') in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|im_start|>"' in text


def test_a_bos_the_template_never_writes_is_not_stripped():
    # SmolLM2 as converted from its GGUF has BOS <|im_start|>: the rendered text starts with it, but as the
    # start of a ChatML turn, not as a BOS the template added.
    found = recognise(SMOLLM2_TEMPLATE, bos_token="<|im_start|>")
    assert found is not None and found.format.name == "chatml"
    assert found.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_the_test_tokenizers_template_is_chatml_without_a_system_prompt(tiny_tokenizer):
    found = recognise(tiny_tokenizer.chat_template)
    assert found.format.name == "chatml" and found.default_system is None
    assert "SYSTEM" not in render_modelfile("m.gguf", chat_template=tiny_tokenizer.chat_template)


@pytest.mark.parametrize("template, name, bos", [(SMOLLM2_TEMPLATE, "chatml", ""),
                                                  (LLAMA3_TEMPLATE, "llama3", "<|begin_of_text|>")])
def test_formats_match_real_templates_on_every_probe(template, name, bos):
    fmt = next(f for f in FORMATS if f.name == name)
    for n in (2, 3, 4):
        rendered = render_jinja(template, PROBE[:n], bos_token=bos)
        assert rendered.removeprefix(bos) == fmt.render(PROBE[:n])
    assert recognise(template, bos_token=bos).format is fmt


def test_unknown_template_leaves_the_choice_to_ollama():
    assert recognise(MISTRAL_TEMPLATE, bos_token="<s>") is None
    text = render_modelfile("m.gguf", chat_template=MISTRAL_TEMPLATE, stop_tokens=["</s>"])
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert 'PARAMETER stop "</s>"' in text and "matches no format" in text


def workbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, cwd=cwd)


def test_export_command(tmp_path, tiny_llama_factory, capsys):
    from workbench.provenance import file_sha256

    model_dir, _ = tiny_llama_factory("sw-ties", seed=12, tie=True)
    out = workbench("export", str(model_dir), "--gguf", "out/sw-ties.gguf", "--type", "q8_0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    gguf = tmp_path / "out" / "sw-ties.gguf"
    manifest = json.loads((tmp_path / "out" / "sw-ties.gguf.json").read_text())
    assert manifest["sha256"] == file_sha256(gguf) and manifest["sha256"] in out.stdout
    assert "exported 38 tensors (q8_0)" in out.stdout  # tied: no output.weight
    assert "ollama create sw-ties -f Modelfile && ollama run sw-ties" in out.stdout
    assert f"llama-cli -m {gguf.relative_to(tmp_path)}" in out.stdout
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./sw-ties.gguf" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    from workbench.cli import main  # the error paths in process: the same parser and messages, no start-up cost

    capsys.readouterr()
    assert main(["export", str(model_dir), "--gguf", str(gguf)]) == 2
    assert capsys.readouterr().err.strip() == f"workbench export: error: {gguf} exists; pass --force to replace it"
    (model_dir / "tokenizer.json").unlink()
    assert main(["export", str(model_dir), "--gguf", str(tmp_path / "out" / "other.gguf")]) == 1
    err = capsys.readouterr().err
    assert "no tokenizer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "other.gguf").exists()
