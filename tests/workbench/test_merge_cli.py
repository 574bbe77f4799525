"""`workbench merge` and `workbench analyze` through the installed command."""
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workbench.checkpoint import ModelReader
from workbench.cli import main


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


# ----- broken and hostile inputs (issue 20): a clean refusal, inputs untouched, nothing left behind

def _cli(capsys, *args):
    """Run the command in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _ties_recipe(folder: Path, **changes) -> Path:
    """A TIES recipe over base, lang and task (the tiny_family folders), with `changes` to its entries."""
    recipe = {"method": "ties", "base": "base", "models": [{"model": "lang", "density": 0.3},
                                                          {"model": "task", "density": 0.3}]}
    for key, value in changes.items():
        if key.startswith("models."):
            recipe["models"][0][key.split(".", 1)[1]] = value
        else:
            recipe[key] = value
    path = folder / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("out, overwrite, relation", [
    ("base", True, "the output is the input base"),
    (".", True, "the output contains the input base"),
    ("lang/merged", False, "the output is inside the input lang"),
    ("task/merged", True, "the output is inside the input task"),
    ("link", True, "the output is the input base"),  # a symlink to the base
    ("m", False, "the temporary folder is the input m.partial"),
])
def test_the_output_never_touches_an_input(tmp_path, tiny_family, capsys, out, overwrite, relation):
    recipe = _ties_recipe(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "base")
    shutil.copytree(tmp_path / "lang", tmp_path / "m.partial")  # a model whose name ends in .partial
    if out == "m":
        recipe = _ties_recipe(tmp_path, **{"models.model": "m.partial"})
    before = _digests(tmp_path)
    code, err = _cli(capsys, "merge", recipe, "--out", tmp_path / out, *(["--overwrite"] if overwrite else []))
    assert code == 2 and err.count("\n") == 1, err
    assert relation in err and "workbench never writes over its inputs" in err
    assert _digests(tmp_path) == before


def test_a_folder_the_tool_did_not_make_is_never_deleted(tmp_path, tiny_family, capsys):
    recipe = _ties_recipe(tmp_path)
    (tmp_path / "o.partial").mkdir()
    (tmp_path / "o.partial" / "notes.txt").write_text("mine")
    code, err = _cli(capsys, "merge", recipe, "--out", tmp_path / "o")
    assert code == 2 and f"{tmp_path / 'o.partial'} exists and was not made by workbench" in err
    assert (tmp_path / "o.partial" / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path / "o.partial")
    assert _cli(capsys, "merge", recipe, "--out", tmp_path / "o")[0] == 0
    # --overwrite renames the old output to o.replaced: a user's own o.replaced is refused first.
    (tmp_path / "o.replaced").mkdir()
    (tmp_path / "o.replaced" / "keep.txt").write_text("mine")
    before = _digests(tmp_path)
    code, err = _cli(capsys, "merge", recipe, "--out", tmp_path / "o", "--overwrite")
    assert code == 2 and f"{tmp_path / 'o.replaced'} exists and was not made by workbench" in err
    assert _digests(tmp_path) == before
    # --overwrite replaces a model folder, not a folder of other things.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photos").mkdir()
    code, err = _cli(capsys, "merge", recipe, "--out", tmp_path / "other", "--overwrite")
    assert code == 2 and "holds folders (photos)" in err and (tmp_path / "other" / "photos").is_dir()


@pytest.mark.parametrize("change, message", [
    ({"lambda": math.inf}, "lambda: expected a number in [-100, 100], got inf"),
    ({"models.weight": 1.0e308}, "models[0].weight: expected a number in [-100, 100], got 1e+308"),
    ({"method": "task_arithmetic", "models.weight": math.nan, "models.density": 1},
     "models[0].weight: expected a number in [-100, 100], got nan"),
    ({"models.weight": math.nan}, "models[0].weight: expected a number in [-100, 100], got nan"),
    ({"models.density": math.nan}, "models[0].density: expected a number in (0, 1], got nan"),
    ({"models.weight": [1]}, "models[0].weight: expected a number in [-100, 100], got [1]"),
])
def test_non_finite_or_absurd_recipe_values_stop_before_any_output(tmp_path, tiny_family, capsys, change, message):
    if change.get("method") == "task_arithmetic":
        change = dict(change)
        recipe = {"method": "task_arithmetic", "base": "base", "models": [
            {"model": "lang", "weight": change["models.weight"]}, {"model": "task"}]}
        (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
        path = tmp_path / "r.yml"
    else:
        path = _ties_recipe(tmp_path, **change)
    code, err = _cli(capsys, "merge", path, "--out", tmp_path / "o")
    assert code == 2 and err == f"workbench merge: error: {path}: {message}\n"
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("size", ["0MB", "0.1B", "infGB", "nanMB", "-1GB", "1e30GB"])
def test_an_impossible_shard_size_is_a_usage_error(tmp_path, tiny_family, capsys, size):
    code, err = _cli(capsys, "merge", _ties_recipe(tmp_path), "--out", tmp_path / "o", f"--max-shard-size={size}")
    assert code == 2 and f"--max-shard-size {size!r}: expected a size of at least 1B" in err
    assert not (tmp_path / "o.partial").exists()


def test_a_config_that_contradicts_the_weights_is_refused(tmp_path, tiny_family, capsys):
    config = json.loads((tmp_path / "lang" / "config.json").read_text())
    config["vocab_size"] = 9999
    (tmp_path / "lang" / "config.json").write_text(json.dumps(config))
    code, err = _cli(capsys, "merge", _ties_recipe(tmp_path), "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1
    assert "config.json vocab_size = 9999, but tensor 'model.embed_tokens.weight' has shape [512, 64]" in err
    assert not (tmp_path / "o").exists()


def test_more_vocabulary_rows_without_a_tokenizer_to_prove_them(tmp_path, tiny_llama_factory, capsys,
                                                                 extend_tokenizer):
    _, base = tiny_llama_factory("base")
    tiny_llama_factory("task", seed=2, base_state=base, delta_scale=0.02)
    tiny_llama_factory("lang", seed=1, vocab_size=528)  # the base's tokenizer: 512 tokens for 528 rows
    code, err = _cli(capsys, "merge", _ties_recipe(tmp_path), "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1
    assert ("lang: has 528 vocabulary rows where base has 512, which can be merged only as an extended "
            "vocabulary, and nothing proves one: the tokenizer of lang has 512 tokens, no more than the 512 of "
            "base. Give lang the tokenizer it was trained with") in err
    extend_tokenizer(tmp_path / "lang", 16)
    assert _cli(capsys, "merge", _ties_recipe(tmp_path), "--out", tmp_path / "o")[0] == 0


HOLD_LOCK = """
import sys, time
from workbench.outputs import OutputLock
OutputLock(sys.argv[1], "test").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_told_the_pid_and_a_killed_ones_lock_is_taken_over(tmp_path, tiny_family, capsys):
    recipe = _ties_recipe(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "o.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        code, err = _cli(capsys, "merge", recipe, "--out", tmp_path / "o")
        assert code == 1 and f"output {tmp_path / 'o'} is in use by PID {holder.pid}" in err
        assert not (tmp_path / "o.partial").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays
        holder.wait()
    assert (tmp_path / "o.lock").read_text().strip() == str(holder.pid)
    code, err = _cli(capsys, "merge", recipe, "--out", tmp_path / "o")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == ["o"]


def test_two_merges_started_together_one_writes_the_other_is_refused(tmp_path, tiny_family):
    recipe = _ties_recipe(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "workbench", "merge", str(recipe), "--out", str(tmp_path / "o"),
                               "--max-shard-size", "60KB"], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) in ([0, 1], [0, 2]), results
    loser = next(err for code, err in results if code)
    assert "is in use by PID" in loser or "already exists" in loser, loser
    assert "internal error" not in loser
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == ["o"]
    ModelReader(tmp_path / "o")


