"""Every cache strategy against naive recomputation, and the caches' bookkeeping."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import random_model, small_models
from kvbench.cache import DynamicCache, StaticCache, kv_bytes_formula
from kvbench.generate import generate, generation_steps, new_cache



@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=small_models, seed=st.integers(0, 2**16), batch=st.integers(1, 3), prompt_len=st.integers(1, 6),
       new_tokens=st.integers(1, 20), strategy=st.sampled_from(["static", "dynamic"]))
def test_cached_generation_equals_naive(arch, seed, batch, prompt_len, new_tokens, strategy):
    model = random_model(seed, **arch, d_model=8 * arch["n_heads"], max_seq_len=32)
    prompt = torch.randint(0, 97, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    naive = generate(model, prompt, new_tokens, "naive", keep_logits=True)
    cached = generate(model, prompt, new_tokens, strategy, keep_logits=True)
    torch.testing.assert_close(cached.logits, naive.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached.tokens, naive.tokens)


def test_batch_rows_equal_single_sequences():
    model = random_model(4)
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    batched = generate(model, prompt, 15, "static", keep_logits=True)
    for row in range(3):
        alone = generate(model, prompt[row:row + 1], 15, "static", keep_logits=True)
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batched.tokens[row], alone.tokens[0])


def test_static_cache_size_is_the_formula():
    cache = StaticCache(n_layers=3, batch=2, n_heads=4, max_len=50, head_dim=8, dtype=torch.float32, device="cpu")
    assert cache.nbytes == kv_bytes_formula(3, 4, 8, 50, 2, 4) == 2 * 3 * 4 * 8 * 50 * 2 * 4


def test_dynamic_cache_grows_with_tokens():
    model = random_model(0)
    cache = new_cache(model, "dynamic", batch=1, max_len=20)
    prompt = torch.randint(0, 97, (1, 4))
    sizes = [cache.nbytes for _ in generation_steps(model, prompt, 6, cache)]
    # after the prefill the cache holds 4 tokens; each decode step adds one
    assert sizes == [kv_bytes_formula(2, 4, 8, 4 + i, 1, 4) for i in range(6)]


def test_static_cache_reset_gives_a_fresh_sequence():
    model = random_model(5)
    cache = new_cache(model, "static", batch=1, max_len=20)
    first, second = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 3))
    list(generation_steps(model, first, 10, cache))  # leaves 15 stale positions behind
    reused = [s.logits for s in generation_steps(model, second, 5, cache)]
    fresh = generate(model, second, 5, "naive", keep_logits=True).logits
    torch.testing.assert_close(torch.stack(reused, dim=1), fresh, atol=1e-5, rtol=1e-5)


def test_dynamic_cache_refuses_a_gap():
    cache = DynamicCache(1)
    k = torch.zeros(1, 1, 2, 4)
    cache.update(0, 0, k, k)
    try:
        cache.update(0, 5, k, k)
    except ValueError as exc:
        assert "cannot write at 5" in str(exc)
    else:
        raise AssertionError("a write past the end must fail")


def test_sliding_prefill_into_a_ring_that_already_holds_tokens():
    """Several tokens entering a non-empty ring (chunked prefill): attention sees what the ring held plus the
    new keys, banded; with a window of 8, chunks of 5 and 7 cross the wrap."""
    import pytest

    model = random_model(3, positional="rope", n_kv_heads=2)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    cache = new_cache(model, "sliding", batch=2, max_len=24, window=8)
    with torch.inference_mode():
        naive = model(ids, visibility=8)  # (B, 24, V): banded attention over the whole sequence
        pieces, start = [], 0
        for chunk in (5, 7, 1, 11):
            pieces.append(model(ids[:, start:start + chunk], cache, start_pos=start))
            start += chunk
    torch.testing.assert_close(torch.cat(pieces, dim=1), naive, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError):  # the path matters: a ring that forgets what it held is caught
        held_nothing = new_cache(model, "sliding", batch=2, max_len=24, window=8)
        with torch.inference_mode():
            model(ids[:, :5], held_nothing, start_pos=0)
            held_nothing.reset()
            wrong = model(ids[:, 5:12], held_nothing, start_pos=5)
        torch.testing.assert_close(wrong, naive[:, 5:12], atol=1e-5, rtol=1e-5)


def test_int8_prefill_dequantizes_once_and_decode_never_does():
    """A pass of DEQUANTIZE_FROM_ROWS new tokens or more attends over one dequantized copy (SDPA), giving the
    fused kernel's answer; a decode step never builds a full-precision copy of the cache."""
    from kvbench.cache import DEQUANTIZE_FROM_ROWS, QuantizedCache, int8_attention

    class CountingReads(QuantizedCache):
        reads = 0

        def read(self, layer, end):
            self.reads += 1
            return super().read(layer, end)

    torch.manual_seed(0)
    n = DEQUANTIZE_FROM_ROWS
    cache = CountingReads(1, 2, 3, n + 2, 8, torch.float32, "cpu")
    k, v, q = (torch.randn(2, 3, n, 8) for _ in range(3))
    out = cache.attend(0, 0, q, k, v, "causal")
    assert cache.reads == 1
    torch.testing.assert_close(out, int8_attention(q, *cache.stored(0, n), "causal"), atol=1e-5, rtol=1e-5)
    for position in (n, n + 1):  # decode: one new token (a group of 3 query rows) at a time
        k1, q3 = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 3, 8)
        cache.attend(0, position, q3, k1, k1, None)
    assert cache.reads == 1


def test_int8_attention_kernels_agree_with_sdpa_over_the_dequantized_cache(monkeypatch):
    """Both kernels (the compiled fused one, forced here on a small cache, and the eager chunked one) give
    SDPA's answer over the dequantized K/V, for decode, grouped query rows under a mask, and a causal prefill."""
    import kvbench.cache as cache_module
    from kvbench.cache import QuantizedCache, attend

    torch.manual_seed(0)
    monkeypatch.setattr(cache_module, "KEY_CHUNK", 7)  # several chunks, a ragged last one
    for threshold in (0, 2**40):  # compiled for everything, then eager for everything
        monkeypatch.setattr(cache_module, "COMPILED_MIN_ELEMENTS", threshold)
        cache = QuantizedCache(1, 2, 3, 40, 8, torch.float32, "cpu")
        k, v, q = (torch.randn(2, 3, 20, 8) for _ in range(3))
        out = cache.attend(0, 0, q, k, v, "causal")
        torch.testing.assert_close(out, attend(q, *cache.read(0, 20), "causal"), atol=1e-5, rtol=1e-5)
        k1, q3 = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 3, 8)  # 3 query rows (a group of 3) over 21 keys
        seen = torch.rand(3, 21) > 0.3
        seen[:, 0] = True
        out = cache.attend(0, 20, q3, k1, k1, seen)
        torch.testing.assert_close(out, attend(q3, *cache.read(0, 21), seen), atol=1e-5, rtol=1e-5)
