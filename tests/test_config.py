"""Every config error is one line naming the key, value or file, with exit code 2 and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, write_yaml
from kvbench.cli import app
from kvbench.config import load_config
from kvbench.errors import KVBenchError


def run_evaluate(runner, config: Path):
    return runner.invoke(app, ["evaluate", "--config", str(config), "--device", "cpu", "--prompt-len", "4"])


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], result.output


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"n_layer": 2}, ["unknown key 'n_layer'", "n_layers"]),
        ({"n_heads": "four"}, ["n_heads", "'four'"]),
        ({"d_model": 32.0}, ["d_model", "32.0"]),
        ({"tie_embeddings": "yes"}, ["tie_embeddings"]),
        ({"n_layers": 0}, ["n_layers", "greater than 0"]),
        ({"d_ff": -5}, ["d_ff", "-5"]),
        ({"n_heads": 5}, ["d_model (32)", "n_heads (5)"]),
        ({"positional": "rotary"}, ["positional", "'rotary'"]),
        ({"layer_norm_eps": 0.0}, ["layer_norm_eps"]),
        ({"positional": "sinusoidal", "d_model": 33, "n_heads": 3}, ["even d_model"]),
    ],
)
def test_bad_values_name_the_key(runner, tmp_path, overrides, needles):
    result = run_evaluate(runner, write_yaml(tmp_path, **overrides))
    assert_clean_error(result, str(tmp_path / "model.yaml"), *needles)


def test_a_misspelt_required_key_names_the_spelling_not_only_the_missing_key(runner, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("\n".join(f"{'vocab_sise' if k == 'vocab_size' else k}: {v}" for k, v in TINY.items()))
    assert_clean_error(run_evaluate(runner, path), "unknown key 'vocab_sise'", "did you mean 'vocab_size'?")


def test_missing_key_is_named(runner, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in TINY.items() if k != "vocab_size"))
    assert_clean_error(run_evaluate(runner, path), "vocab_size")


@pytest.mark.parametrize("text, needle", [("", "empty"), ("n_layers: [1,\n", "not valid YAML"),
                                          ("- 1\n- 2\n", "mapping"), ("just words", "mapping")])
def test_empty_or_non_yaml_file(runner, tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_clean_error(run_evaluate(runner, path), str(path), needle)


def test_missing_config_file(runner, tmp_path):
    assert_clean_error(run_evaluate(runner, tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_yaml_cannot_construct_objects(runner, tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("n_layers: !!python/object/apply:os.system ['echo pwned']\n")
    assert_clean_error(run_evaluate(runner, path), "not valid YAML")


def test_missing_weights_file(runner, tmp_path):
    result = run_evaluate(runner, write_yaml(tmp_path, weights="absent.safetensors"))
    assert_clean_error(result, "absent.safetensors", "not found")


def test_corrupt_weights_file(runner, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    result = run_evaluate(runner, write_yaml(tmp_path, weights="w.safetensors"))
    assert_clean_error(result, "w.safetensors", "not a valid safetensors")


def test_pickle_weights_are_refused(runner, tmp_path):
    torch.save({"lm_head.weight": torch.zeros(32, 97)}, tmp_path / "w.safetensors")
    result = run_evaluate(runner, write_yaml(tmp_path, weights="w.safetensors"))
    assert_clean_error(result, "w.safetensors", "not a valid safetensors")


def test_weights_of_wrong_shape(runner, tmp_path):
    runner.invoke(app, ["init-weights", str(tmp_path / "w.safetensors"), "--config", str(write_yaml(tmp_path))])
    result = run_evaluate(runner, write_yaml(tmp_path, "other.yaml", weights="w.safetensors", d_ff=128))
    assert_clean_error(result, "w.safetensors", "blocks.0.mlp.fc.weight", "(32, 64)", "(32, 128)")


def test_weights_with_missing_tensor(runner, tmp_path):
    save_file({"lm_head.weight": torch.zeros(32, 97)}, str(tmp_path / "w.safetensors"))
    result = run_evaluate(runner, write_yaml(tmp_path, weights="w.safetensors"))
    assert_clean_error(result, "w.safetensors", "missing")


def test_yaml_float_spelling_without_dot_is_accepted(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(write_yaml(tmp_path).read_text().replace("layer_norm_eps: 1.0e-05", "layer_norm_eps: 1e-5"))
    assert "1e-5" in path.read_text()
    assert load_config(path).model.layer_norm_eps == 1e-5


def test_weights_path_is_relative_to_the_yaml(tmp_path):
    (tmp_path / "sub").mkdir()
    config = load_config(write_yaml(tmp_path / "sub", weights="w.safetensors"))
    assert config.weights_path == (tmp_path / "sub" / "w.safetensors").resolve()


def test_shipped_configs_load():
    from conftest import CONFIGS

    for path in CONFIGS.glob("*.yaml"):
        load_config(path)  # raises on any invalid shipped config


def test_error_is_a_kvbench_error(tmp_path):
    with pytest.raises(KVBenchError):
        load_config(write_yaml(tmp_path, n_heads=3))


def test_a_key_given_twice_is_refused(runner, tmp_path):
    path = write_yaml(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + ["n_layers: 3"]) + "\n")  # plain YAML would keep the last value silently
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("n_layers:"))
    assert_clean_error(run_evaluate(runner, path), str(path), "'n_layers' is given twice",
                       f"lines {first} and {len(lines) + 1}")
