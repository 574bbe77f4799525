"""Profiles that inherit (`extends:`): the shared micro profile is defined once, a language keeps its own keys,
errors name the file and key that set a bad value (inherited ones too), --fast and --set work through it."""
import re
import textwrap

import pytest
import yaml

from workbench.cli import main
from workbench.config.loader import available_languages, load_language, shared_profiles, shipped_languages_dir
from workbench.errors import ConfigError

LANGUAGE = textwrap.dedent("""\
    code: xx
    name: Testish
    native_name: Testish
    iso639_3: xxx
    script: Latn
    sources:
      shipped: {path: text.txt}
      english: {path: text.txt}
    prompt: {template: "Q: {question}\\nA:"}
    profiles:
      small:
        extends: %s
        description: a profile of its own
    """)


def write(folder, name, text):
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def language_extending(tmp_path, target, own=""):
    write(tmp_path, "text.txt", "Habari za asubuhi, rafiki yangu mpendwa wa zamani.\n")
    return write(tmp_path, "xx.yaml", LANGUAGE % target + textwrap.indent(textwrap.dedent(own), "    "))


def shared_micro() -> dict:
    return yaml.safe_load((shipped_languages_dir() / "profiles" / "micro.yaml").read_text(encoding="utf-8"))


def own_lines(code: str, profile: str) -> list[str]:
    """The non-blank lines of one profile's block in a language file."""
    text = (shipped_languages_dir() / f"{code}.yaml").read_text(encoding="utf-8")
    block = re.search(rf"^  {profile}:\n((?:    .*\n|\s*\n)*)", text, re.M).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_every_micro_profile_extends_the_shared_one_with_a_few_lines_of_its_own():
    assert "micro" in shared_profiles()
    with_micro = [code for code in available_languages() if "micro" in load_language(code).language.profiles]
    assert {"sw", "te", "bn", "ja"} <= set(with_micro)
    for code in with_micro:
        loaded = load_language(code, profile="micro")
        assert loaded.extends["micro"] == ["languages/profiles/micro.yaml"], code
        assert len(own_lines(code, "micro")) < 30, code
        # The shared values arrive unchanged where the language sets nothing of its own.
        shared = shared_micro()
        own = yaml.safe_load(available_languages()[code].read_text(encoding="utf-8"))["profiles"]["micro"]
        for key in ("base", "corpus", "experts", "merges", "fast"):
            resolved = loaded.raw["profiles"]["micro"][key]
            if key not in own:
                assert resolved == shared[key], (code, key)
            else:  # set in part (Tibetan's corpus.heldout_fraction): the rest arrives key by key
                for sub in shared[key]:
                    assert resolved[sub] == own[key].get(sub, shared[key][sub]), (code, key, sub)


def test_a_mapping_merges_key_by_key_and_any_other_value_replaces(tmp_path):
    path = language_extending(tmp_path, "micro", """\
        corpus: {block_size: 128, sources: [english]}
        eval: {mgsm: {path: own.tsv, samples: 3}}
        """)
    loaded = load_language(str(path))
    shared, profile = shared_micro(), loaded.raw["profiles"]["small"]
    assert profile["corpus"] == {**shared["corpus"], "block_size": 128, "sources": ["english"]}
    assert list(profile["corpus"]) == list(shared["corpus"])  # the inherited order is kept
    assert profile["eval"]["mgsm"] == {"path": "own.tsv", "samples": 3}
    assert "extends" not in profile and profile["description"] == "a profile of its own"
    assert loaded.profile.corpus.block_size == 128 and loaded.profile.language_expert.pretrain.max_steps == 20


def test_a_bad_inherited_value_names_the_file_and_key_that_set_it(tmp_path):
    write(tmp_path, "base.yaml", "extends: micro\ncorpus: {block_size: 4}\n")
    path = language_extending(tmp_path, "base.yaml")
    with pytest.raises(ConfigError) as err:
        load_language(str(path))
    assert str(err.value) == (f"{tmp_path / 'base.yaml'}: corpus.block_size: expected an integer >= 8, got 4 "
                              f"(inherited by profiles.small of {path})")


def test_errors_follow_a_chain_of_profiles_to_the_file_that_set_the_value(tmp_path):
    write(tmp_path, "grand.yaml", "extends: micro\nmerges: {ties: {method: ties, base: base, "
                                  "models: [{model: language, density: 1.5}, {model: math}]}}\n")
    write(tmp_path, "parent.yaml", "extends: ./grand.yaml\neval: {batch_size: 2}\n")
    path = language_extending(tmp_path, "parent.yaml")
    with pytest.raises(ConfigError, match=re.escape(
            f"{tmp_path / 'grand.yaml'}: merges.ties.models[0].density: expected a number in (0, 1], got 1.5 "
            f"(inherited by profiles.small of {path})")):
        load_language(str(path))
    # Overriding the value in the language's own file (or with --set) makes it the language file's.
    fixed = load_language(str(path), overrides=["merges.ties.models[0].density=0.5"])
    assert fixed.profile.merges["ties"].models[0].density == 0.5 and fixed.profile.eval.batch_size == 2
    with pytest.raises(ConfigError, match=re.escape(f"{path}: profiles.small.merges.ties.models[0].density: "
                                                    f"expected a number in (0, 1], got 2")):
        load_language(str(path), overrides=["merges.ties.models[0].density=2"])


