"""The language-config schema: every shipped file loads; bad values fail with file, key path, value, expectation."""
import os
import textwrap

import pytest

from workbench.config.loader import available_languages, load_language, validate_all_shipped
from workbench.errors import ConfigError
from workbench.merge.engine import load_recipe

PAPER_LANGUAGES = {"sw", "te", "bn", "ja", "bo", "ug", "mn"}


def test_every_shipped_language_and_profile_loads():
    shipped = validate_all_shipped()
    assert set(shipped) == PAPER_LANGUAGES
    for code, lang in shipped.items():
        assert lang.code == code
        for profile in lang.profiles:
            loaded = load_language(code, profile=profile)
            assert loaded.profile.merges, (code, profile)
    # The offline profile exists for sw and at least two more languages.
    assert sum("micro" in lang.profiles for lang in shipped.values()) >= 3


def test_shipped_local_sources_exist():
    for code in available_languages():
        loaded = load_language(code)
        for name, src in loaded.language.sources.items():
            if src.path:
                assert (loaded.base_dir / src.path).is_file(), f"{code}: sources.{name}: {src.path}"


@pytest.mark.parametrize("override, message", [
    ("merges.ties.models[0].density=1.5",
     "languages/sw.yaml: profiles.micro.merges.ties.models[0].density: expected a number in (0, 1], got 1.5"),
    ("language_expert.pretrain.max_steps=0",
     "languages/sw.yaml: profiles.micro.language_expert.pretrain.max_steps: expected an integer >= 1, got 0"),
    ("language_expert.pretrain.method=qlora",
     "languages/sw.yaml: profiles.micro.language_expert.pretrain.method: expected one of 'lora', 'full', got 'qlora'"),
    ("eval.batch_size=true",
     "languages/sw.yaml: profiles.micro.eval.batch_size: expected an integer >= 1, got True"),
    ("merges.ties_sv.models[1].slack=0.4",
     "languages/sw.yaml: profiles.micro.merges.ties_sv.models[1].slack: expected slack <= density (the protected "
     "elements are the top s·n of the kept ones), got slack 0.4 > density 0.3"),
    ("merges.ties.models[1].slack=0.1",
     "languages/sw.yaml: profiles.micro.merges.ties.models[1].slack: slack applies to method 'ties_sv' only"),
    ("corpus.heldout_fraction=0",
     "languages/sw.yaml: profiles.micro.corpus.heldout_fraction: expected a number in (0, 0.5], got 0"),
])
def test_bad_values_name_file_key_value_and_expectation(override, message):
    with pytest.raises(ConfigError) as err:
        load_language("sw", overrides=[override])
    assert str(err.value).startswith(message)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"profiles\.micro\.eval\.batch_sise: unknown key \(did you mean "
                                          r"'batch_size'\?\)"):
        load_language("sw", overrides=["eval.batch_sise=4"])


def test_unknown_language_and_profile_list_the_choices():
    with pytest.raises(ConfigError, match=r"unknown language 'xx'; available: bn, bo, ja, mn, sw, te, ug"):
        load_language("xx")
    with pytest.raises(ConfigError, match=r"profile 'nope' does not exist; this language has: micro, "
                                          r"paper-layer-swap"):
        load_language("sw", profile="nope")


def test_overrides_and_fast_variant_apply():
    loaded = load_language("sw", overrides=["language_expert.pretrain.max_steps=7",
                                            "profiles.micro.eval.batch_size=3"])
    assert loaded.profile.language_expert.pretrain.max_steps == 7
    assert loaded.profile.eval.batch_size == 3
    fast = load_language("sw", fast=True)
    assert fast.profile.language_expert.pretrain.max_steps < loaded.profile.language_expert.pretrain.max_steps


