"""`workbench merge` and `workbench analyze` through the installed command."""
import json
import subprocess
import sys

import yaml


def workbench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, cwd=cwd)


def test_merge_command_writes_model_card_and_report(tmp_path, tiny_family):
    (b_dir, _), (l_dir, _), (t_dir, _) = tiny_family["base"], tiny_family["language"], tiny_family["task"]
    recipe = tmp_path / "recipe.yaml"
    # Paths relative to the recipe file.
    recipe.write_text(yaml.safe_dump({"method": "ties_sv", "base": b_dir.name, "models": [
        {"model": l_dir.name, "density": 0.3}, {"model": t_dir.name, "density": 0.3, "slack": 0.1}]}))
    out = workbench("merge", str(recipe), "--out", str(tmp_path / "merged"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "merged (ties_sv)" in out.stdout and "without slack" in out.stdout and "protected" in out.stdout
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["papers"]["ties_sv"].startswith("Tao et al., 2024")
    assert set(report["inputs"]) == {b_dir.name, l_dir.name, t_dir.name}
    from workbench.kernels import cpu_native

    assert report["device"] == "cpu" and report["kernels"] == cpu_native.why()  # as the subprocess saw it
    assert f"on cpu, {report['kernels']} -> " in out.stdout
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## What entered the merge" in card and "sha256" in card and "without slack" in card
    again = workbench("merge", str(recipe), "--out", str(tmp_path / "merged"), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_merge_command_rejects_a_bad_recipe_with_its_key(tmp_path, tiny_family):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": "x", "models": [{"model": "y", "density": 1.5}]}))
    out = workbench("merge", str(recipe), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"workbench merge: error: {recipe}: models[0].density: expected a number in (0, 1], "
                                  f"got 1.5")


def test_analyze_writes_profile_heatmap_and_suggestion(tmp_path, tiny_family):
    (b_dir, _), (l_dir, _), (t_dir, _) = tiny_family["base"], tiny_family["language"], tiny_family["task"]
    out = workbench("analyze", str(b_dir), f"sw={l_dir}", f"math={t_dir}", "--out", str(tmp_path / "an"),
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    profile = json.loads((tmp_path / "an" / "delta_profile.json").read_text())
    assert set(profile["experts"]) == {"sw", "math"}
    assert len(profile["experts"]["sw"]["layer_relative_change"]) == 4
    # The fixture's language expert changed layers 0 and 3 most, the task expert layers 1 and 2.
    assert (profile["suggested_swap"]["bottom"], profile["suggested_swap"]["top"]) == (1, 1)
    assert (tmp_path / "an" / "delta_heatmap.png").stat().st_size > 5000
    assert "suggested layer swap" in out.stdout
