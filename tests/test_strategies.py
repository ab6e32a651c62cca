"""Sliding-window and int8 caches, batches and sampling: each checked against naive recomputation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataclasses

import kvbench.generate
import kvbench.verify as verify
from conftest import CONFIGS, random_model, small_models, verdicts, write_yaml
from kvbench import strategies
from kvbench.cache import QuantizedCache, SlidingWindowCache, StaticCache, kv_bytes_formula
from kvbench.cli import app
from kvbench.generate import generate
from kvbench.sampling import SamplingSettings, filtered_probs, pick

TOL = verify.Tolerance(1e-4, 1e-4)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=small_models, seed=st.integers(0, 2**16), batch=st.integers(1, 3), prompt_len=st.integers(1, 9),
       new_tokens=st.integers(1, 20), window=st.integers(1, 6))
def test_sliding_equals_windowed_naive(arch, seed, batch, prompt_len, new_tokens, window):
    """Exact against naive with the same band mask, whether the prompt fits the window or not, across wraps."""
    model = random_model(seed, **arch, d_model=8 * arch["n_heads"], max_seq_len=32)
    prompt = torch.randint(0, 97, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    naive = generate(model, prompt, new_tokens, "naive", keep_logits=True, visibility=window)
    sliding = generate(model, prompt, new_tokens, "sliding", keep_logits=True, window=window)
    torch.testing.assert_close(sliding.logits, naive.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(sliding.tokens, naive.tokens)


def test_sliding_at_the_wrap_step_by_step():
    """Window 4, prompt 2: the ring wraps when position 4 overwrites slot 0; every step stays exact."""
    model = random_model(11)
    prompt = torch.randint(0, 97, (1, 2))
    naive = generate(model, prompt, 9, "naive", keep_logits=True, visibility=4)
    cache = SlidingWindowCache(2, 1, 4, 4, 8, torch.float32, "cpu")
    steps = list(kvbench.generate.generation_steps(model, prompt, 9, cache))
    for step in steps:
        torch.testing.assert_close(step.logits, naive.logits[:, step.index], atol=1e-5, rtol=1e-5)
    assert cache.slot_pos.tolist() == [8, 9, 6, 7]  # positions 6..9 held: 9 = prompt 2 + 8 decode steps - 1
    assert cache.nbytes == kv_bytes_formula(2, 4, 8, 4, 1, 4)  # bounded by the window, whatever the length


class OffByOneAtWrap(SlidingWindowCache):
    """Once the ring has wrapped, returns one slot too few: the oldest visible position goes missing."""

    def update(self, layer, start_pos, k, v):
        k_all, v_all = super().update(layer, start_pos, k, v)
        if k.shape[2] == 1 and start_pos >= self.window:
            keep = [s for s in range(self.window) if s != (start_pos + 1) % self.window]
            return k_all[:, :, keep], v_all[:, :, keep]
        return k_all, v_all


def test_broken_sliding_window_is_caught(runner, register_strategy):
    register_strategy(dataclasses.replace(
        strategies.SLIDING, name="sliding-broken",
        cache=lambda s: OffByOneAtWrap(s.n_layers, s.batch, s.n_heads, s.window, s.head_dim, s.dtype, s.device)))
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "reference.yaml"), "--strategies",
                                 "sliding,sliding-broken", "--window", "8", "--new-tokens", "30", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"sliding": "pass", "sliding-broken": "FAIL"}


def test_sliding_reports_its_drift_from_full_attention():
    model = random_model(3)
    prompt = torch.randint(0, 97, (1, 4))
    [check] = verify.kv_evaluate(model, prompt, 30, ["sliding"], TOL, window=5)
    assert check.passed and check.max_abs < 1e-5
    assert check.drift is not None and check.drift.max_abs > 1e-3  # a 5-token window is not full attention


def test_sinusoidal_sliding_runs_past_max_seq_len(runner, tmp_path):
    config = write_yaml(tmp_path, positional="sinusoidal", max_seq_len=32)
    result = runner.invoke(app, ["kv-evaluate", "--config", str(config), "--strategies", "sliding", "--window", "8",
                                 "--new-tokens", "60", "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_learned_positions_stop_sliding_at_max_seq_len(runner, tmp_path):
    config = write_yaml(tmp_path, max_seq_len=32)
    result = runner.invoke(app, ["kv-evaluate", "--config", str(config), "--strategies", "sliding", "--window", "8",
                                 "--new-tokens", "60", "--device", "cpu"])
    assert result.exit_code == 2 and "max_seq_len 32" in result.output, result.output


def test_sinusoidal_static_still_stops_at_max_seq_len(runner, tmp_path):
    config = write_yaml(tmp_path, positional="sinusoidal", max_seq_len=32)
    result = runner.invoke(app, ["kv-evaluate", "--config", str(config), "--strategies", "static,sliding",
                                 "--new-tokens", "60", "--device", "cpu"])
    assert result.exit_code == 2 and "(for static)" in result.output, result.output


# --- int8 ----------------------------------------------------------------------------------------------------

def test_quantized_passes_its_thresholds_and_is_smaller(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "reference.yaml"), "--strategies",
                                 "static,quantized", "--new-tokens", "60", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    static = StaticCache(2, 1, 12, 100, 64, torch.float32, "cpu")
    int8 = QuantizedCache(2, 1, 12, 100, 64, torch.float32, "cpu")
    assert int8.nbytes == int8.expected_bytes(100) == 2 * 2 * 12 * 100 * (64 + 4)
    assert static.nbytes / int8.nbytes == pytest.approx(256 / 68)


def test_quantized_is_not_exact_but_close():
    model = random_model(5)
    prompt = torch.randint(0, 97, (2, 4))
    [check] = verify.kv_evaluate(model, prompt, 30, ["quantized"], TOL)
    assert not check.exact and check.passed
    assert check.vs_naive.max_abs > 0 and check.vs_naive.mean_kl < check.thresholds.max_mean_kl


def test_int8_round_trip_error_is_half_a_step():
    x = torch.randn(2, 3, 5, 16)
    q, scale = QuantizedCache.quantize(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q * scale - x).abs() <= scale / 2 + 1e-7).all()


def scales_off_by(factor: float) -> type[QuantizedCache]:
    """An int8 cache that stores every scale `factor` times what it should be."""

    class WrongScales(QuantizedCache):
        @staticmethod
        def quantize(x):
            q, scale = QuantizedCache.quantize(x)
            return q, scale * factor

    return WrongScales


@pytest.mark.parametrize("scale_error", [0.25, 1.25])
def test_broken_quantization_fails_the_thresholds(runner, register_strategy, scale_error):
    """Scales stored wrong (4x too small, or 25% too large) must fail the KL and top-1 thresholds."""
    broken = scales_off_by(scale_error)
    register_strategy(dataclasses.replace(strategies.QUANTIZED, name="quantized-wrong-scales",
                                          cache=lambda s: broken(s.n_layers, s.batch, s.n_heads, s.max_len,
                                                                 s.head_dim, s.dtype, s.device)))
    result = runner.invoke(app, ["kv-evaluate", "--strategies", "quantized,quantized-wrong-scales", "--new-tokens",
                                 "60", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"quantized": "pass", "quantized-wrong-scales": "FAIL"}


# --- batches -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["naive", "static", "dynamic", "sliding", "quantized"])
def test_each_batch_row_equals_batch_size_one(strategy):
    model = random_model(4)
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    batched = generate(model, prompt, 12, strategy, keep_logits=True, window=6)
    for row in range(3):
        alone = generate(model, prompt[row:row + 1], 12, strategy, keep_logits=True, window=6)
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.tokens[row], alone.tokens[0])


# --- sampling ------------------------------------------------------------------------------------------------

SAMPLERS = [SamplingSettings(1.0, seed=1), SamplingSettings(0.7, top_k=5, seed=2),
            SamplingSettings(1.3, top_p=0.9, seed=3), SamplingSettings(0.8, top_k=20, top_p=0.5, seed=4)]


@pytest.mark.parametrize("sampling", SAMPLERS, ids=lambda s: s.describe())
@pytest.mark.parametrize("strategy", ["static", "dynamic", "sliding"])
def test_same_seed_same_tokens_cached_and_naive(sampling, strategy):
    model = random_model(9)
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(1))
    window = 6 if strategy == "sliding" else None
    naive = generate(model, prompt, 25, "naive", sampling=sampling, visibility=window)
    cached = generate(model, prompt, 25, strategy, sampling=sampling, window=window)
    assert torch.equal(cached.tokens, naive.tokens)
    assert torch.equal(cached.draws, naive.draws)
    greedy = generate(model, prompt, 25, strategy, window=window)
    assert not torch.equal(greedy.tokens, cached.tokens)  # sampling really sampled


def test_kv_evaluate_checks_sampled_runs(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "40",
                                 "--strategies", "static,sliding,quantized", "--temperature", "0.9", "--top-k", "50",
                                 "--top-p", "0.95", "--window", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "temperature 0.9, top-k 50, top-p 0.95" in result.output


def test_broken_cache_fails_under_sampling():
    from test_verify import OFF_BY_ONE

    model = random_model(2)
    checks = verify.kv_evaluate(model, torch.randint(0, 97, (1, 4)), 30, [OFF_BY_ONE], TOL,
                                SamplingSettings(1.0, seed=5))
    assert not checks[0].passed


def test_sampled_divergence_inside_the_slack_is_a_near_tie():
    naive = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)  # CDF boundary at u = 0.5
    cached = torch.tensor([[[0.0, 1e-3]]], dtype=torch.float64)  # moves the boundary by ~2.5e-4
    s = SamplingSettings(1.0)
    divergence = verify.first_divergence(torch.tensor([[1]]), naive, TOL, s, torch.tensor([[0.4999]]), cached)
    assert divergence.naive_choice == 0 and divergence.near_tie
    far = verify.first_divergence(torch.tensor([[1]]), naive, TOL, s, torch.tensor([[0.3]]), cached)
    assert not far.near_tie


def test_sampling_distribution_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    torch.testing.assert_close(filtered_probs(logits, SamplingSettings(1.0, top_k=2)),
                               torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    # top-p 0.6: 0.4 then 0.3 reach 0.7 >= 0.6; the 0.2 and 0.1 are dropped
    torch.testing.assert_close(filtered_probs(logits, SamplingSettings(1.0, top_p=0.6)),
                               torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])  # CDF 0.1, 0.5, 0.7, 1.0
    assert [int(pick(probs, torch.tensor(u))) for u in (0.05, 0.1, 0.49, 0.65, 0.99)] == [0, 1, 1, 2, 3]


def test_sharp_temperature_approaches_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert filtered_probs(logits, SamplingSettings(0.01))[0, 1] > 0.999


@pytest.mark.parametrize("args, needle", [(["--temperature", "-1"], "--temperature"), (["--top-k", "0"], "--top-k"),
                                          (["--top-p", "1.5"], "--top-p"), (["--window", "0"], "--window"),
                                          # greedy ignores the filters: a run with them would not check sampling
                                          (["--top-k", "5"], "--temperature is 0"),
                                          (["--top-p", "0.9"], "--temperature is 0")])
def test_bad_sampling_options(runner, args, needle):
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "5", *args])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_every_strategy_passes_past_1000_tokens(runner):
    """Bugs that appear only late (a slot dropped past 512, a wrap of a 256-token window four times) need long
    runs: the shipped tiny config holds 1280 positions."""
    result = runner.invoke(app, ["kv-evaluate", "--config", str(CONFIGS / "tiny.yaml"), "--new-tokens", "1200",
                                 "--strategies", "static,dynamic,sliding,quantized", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1200 tokens" in result.output


@pytest.mark.parametrize("chunk", [3, 6, 9])  # smaller than, equal to and larger than the window
def test_sliding_prefill_into_a_non_empty_ring(chunk):
    """A multi-token update at a non-zero position (a chunked prefill) attends to what the ring already holds
    plus the new tokens, banded: its logits equal a windowed forward over the whole sequence."""
    model, window = random_model(4), 6
    ids = torch.randint(0, 97, (2, 4 + 2 * chunk), generator=torch.Generator().manual_seed(2))
    cache = strategies.SLIDING.new_cache(strategies.CacheShape(2, 2, 4, 8, 64, torch.float32, torch.device("cpu"),
                                                               window))
    expected = model(ids, visibility=window)  # (B, T, V): no cache, banded causal attention
    with torch.inference_mode():
        got = [model(ids[:, :4], cache, 0)]
        for start in range(4, ids.shape[1], chunk):
            got.append(model(ids[:, start:start + chunk], cache, start))
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-5, rtol=1e-5)
    assert sorted(cache.slot_pos.tolist()) == list(range(ids.shape[1] - window, ids.shape[1]))