def _limit_file_size(limit):
    def apply():  # in the child: a write past `limit` fails with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_write_names_the_path_and_leaves_no_temporary_file(tmp_path, tiny_family):
    recipe = _ties_recipe(tmp_path)
    # The first shard holds lm_head alone (131 KB), the second grows past the 150 KB limit.
    args = [sys.executable, "-m", "workbench", "merge", str(recipe), "--out", str(tmp_path / "o"),
            "--max-shard-size", "200KB"]
    out = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit_file_size(150_000), timeout=300)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"error: {tmp_path / 'o.partial'}" in out.stderr and "cannot write: File too large" in out.stderr
    assert "internal error" not in out.stderr
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "o.lock").exists()
    # Finished shards are kept for the rerun only when there are some, and then the message names them.
    partial = tmp_path / "o.partial"
    assert partial.exists() == (f"the finished shards are kept in {partial}" in out.stderr)
    assert partial.exists() and len(list(partial.glob("model-*.safetensors"))) == 1
    # With room again, the rerun resumes and gives the same bytes as a merge that never failed.
    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0
    assert subprocess.run(args[:6] + [str(tmp_path / "ref")] + args[7:], capture_output=True).returncode == 0
    weights = {k: v for k, v in _digests(tmp_path / "ref").items() if ".safetensors" in k}
    assert len(weights) > 2 and {k: v for k, v in _digests(tmp_path / "o").items() if ".safetensors" in k} == weights


