"""Ragged batches: rows of different prompt lengths, left-padded, each row exactly what it would be alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import random_model, verdicts, write_yaml
from kvbench import strategies
from kvbench.cache import StaticCache
from kvbench.cli import app
from kvbench.generate import generate, left_pad

CACHED = ["static", "dynamic", "sliding", "quantized", "static+compile"]
ARCHITECTURES = {
    "gpt2-learned": {},
    "llama-rope-gqa": dict(positional="rope", n_kv_heads=2, norm_type="rmsnorm", mlp="gated", activation="silu"),
    "sinusoidal-post-norm": dict(positional="sinusoidal", norm="post"),
}


def rows(*lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("features", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
@pytest.mark.parametrize("strategy", CACHED)
def test_each_row_of_a_ragged_batch_is_what_it_is_alone(features, strategy):
    model = random_model(3, **features)
    prompts = rows(5, 17, 11, 1)
    ids, pads = left_pad(prompts)
    window = 8 if strategy == "sliding" else None  # 17 + 12 tokens: the ring wraps
    batch = generate(model, ids, 12, strategy, keep_logits=True, window=window, pads=pads)
    for r, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], 12, "naive", keep_logits=True, visibility=window)
        torch.testing.assert_close(batch.logits[r], alone.logits[0], atol=2e-4, rtol=1e-4)
        if strategy != "quantized":  # int8 may flip a near-tie; its logits are held to the tolerance above
            assert torch.equal(batch.tokens[r], alone.tokens[0])


def test_a_row_does_not_depend_on_how_long_the_other_rows_are():
    model = random_model(2, positional="rope", n_kv_heads=1)
    mine = rows(9, seed=4)[0]
    outputs = []
    for other in (3, 9, 30):
        ids, pads = left_pad([mine, rows(other, seed=5)[0]])
        outputs.append(generate(model, ids, 10, "static", keep_logits=True, pads=pads).logits[0])
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5)


def test_equal_lengths_need_no_padding():
    ids, pads = left_pad(rows(4, 4))
    assert pads is None and ids.shape == (2, 4)
    ids, pads = left_pad(rows(2, 4))
    assert pads.tolist() == [2, 0] and ids[0, :2].tolist() == [0, 0]


class PaddingBlindCache(StaticCache):
    """Ignores a ragged batch's padding: short rows attend to their pad tokens' keys."""

    def begin(self, start_pos, n_new, pads=None):
        super().begin(start_pos, n_new, None)


def test_kv_evaluate_catches_a_cache_that_attends_to_padding(register_strategy, runner, tmp_path):
    register_strategy(dataclasses.replace(
        strategies.STATIC, name="padding-blind",
        cache=lambda s: PaddingBlindCache(s.n_layers, s.batch, s.n_heads, s.max_len, s.head_dim, s.dtype, s.device)))
    result = runner.invoke(app, ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--strategies",
                                 "static,padding-blind", "--new-tokens", "20", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"static": "pass", "padding-blind": "FAIL"}, result.output
    assert "ragged batch" in result.output


# --- chunked prefill ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", CACHED)
@pytest.mark.parametrize("prompt_len", [7, 8, 9, 17])  # window 8: W - 1, W, W + 1, and past the wrap
def test_chunked_prefill_matches_naive_around_the_window(strategy, prompt_len):
    from kvbench.generate import generate as run

    model = random_model(5, positional="rope", n_kv_heads=2)
    prompt = rows(prompt_len, prompt_len, seed=7)
    ids = torch.stack(prompt)  # (2, P)
    window = 8 if strategy == "sliding" else None
    naive = run(model, ids, 6, "naive", keep_logits=True, visibility=window)
    chunked = run(model, ids, 6, strategy, keep_logits=True, window=window, prefill_chunk=3)
    torch.testing.assert_close(chunked.logits, naive.logits, atol=2e-4, rtol=1e-4)


class ChunkBlindCache(StaticCache):
    """Writes a multi-token update as if it started at position 0: right for a whole-prompt prefill only."""

    def update(self, layer, start_pos, k, v):
        return super().update(layer, 0 if k.shape[2] > 1 else start_pos, k, v)


def test_kv_evaluate_with_chunked_prefill_catches_a_cache_that_only_prefills_from_zero(register_strategy, runner,
                                                                                       tmp_path):
    register_strategy(dataclasses.replace(
        strategies.STATIC, name="chunk-blind",
        cache=lambda s: ChunkBlindCache(s.n_layers, s.batch, s.n_heads, s.max_len, s.head_dim, s.dtype, s.device)))
    args = ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--strategies", "static,chunk-blind",
            "--new-tokens", "12", "--prompt-len", "10", "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0  # whole-prompt prefill: the bug cannot show
    result = runner.invoke(app, [*args, "--prefill-chunk", "4"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"static": "pass", "chunk-blind": "FAIL"}, result.output


def test_prefill_chunk_must_be_positive(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", "tiny", "--prefill-chunk", "0"])
    assert result.exit_code == 2 and "--prefill-chunk" in result.output, result.output


def test_kv_evaluate_prompt_lens_checks_each_row_alone(runner, tmp_path):
    path = write_yaml(tmp_path, positional="rope", n_kv_heads=2)
    result = runner.invoke(app, ["kv-evaluate", "--config", str(path), "--prompt-lens", "5,17,40", "--new-tokens",
                                 "20", "--strategies", "naive,static,dynamic,sliding,paged", "--window", "16",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert set(verdicts(result.output).values()) == {"pass"} and "prompt 5/17/40" in result.output, result.output


@pytest.mark.parametrize("text", ["5,0", "5,x", ""])
def test_bad_prompt_lens_is_one_line(runner, text):
    result = runner.invoke(app, ["kv-evaluate", "--config", "tiny", "--prompt-lens", text])
    assert result.exit_code == 2 and "--prompt-lens" in result.output, result.output


def test_prompt_lens_refused_for_an_encoder_decoder(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", "seq2seq", "--prompt-lens", "3,5"])
    assert result.exit_code == 2 and "decoder" in result.output, result.output


# --- rollback (speculative decoding's rejected drafts) -----------------------------------------------------------

@pytest.mark.parametrize("strategy", CACHED + ["paged"])
@pytest.mark.parametrize("prompt_len, drafts", [(7, 1), (8, 3), (9, 8), (20, 3)])  # window 8: W - 1, W, W + 1, wrap
def test_rolled_back_drafts_leave_no_trace(strategy, prompt_len, drafts):
    from kvbench.generate import Rollback

    model = random_model(6, positional="rope", n_kv_heads=2)
    ids = torch.stack(rows(prompt_len, prompt_len, seed=8))
    window = 8 if strategy == "sliding" else None
    naive = generate(model, ids, 24, "naive", keep_logits=True, visibility=window)
    rolled = generate(model, ids, 24, strategy, keep_logits=True, window=window, rollback=Rollback(drafts, every=2))
    torch.testing.assert_close(rolled.logits, naive.logits, atol=2e-4, rtol=1e-4)


def test_a_sliding_ring_too_small_for_the_rollback_refuses():
    from kvbench.cache import SlidingWindowCache

    cache = SlidingWindowCache(1, 1, 1, 4, 2, torch.float32, "cpu", spare=1)
    cache.begin(0, 10)
    cache.end()
    cache.crop(8)  # two tokens back: one spare slot suffices
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.crop(5)


def test_kv_evaluate_rollback_catches_a_crop_that_drops_one_token_too_many(register_strategy, runner, tmp_path):
    from kvbench.cache import SlidingWindowCache

    class OverCropping(SlidingWindowCache):
        def crop(self, length):
            super().crop(length - 1)

    register_strategy(dataclasses.replace(
        strategies.SLIDING, name="over-cropping",
        cache=lambda s: OverCropping(s.n_layers, s.batch, s.n_heads, s.window, s.head_dim, s.dtype, s.device,
                                     s.rollback + 1)))
    args = ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--strategies", "sliding,over-cropping",
            "--new-tokens", "30", "--window", "8", "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0  # no rollback: crop is never called
    result = runner.invoke(app, [*args, "--rollback", "3"])
    assert result.exit_code == 1, result.output
    assert verdicts(result.output) == {"sliding": "pass", "over-cropping": "FAIL"}, result.output


def test_a_cache_without_crop_fails_rollback_naming_it(register_strategy, runner, tmp_path):
    from kvbench.cache import KVCache

    class NoCrop(StaticCache):
        crop = KVCache.crop  # the interface's default: cannot roll back

    register_strategy(dataclasses.replace(
        strategies.STATIC, name="no-crop",
        cache=lambda s: NoCrop(s.n_layers, s.batch, s.n_heads, s.max_len, s.head_dim, s.dtype, s.device)))
    result = runner.invoke(app, ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--strategies", "no-crop",
                                 "--new-tokens", "12", "--rollback", "2", "--device", "cpu"])
    assert result.exit_code == 1 and "cannot roll back" in result.output, result.output


def test_the_longest_drafts_that_fit_are_checked_and_longer_ones_refused(register_strategy, runner, tmp_path):
    """Drafts go in every 5 steps and end before the last token: with 10 new tokens, drafts of 5 are checked (a
    cache whose crop keeps what it should drop fails); drafts of 6 would never run, and --rollback 6 once passed
    that cache in silence (a newcomer's try with --rollback 5000)."""
    from kvbench.cache import DynamicCache

    class KeepsDrafts(DynamicCache):
        def crop(self, length):
            pass  # the drafts stay in the concatenated K/V, attended by every later step

    register_strategy(dataclasses.replace(strategies.DYNAMIC, name="keeps-drafts",
                                          cache=lambda s: KeepsDrafts(s.n_layers, s.device)))
    args = ["kv-evaluate", "--config", str(write_yaml(tmp_path)), "--strategies", "dynamic,keeps-drafts",
            "--new-tokens", "10", "--device", "cpu", "--rollback"]
    result = runner.invoke(app, [*args, "5"])
    assert result.exit_code == 1 and verdicts(result.output) == {"dynamic": "pass", "keeps-drafts": "FAIL"}, \
        result.output
    refused = runner.invoke(app, [*args, "6"])
    assert refused.exit_code == 2, refused.output
    assert "--rollback 6: no draft that long fits --new-tokens 10" in refused.output
    assert "at most 5 here); give --new-tokens 11 or more" in refused.output