def test_unknown_inherited_key_and_runtime_checks_name_the_shared_file(tmp_path):
    write(tmp_path, "base.yaml", "extends: micro\ncorpus: {blok_size: 64}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'base.yaml'}: corpus.blok_size: unknown key "
                                                    f"(did you mean 'block_size'?)")):
        load_language(str(language_extending(tmp_path, "base.yaml")))
    loaded = load_language("sw")  # block_size comes from the shared micro profile, the MGSM file from sw.yaml
    assert loaded.where("corpus.block_size").located() == "languages/profiles/micro.yaml: corpus.block_size"
    assert loaded.where("eval.mgsm.path").located() == "languages/sw.yaml: profiles.micro.eval.mgsm.path"
    assert "(inherited by profiles.micro of languages/sw.yaml)" in str(loaded.where("merges.ties").error("x"))


def test_bad_extends_values_fail_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"xx\.yaml: profiles\.small\.extends: no shared profile 'micr' "
                                          r"\(did you mean 'micro'\?\)"):
        load_language(str(language_extending(tmp_path, "micr")))
    with pytest.raises(ConfigError, match=r"profiles\.small\.extends: no such file .*missing\.yaml"):
        load_language(str(language_extending(tmp_path, "missing.yaml")))
    write(tmp_path, "a.yaml", "extends: ./b.yaml\n")
    write(tmp_path, "b.yaml", "extends: ./a.yaml\n")
    with pytest.raises(ConfigError, match=r"the profiles extend each other in a loop .*a\.yaml -> .*b\.yaml -> "
                                          r".*a\.yaml"):
        load_language(str(language_extending(tmp_path, "a.yaml")))
    write(tmp_path, "list.yaml", "- 1\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a profile \(a mapping of its keys\)"):
        load_language(str(language_extending(tmp_path, "list.yaml")))


def test_fast_variant_and_set_overrides_work_through_inheritance(tmp_path):
    path = language_extending(tmp_path, "micro", """\
        fast: {eval.batch_size: 5}
        """)
    fast = load_language(str(path), fast=True)
    assert fast.profile.language_expert.pretrain.max_steps == 2  # the shared fast keys
    assert fast.profile.eval.batch_size == 5  # and the language's own
    assert fast.profile.eval.max_new_tokens == 12
    both = load_language("te", fast=True, overrides=["language_expert.pretrain.max_steps=3"])
    assert both.profile.language_expert.pretrain.max_steps == 3
    assert both.profile.language_expert.pretrain.lora.train_embeddings and both.profile.tokenizer.extend_vocab


def test_a_language_without_mgsm_extends_micro_and_runs_fast(tmp_path):
    """What bo, ug or mn need: no MGSM file (the shared `eval.mgsm: null` stays, and the shared fast variant's
    `eval.mgsm.samples` is skipped), no word-problem templates (0 generated problems, in --fast too)."""
    path = language_extending(tmp_path, "micro", """\
        eval: {generated_problems: 0}
        fast: {eval.generated_problems: 0}
        """)
    for fast in (False, True):
        profile = load_language(str(path), fast=fast).profile
        assert profile.eval.mgsm is None and profile.eval.generated_problems == 0
    assert load_language(str(path), fast=True).profile.eval.max_new_tokens == 12
    # --set still makes a section where there is none.
    made = load_language(str(path), overrides=["eval.mgsm.path=mgsm.tsv"], fast=True).profile.eval.mgsm
    assert made.path == "mgsm.tsv" and made.samples == 40


def test_languages_command_shows_the_resolved_profile(capsys):
    assert main(["languages", "te"]) == 0
    out = capsys.readouterr().out
    assert "profile micro:  (extends languages/profiles/micro.yaml)" in out
    assert ("profile micro resolved (extends languages/profiles/micro.yaml; set in languages/te.yaml: description, "
            "tokenizer.extend_vocab, tokenizer.new_pieces, tokenizer.sp_vocab_size, "
            "language_expert.pretrain.lora.train_embeddings, eval.mgsm):") in out
    resolved = yaml.safe_load(out.split("eval.mgsm):\n", 1)[1])
    assert resolved == load_language("te").raw["profiles"]["micro"]
