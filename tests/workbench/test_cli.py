"""The installed `workbench` command: subcommands, help, exit codes, one-line errors; the package layout."""
import subprocess
import sys

import pytest

from workbench.cli import COMMANDS


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True, cwd=cwd)


def test_every_subcommand_has_help(tmp_path):
    assert set(COMMANDS) == {"adapt", "pretrain", "fetch", "analyze", "merge", "eval", "bench", "languages"}
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


def test_bad_usage_exits_2_and_config_error_is_one_line(tmp_path):
    assert run("no-such-command", cwd=tmp_path).returncode == 2
    out = run("languages", "xx", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "unknown language 'xx'; available: bn, bo, ja, mn, sw, te, ug" in out.stderr
    assert "Traceback" not in out.stderr
    debug = run("languages", "xx", "--debug", cwd=tmp_path)
    assert "Traceback" in debug.stderr


def test_installed_layout_has_no_top_level_kernels_or_pipelines(tmp_path):
    # From outside the repository: the mapped packages import under workbench, never at the top level.
    code = ("import importlib.util as u, workbench.kernels, workbench.pipelines, workbench.languages;"
            "print(u.find_spec('kernels') is None, u.find_spec('pipelines') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
    for name in ("kernels", "pipelines"):
        fail = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=tmp_path)
        assert fail.returncode != 0 and "ModuleNotFoundError" in fail.stderr


def test_language_files_ship_as_package_data(tmp_path):
    code = ("from workbench.config.loader import shipped_languages_dir as d; p = d();"
            "print(sorted(x.name for x in p.glob('*.yaml'))); print((p / 'corpora' / 'sw.txt').is_file(),"
            "(p / 'mgsm' / 'mgsm_sw.tsv').is_file())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sw.yaml" in out.stdout and "True True" in out.stdout
