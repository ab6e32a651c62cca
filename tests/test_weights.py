"""Weight files: never written with NaN/inf, and flagged when read with them."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import random_model, write_yaml
from kvbench.cli import app
from kvbench.errors import KVBenchError, KVBenchWarning
from kvbench.weights import save_weights


def test_save_weights_refuses_non_finite_tensors(tmp_path):
    model = random_model()
    model.ln_f.weight.data[3] = float("inf")
    with pytest.raises(KVBenchError, match="ln_f.weight"):
        save_weights(model, tmp_path / "w.safetensors")
    assert not list(tmp_path.iterdir())  # not even the temporary file


def weights_file(runner, tmp_path, change) -> Path:
    path = tmp_path / "w.safetensors"
    assert runner.invoke(app, ["init-weights", str(path), "--config", str(write_yaml(tmp_path))]).exit_code == 0
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path))
    return write_yaml(tmp_path, name="with-weights.yaml", weights="w.safetensors")


def poison(tensors):
    tensors["ln_f.weight"][0] = float("nan")


def test_nan_weights_are_flagged_when_read_and_fail_evaluate(runner, tmp_path):
    result = runner.invoke(app, ["evaluate", "--config", str(weights_file(runner, tmp_path, poison))])
    assert result.exit_code == 1, result.output
    assert "warning:" in result.output and "'ln_f.weight' holds 1 NaN/inf" in result.output


def test_reading_nan_weights_warns_with_kvbench_warning(tmp_path, runner):
    from kvbench.config import load_config
    from kvbench.weights import load_cpu_model

    with pytest.warns(KVBenchWarning, match="ln_f.weight"):
        load_cpu_model(load_config(weights_file(runner, tmp_path, poison)))
