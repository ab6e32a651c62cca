"""The CLI through typer's CliRunner: options, defaults and the one error path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO
from kvbench.cli import app

TINY = str(CONFIGS / "tiny.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["evaluate", "kv-evaluate"])
def test_cuda_without_cuda_is_a_clear_error(runner, command):
    result = runner.invoke(app, [command, "--config", TINY, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device cuda: CUDA is not available" in result.output and "--device cpu" in result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--strategies", "static,paged"], "unknown strategy 'paged'"),
        (["--strategies", ","], "--strategies is empty"),
        (["--new-tokens", "0"], "--new-tokens must be a positive integer"),
        (["--batch-size", "-1"], "--batch-size must be a positive integer"),
        (["--new-tokens", "1300"], "do not fit max_seq_len 1280"),
        (["--device", "tpu"], "--device 'tpu' is not a device"),
    ],
)
def test_kv_evaluate_bad_options(runner, args, needle):
    result = runner.invoke(app, ["kv-evaluate", "--config", TINY, *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_default_config_passes_kv_evaluate_briefly(runner):
    result = runner.invoke(app, ["kv-evaluate", "--new-tokens", "12", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "default" in result.output


def test_default_config_passes_evaluate(runner):
    result = runner.invoke(app, ["evaluate", "--prompt-len", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_init_weights_refuses_to_overwrite(runner, tmp_path):
    target = tmp_path / "w.safetensors"
    assert runner.invoke(app, ["init-weights", str(target), "--config", TINY]).exit_code == 0
    again = runner.invoke(app, ["init-weights", str(target), "--config", TINY])
    assert again.exit_code == 2 and "--force" in again.output


def test_python_dash_m_runs():
    result = subprocess.run([sys.executable, "-m", "kvbench", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "kv-evaluate" in result.stdout
