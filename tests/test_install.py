"""The shipped configs are package data: the default config and `--config NAME` work from any directory, after an
editable install (this checkout) and after a non-editable one (built here into a temporary directory)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO
from kvbench.cli import app
from kvbench.config import load_config, shipped_configs

pytestmark = pytest.mark.slow


def kvbench_in(cwd: Path, *args: str, python_args: tuple[str, ...] = (), env: dict | None = None):
    return subprocess.run([sys.executable, *python_args, "-m", "kvbench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_default_config_from_another_directory(tmp_path):
    done = kvbench_in(tmp_path, "evaluate", "--prompt-len", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("default: prompt (1, 2)"), done.stdout


def test_shipped_names_resolve_from_anywhere(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny").source == shipped_configs() / "tiny.yaml"
    assert load_config("tiny.yaml").model.d_model == 64  # no local tiny.yaml: the shipped one
    reference = runner.invoke(app, ["evaluate", "--config", "reference", "--expected",
                                    str(shipped_configs() / "reference-expected.safetensors"), "--device", "cpu"])
    assert reference.exit_code == 0, reference.output  # its weights file is found beside the shipped YAML


def test_a_local_file_is_taken_over_a_shipped_name_only_when_spelled_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text((shipped_configs() / "tiny.yaml").read_text().replace("d_model: 64",
                                                                                             "d_model: 32"))
    assert load_config("tiny.yaml").model.d_model == 32  # an existing file wins over the shipped name
    assert load_config("./tiny.yaml").model.d_model == 32
    assert load_config("tiny").model.d_model == 64  # a bare name is always the shipped config


def test_repository_configs_are_the_package_data():
    """One copy: the top-level configs/ people read and edit is the package's directory, not a second copy."""
    assert (REPO / "configs").resolve() == (REPO / "kvbench" / "configs").resolve()
    assert shipped_configs().resolve() == (REPO / "kvbench" / "configs").resolve()


def test_non_editable_install_runs_from_another_directory(tmp_path):
    """`pip install .` (no -e), then benchmark and the default config from a directory with no configs/ in it."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "results", "tests", "build", "*.egg-info", "__pycache__",
                                                  ".pytest_cache", ".hypothesis", "docs"))
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "--target", str(target), str(source)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    assert (target / "kvbench" / "configs" / "demo.safetensors").is_file()
    assert (target / "kvbench" / "csrc" / "attention.cpp").is_file()  # the attention kernels build from it
    work = tmp_path / "work"
    work.mkdir()
    # -S: no site processing, so this checkout's editable-install hook cannot shadow the installed copy;
    # the dependencies come from this environment's site-packages, after the installed kvbench.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    where = subprocess.run([sys.executable, "-S", "-c", "import kvbench; print(kvbench.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(target)), where
    done = kvbench_in(work, "benchmark", "--config", "tiny", "--lengths", "3", "--repeats", "1", "--device", "cpu",
                      python_args=("-S",), env=env)
    assert done.returncode == 0, done.stderr
    assert len(list((work / "results").glob("*-tiny-cpu/results.csv"))) == 1
    default = kvbench_in(work, "evaluate", "--prompt-len", "2", "--device", "cpu", python_args=("-S",), env=env)
    assert default.returncode == 0 and default.stdout.startswith("default:"), default.stderr
