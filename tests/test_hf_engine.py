"""--engine transformers: transformers' own caches on transformers' own models, checked against its uncached
forward by kv-evaluate and timed by benchmark, on random tiny checkpoints written by save_pretrained."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from kvbench import hf_caches  # noqa: E402
from kvbench.bench.results import RUN_COLUMNS  # noqa: E402
from kvbench.cli import app  # noqa: E402
from kvbench.hf_engine import EngineCache  # noqa: E402
from kvbench.strategies import TRANSFORMERS, Strategy  # noqa: E402
from tests.conftest import verdicts  # noqa: E402

# transformers' caches as kvbench checks them; an older transformers (a GPU image's) is refused, tested below
recent = pytest.mark.skipif(not hf_caches.recent_enough(), reason="transformers older than hf_caches.MIN_TRANSFORMERS")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)  # head_dim 8, grouped-query attention (2 K/V heads)


def save(directory: Path, model_class, config) -> Path:
    torch.manual_seed(0)
    model_class(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("hf") / "llama", LlamaForCausalLM, LlamaConfig(**SIZES))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    """Every layer attends within the last 8 positions (Mistral's sliding_window)."""
    return save(tmp_path_factory.mktemp("hf") / "mistral", MistralForCausalLM, MistralConfig(**SIZES, sliding_window=8))


def kv_evaluate(runner, directory: Path, strategies: str, *extra: str):
    return runner.invoke(app, ["kv-evaluate", "--engine", "transformers", "--config", str(directory), "--strategies",
                               strategies, "--new-tokens", "12", "--device", "cpu", *extra])


@recent
def test_dynamic_and_static_caches_match_the_uncached_forward(runner, llama):
    """Every generation of the plan (reuse, more rows, a ragged batch), with drafts rolled back, and the K/V
    each cache holds: all equal to what transformers' uncached forward computes."""
    result = kv_evaluate(runner, llama, "naive,hf-dynamic,hf-static", "--rollback", "2")
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"naive": "pass", "hf-dynamic": "pass", "hf-static": "pass"}
    assert "ragged batch" in result.output and "unchecked" not in result.output  # K/V read back and checked


