"""The installed `workbench` command: subcommands, help, exit codes, one-line errors; the package layout."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import COMMANDS


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, cwd=cwd)


def test_every_subcommand_has_help(tmp_path):
    assert set(COMMANDS) == {"adapt", "pretrain", "fetch", "analyze", "merge", "eval", "export", "bench", "languages"}
    for name in COMMANDS:
        out = run(name, "--help", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"usage: workbench {name}" in out.stdout


def test_languages_lists_every_language_and_profile(tmp_path):
    out = run("languages", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for code in ("sw", "te", "bn", "ja", "bo", "ug", "mn"):
        assert f"\n{code} " in out.stdout
    assert "micro" in out.stdout and "paper-ties-sv" in out.stdout


def test_a_command_imports_with_the_collector_paused_and_then_frozen(tmp_path):
    # As a program, `workbench merge` imports torch and the merge path with the cyclic collector paused,
    # then freezes what it imported, and runs with the collector on again: no collection during the
    # imports, none walking the imported objects later. Called from Python (main(argv)), it leaves the
    # caller's collector alone.
    probe = ("import gc, sys\n"
             "runs = []\n"
             "gc.callbacks.append(lambda phase, info: phase == 'start' and runs.append(info['generation']))\n"
             "from workbench import cli\n"
             "sys.argv = ['workbench', 'merge', '--help']\n"
             "try:\n"
             "    cli.main()\n"
             "except SystemExit:\n"
             "    pass\n"
             "print('PROBE', gc.isenabled(), gc.get_freeze_count() > 10_000, 'torch' in sys.modules, len(runs))\n"
             "frozen = gc.get_freeze_count()\n"
             "gc.unfreeze()\n"
             "cli.main(['languages'])\n"
             "print('PROBE', gc.isenabled(), gc.get_freeze_count())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    program, called = [line[len("PROBE "):] for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    enabled, frozen, has_torch, collections = program.split()
    assert (enabled, frozen, has_torch) == ("True", "True", "True")
    assert int(collections) < 20     # importing torch unpaused sets off hundreds (about 380 measured)
    assert called == "True 0"


def test_bad_usage_exits_2_and_config_error_is_one_line(tmp_path):
    assert run("no-such-command", cwd=tmp_path).returncode == 2
    out = run("languages", "xx", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "unknown language 'xx'; available: bn, bo, ja, mn, sw, te, ug" in out.stderr
    assert "Traceback" not in out.stderr
    debug = run("languages", "xx", "--debug", cwd=tmp_path)
    assert "Traceback" in debug.stderr


REPO = Path(__file__).resolve().parents[2]

LAYOUT_PROBE = """
import importlib.util, json, sys
import workbench.kernels.ties, workbench.pipelines.runner, workbench.languages
top = {name: importlib.util.find_spec(name) for name in ("kernels", "pipelines")}
print(json.dumps({name: None if spec is None else {"origin": spec.origin,
                                                   "locations": list(spec.submodule_search_locations or [])}
                  for name, spec in top.items()}))
"""


@pytest.mark.parametrize("where", ["elsewhere", "repository root"])
def test_kernels_and_pipelines_import_only_under_workbench(tmp_path, where):
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` and notebooks do.
    cwd = REPO if where == "repository root" else tmp_path
    out = subprocess.run([sys.executable, "-c", LAYOUT_PROBE], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    kernels = found["kernels"]
    if kernels is not None:  # Hugging Face's `kernels` (transformers depends on it): never the project's folder
        assert kernels["origin"] and not Path(kernels["origin"]).is_relative_to(REPO), kernels
    pipelines = found["pipelines"]
    # At most the bare folder (a namespace: no code runs) where the repository root is on the path.
    assert pipelines is None or pipelines["origin"] in (None, "namespace"), pipelines


def test_a_second_checkout_reads_its_own_language_files(tmp_path):
    # `python -m workbench` from another checkout (a git worktree) beside the installed one: its own package,
    # kernels, pipelines and language files, never the installed checkout's `languages/` (the editable finder
    # maps that one by name; found when a worktree's runs read main's profiles).
    other = tmp_path / "checkout"
    shutil.copytree(REPO / "workbench", other / "workbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("kernels", "pipelines"):
        (other / name).mkdir()
    (other / "languages").mkdir()
    (other / "languages" / "__init__.py").write_text('WHERE = "second checkout"\n')
    code = "import workbench.languages as L, workbench.kernels as K; print(L.WHERE, list(K.__path__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=other)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"second checkout {[str(other.resolve() / 'kernels')]}"


def test_transformers_imports_hugging_face_kernels_from_the_repository_root():
    code = ("from transformers import LlamaForCausalLM\n"
            "import importlib.util\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec is not None and spec.origin else 'absent')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "absent" or not Path(out.stdout.strip()).is_relative_to(REPO), out.stdout


def test_modules_run_from_the_repository_root():
    out = subprocess.run([sys.executable, "-m", "workbench", "merge", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_language_files_ship_as_package_data(tmp_path):
    code = ("from workbench.config.loader import shipped_languages_dir as d; p = d();"
            "print(sorted(x.name for x in p.glob('*.yaml'))); print((p / 'corpora' / 'sw.txt').is_file(),"
            "(p / 'mgsm' / 'mgsm_sw.tsv').is_file())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sw.yaml" in out.stdout and "True True" in out.stdout


def test_adapt_set_values_are_checked_like_the_file(tmp_path):
    out = run("adapt", "--lang", "sw", "--set", "merges.ties.lambda=.inf", "--dry-run", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "profiles.micro.merges.ties.lambda: expected a number in [-100, 100], got inf" in out.stderr


def test_adapt_never_writes_its_run_directory_over_its_inputs(tmp_path, capsys):
    from workbench.cli import main
    from workbench.config.loader import load_language

    own = tmp_path / "my_sw.yaml"
    own.write_text(load_language("sw").file.read_text(encoding="utf-8").replace(
        "path: corpora/sw.txt", "path: text/sw.txt"), encoding="utf-8")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "sw.txt").write_text("Habari za asubuhi, rafiki yangu mpendwa.\n", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for run_dir, relation in ((tmp_path, "contains the input the config file"),
                              (tmp_path / "text", "contains the input sources.shipped.path"),
                              (tmp_path / "text" / "sw.txt" / "run", "is inside the input sources.shipped.path")):
        assert main(["adapt", "--lang", str(own), "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert f"--run-dir {run_dir}: the run directory {relation}" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
