"""A conformance suite for cache plugins: plain functions to call from your own tests (pytest or not).

    from kvbench.testing import check_all
    from my_cache import MyCache

    def test_my_cache_conforms():
        check_all(MyCache)

Each check runs one boundary case that kvbench's own caches are held to, on a tiny random model (2 layers,
float32, CPU: well under a second), against naive recomputation with the cache's own visibility rule; it
checks every step's logits and tokens and, where the cache provides contents(), its stored K/V. A failure
raises AssertionError saying which case and what was wrong. A case the cache declares it does not support
(ragged = False; no crop() for rollback) raises unittest.SkipTest, which pytest reports as skipped.

`cache_class` may also be a registered strategy's name or a Strategy: kvbench runs the suite on its own.
Each check is one function over `_run`: a new case (or a new interface method) is one more function.
"""

from __future__ import annotations

import unittest

import torch

from kvbench import api
from kvbench.cache import KVCache
from kvbench.config import ModelConfig
from kvbench.generate import GREEDY, Rollback, cache_tokens, left_pad, new_cache
from kvbench.model import Decoder, init_weights, random_ids
from kvbench.precision import DEFAULT_TOLERANCE
from kvbench.plugins import PROBE
from kvbench.verify import PlannedGeneration, StrategyCheck, Tolerance, run_planned

WINDOW = 8  # small, so that a bounded cache wraps within a few dozen tokens
TOLERANCE = Tolerance(*DEFAULT_TOLERANCE["float32"])
TINY = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=97, max_seq_len=256,
            positional="rope", norm="pre", norm_type="rmsnorm", mlp="gated", activation="silu", bias=False,
            tie_embeddings=True, seed=0)  # grouped-query attention and RoPE: what modern decoders need


def tiny_model(seed: int = 0) -> Decoder:
    """A 2-layer Llama-shaped model with every weight random: float32, CPU."""
    model = Decoder(ModelConfig(**TINY))
    init_weights(model, seed, every_tensor=True)
    return model.eval().requires_grad_(False)


def _run(cache_class, label: str, prompts: list[torch.Tensor], new_tokens: int, cache: KVCache | None = None,
         prefill_chunk: int | None = None, rollback: Rollback | None = None) -> KVCache:
    """Generate after `prompts` (one per row; of different lengths: a ragged batch) with the cache and assert
    that it matches naive. Returns the cache, for a check that reuses it."""
    strategy = api.strategy(cache_class)
    model = tiny_model()
    rows = prompts if len({len(p) for p in prompts}) > 1 else None
    prompt, pads = left_pad(prompts) if rows else (torch.stack(prompts), None)
    if cache is None:
        cache = new_cache(model, strategy, len(prompts), cache_tokens(prompt.shape[1], new_tokens), WINDOW,
                          rollback.tokens if rollback else 0)
    planned = PlannedGeneration(label, prompt, new_tokens, True, True, rows=rows, pads=pads)
    checks = run_planned(strategy, model, planned, cache, TOLERANCE, GREEDY, strategy.baseline(WINDOW),
                         None, prefill_chunk, rollback)
    verdict = StrategyCheck(strategy.name, strategy.exact, strategy.thresholds_for(model.dtype), checks)
    failures = verdict.failures
    assert not failures, f"{strategy.name}: {failures[0]}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    return cache


def _prompts(rows: int, length: int, seed: int) -> list[torch.Tensor]:
    return list(random_ids(TINY["vocab_size"], rows, length, seed))


def check_prefill_then_decode(cache_class) -> None:
    """A 6-token prompt in one forward from position 0, then 24 single-token decode steps."""
    _run(cache_class, "prefill then decode", _prompts(1, 6, 0), 24)


def check_single_token_prompt(cache_class) -> None:
    """A 1-token prompt: the prefill is itself a one-token forward."""
    _run(cache_class, "one-token prompt", _prompts(1, 1, 1), 12)


def check_reset_and_reuse(cache_class) -> None:
    """One cache object serves a long generation, then (reset by generation) a short one with another prompt:
    nothing of the first may show in the second."""
    cache = _run(cache_class, "first use", _prompts(1, 10, 2), 30)
    _run(cache_class, "reused after reset", _prompts(1, 3, 3), 12, cache=cache)


def check_batch_rows(cache_class) -> None:
    """Three rows with different prompts: a cache that mixes rows (row 0 everywhere) fails."""
    _run(cache_class, "3 rows", _prompts(3, 5, 4), 16)


def check_bounded_wrap(cache_class) -> None:
    """Four times the window (8) of tokens: a bounded cache wraps around several times (an unbounded one
    simply holds them all), and a prompt longer than the window enters it in one prefill."""
    _run(cache_class, "past the window", _prompts(1, 3, 5), 4 * WINDOW)
    _run(cache_class, "prompt longer than the window", _prompts(1, WINDOW + 5, 6), WINDOW)


def check_chunked_prefill(cache_class) -> None:
    """A 14-token prompt sent 3 tokens per forward: multi-token updates at non-zero positions."""
    _run(cache_class, "chunked prefill", _prompts(1, 14, 7), 12, prefill_chunk=3)


def check_ragged_batch(cache_class) -> None:
    """Rows with prompts of 9, 4 and 1 tokens, left-padded: each row must match that row generated alone."""
    if not api.strategy(cache_class).ragged:
        raise unittest.SkipTest(f"{api.strategy(cache_class).name} declares ragged = False")
    prompts = [_prompts(1, n, 8 + n)[0] for n in (9, 4, 1)]
    _run(cache_class, "ragged batch", prompts, 12)


def check_rollback(cache_class) -> None:
    """Every 5 steps, 3 draft tokens go through the cache and are cropped away again (speculative decoding)."""
    strategy = api.strategy(cache_class)
    if type(strategy.new_cache(PROBE)).crop is KVCache.crop:
        raise unittest.SkipTest(f"{strategy.name} has no crop(): it cannot roll back")
    _run(cache_class, "rollback", _prompts(1, 5, 9), 30, rollback=Rollback(3))


CHECKS = (check_prefill_then_decode, check_single_token_prompt, check_reset_and_reuse, check_batch_rows,
          check_bounded_wrap, check_chunked_prefill, check_ragged_batch, check_rollback)


def check_all(cache_class) -> list[str]:
    """Every check above; the cases a cache declares it does not support are skipped, not failed. Returns the
    skipped cases, each as 'check name: why', so that a caller can assert on them or print them."""
    skipped = []
    for check in CHECKS:
        try:
            check(cache_class)
        except unittest.SkipTest as skip:
            skipped.append(f"{check.__name__}: {skip}")
    return skipped