class ForgetsFirstToken(DynamicCache):
    """transformers' DynamicCache with a planted bug: once it holds more than 8 tokens, position 0's K/V is
    overwritten by position 1's, so the first token is lost (shapes stay right: nothing raises)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if keys.shape[2] > 8:
            keys[:, :, 0], values[:, :, 0] = keys[:, :, 1], values[:, :, 1]
        return keys, values


@recent
def test_a_cache_that_drops_a_token_fails(runner, llama, register_strategy):
    register_strategy(Strategy("hf-forgets", "DynamicCache losing its first token",
                               lambda shape: EngineCache(shape, ForgetsFirstToken), families=frozenset({TRANSFORMERS})))
    result = kv_evaluate(runner, llama, "hf-dynamic,hf-forgets")
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"hf-dynamic": "pass", "hf-forgets": "FAIL"}
    assert "hf-forgets, fresh cache, 12 tokens: logits differ from naive's" in result.output
    assert "layer 0 K at position 0" in result.output  # the K/V it holds, read back, shows the lost token


@recent
def test_sliding_cache_on_a_model_with_a_window(runner, mistral):
    """The long-prompt generation (16 tokens, twice the window) fills the sliding layers past their window."""
    result = kv_evaluate(runner, mistral, "hf-dynamic,hf-static,hf-sliding", "--prefill-chunk", "5")
    assert result.exit_code == 0, result.output
    assert verdicts(result.output) == {"hf-dynamic": "pass", "hf-static": "pass", "hf-sliding": "pass"}


@recent
def test_static_cache_with_a_window_cannot_roll_back(runner, mistral):
    """StaticCache's sliding layers say is_croppable False; crop() would run anyway and give wrong logits
    (tried: 900x the tolerance), so kvbench refuses the rollback and reports it."""
    result = kv_evaluate(runner, mistral, "hf-dynamic,hf-static", "--rollback", "2")
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"hf-dynamic": "pass", "hf-static": "FAIL"}
    assert "transformers' StaticCache cannot roll back on this model (is_croppable is False" in result.output


@recent
def test_benchmark_writes_the_usual_files(runner, llama, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["benchmark", "--engine", "transformers", "--config", str(llama), "--lengths", "3,5",
                                 "--repeats", "1", "--warmup", "0", "--prompt-len", "4", "--device", "cpu",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "results.csv")
    assert list(runs.columns) == RUN_COLUMNS
    assert sorted(set(runs["strategy"])) == ["hf-dynamic", "hf-static", "naive"]  # the engine's default
    cached = runs[runs["strategy"] != "naive"]
    # 2 layers x K and V x 2 K/V heads x head_dim 8 x (4 + N - 1 tokens) x 4 bytes: both hold exactly that
    expected = 2 * 2 * 2 * 8 * (4 + cached["new_tokens"] - 1) * 4
    assert (cached["kv_cache_bytes"] == expected).all() and (cached["kv_cache_formula_bytes"] == expected).all()
    assert len(pd.read_csv(out / "summary.csv")) == 6
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["engine"] == "transformers" and meta["config"]["model_type"] == "llama"
    assert meta["code_paths"]["hf-static"]["attention"] == "transformers (sdpa), StaticCache"
    assert (out / "latency.png").is_file() and (out / "steps.csv").is_file()


@pytest.mark.parametrize("args, message", [
    (["--strategies", "static"], "strategy 'static' runs on kvbench's decoder models and kvbench's encoder-decoder "
                                 "models, not on transformers' models (--engine transformers)"),
    pytest.param(["--strategies", "hf-sliding"], "hf-sliding: this llama model has no sliding window", marks=recent),
    pytest.param(["--strategies", "hf-offloaded"], "hf-offloaded moves each layer's K/V from GPU to CPU memory",
                 marks=recent),
    (["--window", "4"], "--window: transformers' models attend with their own window"),
    (["--compile"], "--compile supports kvbench's decoder-only models, not transformers' models"),
])
def test_engine_option_errors(runner, llama, args, message):
    result = runner.invoke(app, ["kv-evaluate", "--engine", "transformers", "--config", str(llama), "--new-tokens",
                                 "4", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@recent
@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("optimum", "hqq")), reason="a backend is installed")
def test_quantized_cache_names_the_package_to_install(runner, llama):
    result = kv_evaluate(runner, llama, "hf-quantized")
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith("pip install optimum-quanto (or hqq)")


def test_engine_strategy_refused_on_kvbench_models(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", "tiny", "--strategies", "hf-sliding"])
    assert result.exit_code == 2, result.output
    assert "strategy 'hf-sliding' runs on transformers' models (--engine transformers), not on kvbench's" in result.output


def directory_problems(root: Path, llama: Path) -> list[tuple[Path, str]]:
    (root / "empty").mkdir()
    (root / "unknown").mkdir()
    (root / "unknown" / "config.json").write_text(json.dumps({"model_type": "nosuch"}))
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text((llama / "config.json").read_text())
    return [(root / "empty", "no config.json"), (root / "unknown", "transformers cannot load its config.json"),
            (root / "no-weights", "no weights (model.safetensors"), (root / "missing", "not found")]


def test_directories_transformers_cannot_load(runner, llama, tmp_path):
    for directory, message in directory_problems(tmp_path, llama):
        result = runner.invoke(app, ["kv-evaluate", "--engine", "transformers", "--config", str(directory)])
        assert result.exit_code == 2, (directory, result.output)
        assert f"{directory.name}" in result.output and message in result.output, result.output


def test_a_shipped_config_under_engine_transformers_is_called_kvbenchs_own(runner):
    result = runner.invoke(app, ["kv-evaluate", "--engine", "transformers", "--config", "tiny"])
    assert result.exit_code == 2 and "tiny is one of kvbench's own configs" in result.output, result.output


def test_engine_without_transformers_installed(runner, llama, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    result = runner.invoke(app, ["benchmark", "--engine", "transformers", "--config", str(llama)])
    assert result.exit_code == 2, result.output
    assert "--engine transformers needs the transformers package; install it: pip install 'kvbench[hf]'" in result.output


@recent
def test_python_api_takes_the_engine(llama):
    import kvbench

    model = kvbench.load_model(llama, engine="transformers")
    checks = kvbench.kv_evaluate(model, ["hf-dynamic", "hf-static"], new_tokens=8)
    assert [(c.strategy, c.passed) for c in checks] == [("hf-dynamic", True), ("hf-static", True)]


def test_python_api_refuses_a_strategy_of_the_other_engine(llama):
    import kvbench
    from kvbench.errors import KVBenchError

    with pytest.raises(KVBenchError, match="strategy 'static' does not run on transformers' models"):
        kvbench.kv_evaluate(kvbench.load_model(llama, engine="transformers"), ["static"], new_tokens=4)
    with pytest.raises(KVBenchError, match="strategy 'hf-sliding' does not run on kvbench's decoder models"):
        kvbench.kv_evaluate(kvbench.load_model("tiny"), ["hf-sliding"], new_tokens=4)


@pytest.mark.parametrize("version, usable", [("5.24.0", True), ("5.25.0rc1", True), ("6.0.0.dev0", True),
                                             ("5.23.2", False), ("5.17.0", False), ("4.57.6", False)])
def test_versions_whose_caches_kvbench_can_check(version, usable):
    assert hf_caches.recent_enough(version) is usable


def test_an_older_transformers_is_refused_with_what_to_install(runner, monkeypatch):
    """transformers 5.17 (a GPU image's) zeroes a reset DynamicLayer but keeps its length, and its StaticLayer
    cannot crop: kv-evaluate would fail the caches for transformers' reasons. It says what to install instead."""
    monkeypatch.setattr(hf_caches, "installed_version", lambda: "5.17.0")
    result = runner.invoke(app, ["kv-evaluate", "--config", "tiny", "--strategies", "static,hf-dynamic",
                                 "--new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "hf-* strategies need transformers >= 5.24" in result.output and "installed: 5.17.0" in result.output
    assert "Traceback" not in result.output
