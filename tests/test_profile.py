"""kvbench profile: one decode step by operation, with bytes and FLOPs counted from what each call saw."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import random_model
from kvbench.bench.profile import profile_step
from kvbench.cli import app

D, V, LAYERS, HEADS, HD = 32, 97, 2, 4, 8  # conftest's TINY


@pytest.mark.parametrize("strategy", ["naive", "static", "dynamic", "sliding", "quantized"])
def test_every_strategy_profiles_and_the_parts_add_up(strategy):
    model = random_model(0)
    result = profile_step(model, strategy, batch=2, context=20, steps=3)
    table = result.table.set_index("operation")
    parts = table.drop(index="step (measured without hooks)")
    assert parts["time_ms"].sum() == pytest.approx(result.step_ms)  # rest closes the sum to the measured step
    assert table.loc["step (measured without hooks)", "share"] == pytest.approx(1.0)
    assert table.loc["attn.qkv", "calls"] == LAYERS and table.loc["lm_head", "calls"] == 1
    assert table.loc["lm_head", "bytes"] == D * V * 4  # the LM head read once, whatever the batch
    assert table.loc["lm_head", "flops"] == 2 * 2 * D * V  # batch 2, one row each (naive: the last position)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_attention_counts_what_the_cache_stores():
    model = random_model(0)
    static = profile_step(model, "static", 1, 20, steps=2).table.set_index("operation")
    int8 = profile_step(model, "quantized", 1, 20, steps=2).table.set_index("operation")
    # the counted step attends 21 positions (20 + the new one): K and V, per layer, as stored
    assert static.loc["attention", "bytes"] == LAYERS * 2 * HEADS * 21 * HD * 4
    assert int8.loc["attention", "bytes"] == LAYERS * 2 * HEADS * 21 * (HD + 4)  # int8 values + a scale each
    assert static.loc["attention", "flops"] == LAYERS * 2 * 2 * HEADS * HD * 21
    assert "int8" in profile_step(model, "quantized", 1, 5, steps=1).attention


def test_profile_command_writes_its_csv(runner, tmp_path, tiny_yaml):
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["profile", "--config", str(tiny_yaml), "--strategy", "quantized", "--context", "30",
                                 "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert list(table.columns) == ["operation", "calls", "time_ms", "share", "bytes", "flops", "gb_per_s",
                                   "gflop_per_s"]
    assert {"attention", "norms", "activation (MLP)", "lm_head"} <= set(table["operation"])
    assert "GB/s" in result.output and "rest" in result.output


@pytest.mark.parametrize("args, needle", [
    (["--strategy", "pagd"], "--strategy: unknown strategy 'pagd'"),
    (["--context", "0"], "--context must be a positive integer"),
    (["--context", "5000"], "do not fit max_seq_len"),
])
def test_bad_profile_options(runner, tmp_path, tiny_yaml, args, needle):
    result = runner.invoke(app, ["profile", "--config", str(tiny_yaml), "--device", "cpu",
                                 "--out", str(tmp_path / "p.csv"), *args])
    assert result.exit_code == 2 and needle in result.output, result.output