def _read_only(folder: Path):
    """A command prefix under which `folder` is read-only, even for root (a read-only bind mount in a user
    namespace); None where neither that nor file permissions can make it so."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    prefix = ["unshare", "-rm", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && '
              'exec "$@"', "sh", str(folder)]
    if shutil.which("unshare") is None or subprocess.run(prefix + ["true"], capture_output=True).returncode:
        return None
    return prefix


def test_a_read_only_output_folder_is_an_io_error_naming_it(tmp_path, tiny_family):
    recipe = _ties_recipe(tmp_path)
    (tmp_path / "ro").mkdir()
    prefix = _read_only(tmp_path / "ro")
    if prefix is None:
        pytest.skip("running as root without user namespaces: no way to make a folder read-only")
    out = subprocess.run(prefix + [sys.executable, "-m", "workbench", "merge", str(recipe), "--out",
                                   str(tmp_path / "ro" / "o")], capture_output=True, text=True, timeout=300)
    (tmp_path / "ro").chmod(0o755)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert f"error: {tmp_path / 'ro' / 'o.lock'}: cannot create the lock file" in out.stderr
    assert "internal error" not in out.stderr and not list((tmp_path / "ro").iterdir())


def test_a_merge_that_fails_on_its_inputs_leaves_no_partial(tmp_path, tiny_family, capsys):
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "task" / "model.safetensors")
    name = "model.layers.3.mlp.down_proj.weight"  # late in the plan: shards before it are finished
    state[name][0, 0] = float("nan")
    save_file(state, tmp_path / "task" / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(capsys, "merge", _ties_recipe(tmp_path), "--out", tmp_path / "o", "--max-shard-size", "40KB")
    assert code == 1 and f"tensor {name}: NaN/Inf" in err and "--allow-nonfinite" in err
    # The fix (a repaired model, or --allow-nonfinite) changes the resume key: the shards could never be used.
    assert not (tmp_path / "o.partial").exists() and not (tmp_path / "o").exists()


def test_analyze_writes_nothing_into_an_input(tmp_path, tiny_family, capsys):
    before = _digests(tmp_path)
    code, err = _cli(capsys, "analyze", tmp_path / "base", f"sw={tmp_path / 'lang'}", "--out", tmp_path / "lang")
    assert code == 2 and "the analysis folder is the input sw" in err
    assert _digests(tmp_path) == before


HEAVY = ("transformers", "peft", "datasets", "accelerate", "matplotlib")
_RUN_AND_LIST = ("import sys\nfrom workbench.cli import main\nrc = main(sys.argv[1:])\n"
                 "print('HEAVY', rc, ' '.join(sorted(m for m in {heavy} if m in sys.modules)))")


def test_merge_and_analyze_import_only_what_they_need(tmp_path, tiny_family):
    """A merge imports torch, safetensors and the merge path; never the training or plotting libraries
    (seconds of start-up on every merge). analyze plots its heatmap, so matplotlib comes in then, only."""
    (b_dir, _), (l_dir, _), (t_dir, _) = tiny_family["base"], tiny_family["language"], tiny_family["task"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(b_dir), "models": [
        {"model": str(l_dir), "density": 0.3}, {"model": str(t_dir), "density": 0.3}]}))
    code = _RUN_AND_LIST.format(heavy=HEAVY)
    merge = subprocess.run([sys.executable, "-c", code, "merge", str(recipe), "--out", str(tmp_path / "m")],
                           capture_output=True, text=True, cwd=tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert merge.stdout.splitlines()[-1] == "HEAVY 0 ", merge.stdout
    analyze = subprocess.run([sys.executable, "-c", code, "analyze", str(b_dir), f"sw={l_dir}", "--out",
                              str(tmp_path / "an")], capture_output=True, text=True, cwd=tmp_path)
    assert analyze.returncode == 0, analyze.stderr
    assert analyze.stdout.splitlines()[-1] == "HEAVY 0 matplotlib", analyze.stdout
    assert (tmp_path / "an").is_dir()
