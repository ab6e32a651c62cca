"""Bad input of every kind gets one line naming the option, key or file, and exit code 2: never a traceback,
never a check silently switched off, never one of two conflicting options silently picked."""

from __future__ import annotations

import pytest

from conftest import CONFIGS, write_yaml
from kvbench.cli import app

TINY = str(CONFIGS / "tiny.yaml")


def assert_refused(result, *needles: str) -> None:
    """Exit 2, one error line holding every needle, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert all(needle in errors[0] for needle in needles), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["evaluate", "kv-evaluate"])
@pytest.mark.parametrize("option, value", [("--atol", "nan"), ("--atol", "inf"), ("--rtol", "nan"),
                                           ("--rtol", "inf"), ("--atol", "-1")])
def test_tolerances_must_be_finite_and_non_negative(runner, command, option, value):
    # nan compares false with every error, inf allows every error: either switched the check off
    assert_refused(runner.invoke(app, [command, "--config", TINY, option, value]), option, "finite")


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"),
                                           ("--temperature", "1e-45"), ("--top-p", "nan"), ("--top-p", "inf")])
@pytest.mark.parametrize("command", ["kv-evaluate", "generate"])
def test_non_finite_sampling_settings_are_refused(runner, command, option, value):
    args = ["--new-tokens", "3"] if command == "kv-evaluate" else ["--prompt-ids", "1", "--max-new-tokens", "3"]
    assert_refused(runner.invoke(app, [command, "--config", TINY, option, value, *args]), option)


@pytest.mark.parametrize("command, extra", [("evaluate", []), ("kv-evaluate", ["--new-tokens", "3"]),
                                            ("generate", ["--prompt-ids", "1"]), ("init-weights", ["w.safetensors"])])
@pytest.mark.parametrize("seed", ["100000000000000000000", "-1"])
def test_seeds_outside_torchs_range_are_refused(runner, tmp_path, monkeypatch, command, extra, seed):
    monkeypatch.chdir(tmp_path)
    assert_refused(runner.invoke(app, [command, "--config", TINY, "--seed", seed, *extra]), "--seed")


@pytest.mark.parametrize("seed", ["1e20", "1.0e+20", "100000000000000000000", "-3"])
def test_config_seed_outside_torchs_range_is_refused(runner, tmp_path, seed):
    config = write_yaml(tmp_path)
    config.write_text(config.read_text().replace("seed: 0", f"seed: {seed}"))
    assert_refused(runner.invoke(app, ["evaluate", "--config", str(config)]), "seed")


def test_config_layer_norm_eps_must_be_finite(runner, tmp_path):
    assert_refused(runner.invoke(app, ["evaluate", "--config", str(write_yaml(tmp_path, layer_norm_eps=float("inf")))]),
                   "layer_norm_eps")


def test_train_refuses_a_non_finite_or_non_positive_lr(runner, tmp_path):
    for lr in ("nan", "inf", "0", "-1e-3"):
        result = runner.invoke(app, ["train", "--config", TINY, "--lr", lr, "--out", str(tmp_path / "w.safetensors")])
        assert_refused(result, "--lr")
    assert not (tmp_path / "w.safetensors").exists()