def test_user_yaml_file_with_relative_paths(tmp_path):
    src = load_language("sw").file.read_text(encoding="utf-8")
    corpus = tmp_path / "text.txt"
    corpus.write_text("Habari za asubuhi, rafiki yangu mpendwa.\n", encoding="utf-8")
    own = tmp_path / "my_sw.yaml"
    own.write_text(src.replace("path: corpora/sw.txt", "path: text.txt"), encoding="utf-8")
    loaded = load_language(str(own))
    assert loaded.source == str(own)
    assert (loaded.base_dir / loaded.language.sources["shipped"].path) == corpus


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        code: xx
        name: [unclosed
        """), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+, column \d+: not valid YAML"):
        load_language(str(bad))


def test_missing_required_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("code: xx\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: name: missing required key; expected a string"):
        load_language(str(bad))


@pytest.mark.parametrize("override, message", [
    ("merges.ties.lambda=.inf", "merges.ties.lambda: expected a number in [-100, 100], got inf"),
    ("merges.ties.models[0].weight=1.0e+308", "merges.ties.models[0].weight: expected a number in [-100, 100], "
                                              "got 1e+308"),
    ("merges.task_arithmetic.models[0].weight=.nan", "merges.task_arithmetic.models[0].weight: expected a number "
                                                     "in [-100, 100], got nan"),
    ("merges.ties.models[0].weight=.nan", "merges.ties.models[0].weight: expected a number in [-100, 100], got nan"),
    ("merges.ties.models[0].density=.nan", "merges.ties.models[0].density: expected a number in (0, 1], got nan"),
    ("merges.ties_sv.models[1].slack=.nan", "merges.ties_sv.models[1].slack: expected a number in [0, 1], got nan"),
    ("merges.ties.models[0].weight=[1]", "merges.ties.models[0].weight: expected a number in [-100, 100], got [1]"),
    ("merges.ties.models[0].weight=1" + "0" * 400, "merges.ties.models[0].weight: expected a number in [-100, 100]"),
    ("language_expert.pretrain.learning_rate=.nan", "language_expert.pretrain.learning_rate: expected a number in "
                                                   "(0, 1], got nan"),
    ("language_expert.pretrain.learning_rate=1.0e+30", "language_expert.pretrain.learning_rate: expected a number "
                                                      "in (0, 1], got 1e+30"),
    ("language_expert.pretrain.max_grad_norm=.inf", "language_expert.pretrain.max_grad_norm: expected a number "
                                                   "> 0, got inf"),
    ("language_expert.pretrain.max_steps=99999999999999", "language_expert.pretrain.max_steps: expected an integer "
                                                          ">= 1 and at most 2147483647, got 99999999999999"),
    ("seed=18446744073709551616", "seed: expected an integer >= 0 and at most 2147483647"),
])
def test_non_finite_and_absurd_numbers_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_language("sw", overrides=[override])
    assert str(err.value).startswith(f"languages/sw.yaml: profiles.micro.{message}")


def _alias_bomb(levels=9, indent="") -> str:
    """Each anchor holds ten aliases of the one before: 10^levels values from a few hundred bytes."""
    lines = [f"{indent}b0: &b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{indent}b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines)


def test_a_yaml_alias_bomb_fails_fast(tmp_path):
    own = tmp_path / "bomb.yaml"
    src = load_language("sw").file.read_text(encoding="utf-8")
    # The bomb sits in `fast`, a mapping of free values: it passes the schema, and every walk of the tree
    # (the run's fingerprint: `adapt --dry-run` ran for minutes) would visit 10^9 values.
    extends = "    extends: micro"
    assert extends in src
    bomb = _alias_bomb(indent="      ")
    own.write_text(src.replace(extends, "    fast:\n" + bomb + "\n" + extends, 1), encoding="utf-8")
    assert len(bomb) < 1500
    with pytest.raises(ConfigError, match=r"bomb\.yaml: the YAML expands to more than 100,000 values"):
        load_language(str(own))


def test_an_alias_bomb_in_a_set_value_fails_fast():
    with pytest.raises(ConfigError, match=r"--set .*: the YAML expands to more than 100,000 values"):
        load_language("sw", overrides=["fast.x=" + "{" + _alias_bomb().replace("\n", ", ") + "}"])


def test_a_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "cycle.yaml"
    recipe.write_text("method: ties\nbase: &b [*b]\nmodels: [{model: x}]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cycle\.yaml: an alias refers to the value that holds it"):
        load_recipe(recipe)


def test_a_fifo_in_place_of_a_config_is_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match=r"fifo\.yaml: is a FIFO \(named pipe\), not a regular file"):
        load_language(str(tmp_path / "fifo.yaml"))
