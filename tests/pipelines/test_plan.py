"""Every shipped profile plans (the graph `adapt` and `--dry-run` build) or fails at once, naming the key."""
import pytest
import yaml

from workbench.config.loader import available_languages, load_language
from workbench.errors import ConfigError
from workbench.cli import main
from workbench.pipelines import evaluate as evaluate_module
from workbench.pipelines.adapt import build_graph
from workbench.pipelines.evaluate import missing_packages

# Known from the profile alone, so it fails at planning, before any fetch: the authors' CT model is fetched (no
# CT stage holds out Uyghur text) and no MGSM, generated problems or lm-eval task exists for Uyghur here.
FAILS_AT_ONCE = {("ug", "paper-ties-sv"): "profiles.paper-ties-sv.eval: nothing to evaluate"}

SHIPPED = [(code, name) for code, path in sorted(available_languages().items())
           for name in yaml.safe_load(path.read_text(encoding="utf-8")).get("profiles", {})]


@pytest.mark.parametrize("code,profile", SHIPPED, ids=[f"{c}-{p}" for c, p in SHIPPED])
def test_every_shipped_profile_plans_or_fails_at_once(code, profile, tmp_path):
    loaded = load_language(code, profile=profile)
    if (code, profile) in FAILS_AT_ONCE:
        with pytest.raises(ConfigError, match=FAILS_AT_ONCE[code, profile]) as e:
            build_graph(loaded, tmp_path / "run")
        assert f"languages/{code}.yaml" in str(e.value) and "eval.lm_eval" in str(e.value)
    else:
        graph = build_graph(loaded, tmp_path / "run")
        evaluate = next(s for s in graph.specs if s.name == "evaluate")
        assert " models on " in evaluate.describe and evaluate.describe.split(" models on ")[1]
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_the_plan_says_what_is_evaluated(tmp_path):
    graph = build_graph(load_language("sw", profile="micro"), tmp_path / "run")
    describe = next(s for s in graph.specs if s.name == "evaluate").describe
    assert "MGSM (" in describe and "generated problems and their English originals" in describe
    assert "target-language perplexity" in describe


def test_a_profile_needing_lm_eval_fails_before_any_stage_where_it_is_missing(tmp_path, monkeypatch, capsys):
    # The test environment has lm-eval (its bridge is tested); this is what an install without it sees.
    monkeypatch.setattr(evaluate_module, "lm_eval_installed", lambda: False)
    errors = missing_packages(load_language("bo", profile="paper-ties-sv"))
    assert len(errors) == 1
    assert "profiles.paper-ties-sv.eval.lm_eval" in str(errors[0]) and 'pip install -e ".[eval]"' in str(errors[0])
    assert missing_packages(load_language("sw", profile="micro")) == []
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    args = ["adapt", "--lang", "bo", "--profile", "paper-ties-sv"]
    assert main(args + ["--run-dir", str(run)]) == 2
    assert "eval.lm_eval" in capsys.readouterr().err and not run.exists()
    assert main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "warning: " in out and "eval.lm_eval" in out
    monkeypatch.undo()
    assert missing_packages(load_language("bo", profile="paper-ties-sv")) == []  # installed here


def test_the_analysis_takes_the_experts_the_merges_take_not_a_baseline_none_takes(tmp_path):
    # Tibetan's micro extends the vocabulary: CT-then-SFT, trained on top of the language expert, has its larger
    # vocabulary too, and the delta analysis holds one extended model beside the base (found by `adapt --fast`).
    graph = build_graph(load_language("bo", profile="micro"), tmp_path / "run")
    analyze = next(s for s in graph.specs if s.name == "analyze")
    assert "expert:math" in analyze.deps and "language_expert" in analyze.deps
    assert "expert:ct_then_sft" not in analyze.deps
    evaluate = next(s for s in graph.specs if s.name == "evaluate")
    assert "expert:ct_then_sft" in evaluate.deps  # still trained and evaluated, as a baseline
