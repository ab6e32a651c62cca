"""Weight files: never written with NaN/inf, flagged when read with them, and read at their own precision by
the float64 reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, write_yaml
from kvbench import verify
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


def test_the_reference_reads_float64_weights_unrounded(runner, tmp_path, monkeypatch):
    def to_float64_off_the_float32_grid(tensors):
        for name, t in tensors.items():
            tensors[name] = t.double() + 1e-12  # no float32 holds these values

    config = weights_file(runner, tmp_path, to_float64_off_the_float32_grid)
    seen = {}
    original = verify.numpy_reference

    def spy(cpu_weights, config_, inputs):
        seen.update(cpu_weights)
        return original(cpu_weights, config_, inputs)

    monkeypatch.setattr(verify, "numpy_reference", spy)
    result = runner.invoke(app, ["evaluate", "--config", str(config), "--prompt-len", "4"])
    assert result.exit_code == 0, result.output
    assert "weights float64" in result.output
    file = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(seen[name].double(), file[name]) for name in file)
