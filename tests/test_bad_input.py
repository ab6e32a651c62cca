"""Bad input of every kind gets one line naming the option, key or file, and exit code 2: never a traceback,
never a check silently switched off, never one of two conflicting options silently picked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def gpt2_dir(tmp_path, **overrides):
    """A checkpoint directory whose config.json has the given values (the weights are never reached)."""
    hf = {**dict(model_type="gpt2", n_layer=1, n_embd=32, n_head=4, vocab_size=97, n_positions=64,
                 layer_norm_epsilon=1e-5), **overrides}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("key, value", [("layer_norm_epsilon", "abc"), ("layer_norm_epsilon", None),
                                        ("n_embd", "32"), ("n_layer", [1]), ("tie_word_embeddings", "yes"),
                                        ("n_positions", 64.5), ("activation_function", ["gelu"])])
def test_gpt2_config_json_with_a_wrong_type_names_its_key(runner, tmp_path, key, value):
    result = runner.invoke(app, ["evaluate", "--config", str(gpt2_dir(tmp_path, **{key: value}))])
    assert_refused(result, "config.json", key)


def test_generate_takes_exactly_one_strategy(runner):
    result = runner.invoke(app, ["generate", "--config", TINY, "--strategy", "naive,static", "--prompt-ids", "1"])
    assert_refused(result, "--strategy", "naive,static")


def test_generate_refuses_both_prompt_forms(runner):
    result = runner.invoke(app, ["generate", "--config", TINY, "--prompt", "x", "--prompt-ids", "1"])
    assert_refused(result, "--prompt", "--prompt-ids", "not both")


@pytest.mark.parametrize("ids, position", [("1,,2", "item 2"), ("1,2,", "item 3"), (",1", "item 1")])
def test_prompt_ids_with_an_empty_item_are_refused(runner, ids, position):
    result = runner.invoke(app, ["generate", "--config", TINY, "--prompt-ids", ids, "--max-new-tokens", "2"])
    assert_refused(result, "--prompt-ids", position)


def test_device_cuda_x_is_not_a_device_and_prints_as_typed(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", TINY, "--device", "cuda:x"])
    assert_refused(result, "'cuda:x' is not a device")
    assert "❌" not in result.output  # rich read `:x:` as an emoji code


def test_user_text_is_printed_as_typed_not_as_markup(runner, tmp_path):
    config = write_yaml(tmp_path, name="[red]tiny:x:.yaml")
    result = runner.invoke(app, ["evaluate", "--config", str(config), "--prompt-len", "4"])
    assert result.exit_code == 0, result.output
    assert "[red]tiny:x:" in result.output


@pytest.fixture
def expected_file(runner, tmp_path):
    path = tmp_path / "expected.safetensors"
    result = runner.invoke(app, ["evaluate", "--config", TINY, "--prompt-len", "4", "--write-expected", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_expected_file_with_integer_logits_is_refused(runner, expected_file):
    tensors = load_file(expected_file)
    save_file({**tensors, "logits": tensors["logits"].to(torch.int32)}, str(expected_file))
    assert_refused(runner.invoke(app, ["evaluate", "--config", TINY, "--expected", str(expected_file)]),
                   "logits must be floating point", "int32")


def test_expected_file_with_zero_length_ids_is_refused(runner, expected_file):
    tensors = load_file(expected_file)
    save_file({"input_ids": tensors["input_ids"][:, :0].contiguous(), "logits": tensors["logits"][:, :0].contiguous()},
              str(expected_file))
    assert_refused(runner.invoke(app, ["evaluate", "--config", TINY, "--expected", str(expected_file)]),
                   "input_ids", "no token")


def test_train_refuses_a_non_finite_or_non_positive_lr(runner, tmp_path):
    for lr in ("nan", "inf", "0", "-1e-3"):
        result = runner.invoke(app, ["train", "--config", TINY, "--lr", lr, "--out", str(tmp_path / "w.safetensors")])
        assert_refused(result, "--lr")
    assert not (tmp_path / "w.safetensors").exists()


def test_generated_text_is_printed_as_generated(capsys):
    from types import SimpleNamespace

    from kvbench.cli.text import stream_one
    from kvbench.textgen import TokenEvent

    class Stream:  # what TextStream yields, with text that rich would read as markup and an emoji code
        summary = SimpleNamespace(describe=lambda: "1 token")

        def __iter__(self):
            yield TokenEvent(0, 91, "[bold]x:x:", 0.001)

    stream_one(Stream(), token_times=True, echo=None)
    assert "'[bold]x:x:'" in capsys.readouterr().out


# --- options that would be ignored are refused or said to be ------------------------------------------------------

@pytest.mark.parametrize("command", ["kv-evaluate", "benchmark"])
def test_empty_strategies_are_refused_not_read_as_the_default(runner, tmp_path, command):
    result = runner.invoke(app, [command, "--config", "tiny", "--strategies", ""])
    assert result.exit_code == 2 and "--strategies is empty" in result.output, result.output


@pytest.mark.parametrize("strategies, warned", [("static", True), ("sliding", False)])
def test_a_window_no_strategy_attends_is_said_to_have_no_effect(runner, strategies, warned):
    result = runner.invoke(app, ["kv-evaluate", "--config", "tiny", "--strategies", strategies, "--window", "8",
                                 "--new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert ("--window 8 has no effect" in result.stderr) == warned, result.stderr


def test_naive_max_without_naive_is_said_to_have_no_effect(runner, tmp_path):
    result = runner.invoke(app, ["benchmark", "--config", "tiny", "--strategies", "static", "--naive-max", "4",
                                 "--lengths", "4", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "--naive-max 4 has no effect" in result.stderr


def test_evaluate_with_an_expected_file_refuses_prompt_options_it_would_ignore(runner, tmp_path):
    expected = tmp_path / "expected.safetensors"
    assert runner.invoke(app, ["evaluate", "--config", "tiny", "--write-expected", str(expected)]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "--config", "tiny", "--expected", str(expected), "--prompt-len", "8"])
    assert result.exit_code == 2 and "holds its own prompt ids; drop --prompt-len" in result.output, result.output
    assert runner.invoke(app, ["evaluate", "--config", "tiny", "--expected", str(expected)]).exit_code == 0


def test_a_failed_comparison_says_which_model_the_expected_file_was_written_for(runner, tmp_path):
    from conftest import write_yaml

    expected = tmp_path / "expected.safetensors"
    written = write_yaml(tmp_path, "written.yaml", seed=0)
    assert runner.invoke(app, ["evaluate", "--config", str(written), "--write-expected", str(expected)]).exit_code == 0
    other = write_yaml(tmp_path, "other.yaml", seed=1)  # same shapes, other weights
    result = runner.invoke(app, ["evaluate", "--config", str(other), "--expected", str(expected)])
    assert result.exit_code == 1, result.output
    assert f"note: {expected} was written for config written (values" in result.stderr
    assert "this run is config other (values" in result.stderr
    again = runner.invoke(app, ["evaluate", "--config", str(written), "--expected", str(expected)])
    assert again.exit_code == 0 and "note:" not in again.stderr
    wider = write_yaml(tmp_path, "wider.yaml", vocab_size=101)  # another vocabulary: refused before comparing
    refused = runner.invoke(app, ["evaluate", "--config", str(wider), "--expected", str(expected)])
    assert refused.exit_code == 2 and "it was written for config written (values" in refused.output, refused.output
