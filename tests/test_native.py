"""The C++ attention kernels (kvbench/csrc/attention.cpp): the same answer as SDPA over the dequantized
cache, for every build this machine can make; declined where it does not apply; named in the code path, with
the reason when it falls back; and checked by kv-evaluate like any cache."""
from __future__ import annotations

import functools

import pytest
import torch
from typer.testing import CliRunner

from kvbench import native
from kvbench.cache import QuantizedCache
from kvbench.cli import app

GENERIC = ("-DKVBENCH_GENERIC",)  # the portable loops, which CPUs without AVX-512 run
needs_native = pytest.mark.skipif(native.attention_isa() is None, reason=str(native.why_not))


def count_answers(monkeypatch, kernel: str) -> list[bool]:
    """Records, per call of native.<kernel>, whether the C++ kernel answered (not None), so that a test knows
    it checked the kernel, not a fallback."""
    answers = []
    real = getattr(native, kernel)

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        answers.append(out is not None)
        return out

    monkeypatch.setattr(native, kernel, counted)
    return answers


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_answers(monkeypatch, "int8_attention")


def head_dim_64_config(tmp_path):
    """A small model whose heads are 64 wide, so that the kernels apply (tiny.yaml's are 16)."""
    config = tmp_path / "hd64.yaml"
    config.write_text("n_layers: 2\nd_model: 128\nn_heads: 2\nd_ff: 256\nvocab_size: 256\nmax_seq_len: 128\n"
                      "positional: learned\nnorm: pre\nactivation: gelu\ntie_embeddings: true\nbias: true\n"
                      "layer_norm_eps: 1.0e-5\nseed: 0\n")
    return config


def use_build(monkeypatch, flags):
    real = native.int8_attention
    monkeypatch.setattr(native, "int8_attention", functools.partial(real, extra_flags=flags))


@needs_native
@pytest.mark.parametrize("flags", [(), GENERIC], ids=["this-cpu", "generic"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_agrees_with_sdpa_over_the_dequantized_cache(monkeypatch, kernel_calls, flags, head_dim):
    """A causal prompt of 37 tokens (37 query rows: not a multiple of 16, so the tail path runs), then decode
    steps of 4 query rows (a group of grouped-query heads) under a ragged per-row mask, read from a cache
    longer than what it holds (strided views)."""
    use_build(monkeypatch, flags)
    expected_isa = "generic" if flags else native.attention_isa()
    assert native.attention_isa(flags) == expected_isa
    torch.manual_seed(head_dim)
    B, H, T = 3, 2, 37
    cache = QuantizedCache(1, B, H, 80, head_dim, torch.float32, "cpu")
    k, v, q = (torch.randn(B, H, T, head_dim) for _ in range(3))
    out = cache.attend(0, 0, q, k, v, "causal")
    torch.testing.assert_close(out, attend_sdpa(q, *cache.read(0, T), "causal"), atol=1e-5, rtol=1e-5)
    for position in range(T, T + 3):
        k1, v1, q4 = torch.randn(B, H, 1, head_dim), torch.randn(B, H, 1, head_dim), torch.randn(B, H, 4, head_dim)
        seen = torch.rand(B, 1, 4, position + 1) > 0.4  # (B, 1, R, S): each batch row its own mask
        seen[..., -1] = True
        out = cache.attend(0, position, q4, k1, v1, seen)
        torch.testing.assert_close(out, attend_sdpa(q4, *cache.read(0, position + 1), seen), atol=1e-5, rtol=1e-5)
    assert kernel_calls == [True] * 4


@needs_native
def test_kernel_keeps_softmax_exact_at_extreme_scores():
    """Scores far apart (weights that underflow to 0), and keys hidden by the mask, as torch computes them."""
    torch.manual_seed(1)
    cache = QuantizedCache(1, 1, 1, 40, 64, torch.float32, "cpu")
    k = torch.randn(1, 1, 33, 64) * 50
    cache.store(0, 0, k, torch.randn(1, 1, 33, 64))
    q = torch.randn(1, 1, 1, 64) * 10
    seen = torch.ones(1, 1, 1, 33, dtype=torch.bool)
    seen[..., 5:20] = False
    out = native.int8_attention(q, *cache.stored(0, 33), seen)
    torch.testing.assert_close(out, attend_sdpa(q, *cache.read(0, 33), seen), atol=1e-5, rtol=1e-5)


def test_kernel_declines_what_it_cannot_read():
    """head_dim other than 64 or 128, keys not head_dim apart, or not on the CPU: None, and the caller's own
    kernel answers (test_cache.py checks those kernels at head_dim 8)."""
    q = torch.randn(1, 2, 1, 32)
    kq = torch.zeros(1, 2, 10, 32, dtype=torch.int8)
    s = torch.ones(1, 2, 10, 1)
    seen = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    assert native.int8_attention(q, kq, s, kq, s, seen) is None
    q, wide = torch.randn(1, 2, 1, 64), torch.zeros(1, 2, 10, 128, dtype=torch.int8)[..., ::2]  # keys 128 apart
    assert native.int8_attention(q, wide, s, wide, s, seen) is None


@needs_native
def test_kernel_declines_tensors_that_do_not_match():
    """It sees bare pointers: any shape, dtype or mask that disagrees with q and kq sends the call to the torch
    kernels (which raise on real mismatches) rather than reading past a tensor."""
    B, H, R, S = 2, 2, 4, 10
    q, kq, s = torch.randn(B, H, R, 64), torch.zeros(B, H, S, 64, dtype=torch.int8), torch.ones(B, H, S, 1)
    seen = torch.ones(B, 1, R, S, dtype=torch.bool)
    assert native.int8_attention(q, kq, s, kq, s, seen) is not None
    wrong = {
        "more query heads than K/V heads": (torch.randn(B, 4, R, 64), kq, s, kq, s, seen),
        "half-precision value scales": (q, kq, s, kq, s.half(), seen),
        "unsigned values": (q, kq, s, kq.to(torch.uint8), s, seen),
        "a mask of one query row": (q, kq, s, kq, s, seen[:, :, :1]),
        "a mask per head": (q, kq, s, kq, s, seen.expand(B, H, R, S)),
        "an additive float mask": (q, kq, s, kq, s, seen.float()),
        "V shorter than K": (q, kq, s, kq[:, :, :5], s[:, :, :5], seen),
        "a head_dim slice of wider storage": (q, torch.zeros(B, H, S, 128, dtype=torch.int8)[..., :64], s, kq, s, seen),
    }
    for why, args in wrong.items():
        assert native.int8_attention(*args) is None, why


@needs_native
def test_code_path_names_the_kernel_or_why_it_fell_back(monkeypatch, tmp_path):
    cache = QuantizedCache(1, 1, 1, 8, 64, torch.float32, "cpu")
    assert f"C++ kernel ({native.attention_isa()} loops" in cache.attention_path
    assert "C++ kernel takes head_dim 64 or 128" in QuantizedCache(1, 1, 1, 8, 32, torch.float32, "cpu").attention_path
    native.load.cache_clear()
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    try:
        path = cache.attention_path
        assert "torch.compile'd fused loop" in path and "no-such-compiler" in path, path
        q, k = torch.randn(1, 1, 1, 64), torch.ones(1, 1, 4, 64, dtype=torch.int8)
        assert native.int8_attention(q, k, torch.ones(1, 1, 4, 1), k, torch.ones(1, 1, 4, 1),
                                     torch.ones(1, 1, 1, 4, dtype=torch.bool)) is None
        native.load.cache_clear()
        monkeypatch.delenv("CXX")
        monkeypatch.setenv("KVBENCH_NO_NATIVE", "1")  # a user's switch back to the torch kernels
        path = cache.attention_path
        assert "torch.compile'd fused loop" in path and "KVBENCH_NO_NATIVE is set" in path, path
    finally:
        native.load.cache_clear()  # the next test builds (or finds) the real library again


@needs_native
def test_kv_evaluate_checks_the_kernel_and_fails_a_wrong_one(monkeypatch, tmp_path, kernel_calls):
    """kv-evaluate of the int8 cache on a model with head_dim 64 runs the C++ kernel (counted) and passes;
    the same kernel with its output scaled by 1.05 (as a kernel dropping a term would be) fails it."""
    config = head_dim_64_config(tmp_path)
    args = ["kv-evaluate", "--config", str(config), "--strategies", "quantized", "--new-tokens", "30",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sum(kernel_calls) > 0
    counted = native.int8_attention
    monkeypatch.setattr(native, "int8_attention", lambda *a, **kw: None if (o := counted(*a, **kw)) is None else o * 1.05)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "Traceback" not in result.output, result.output



@needs_native
def test_a_library_that_will_not_load_is_built_again(monkeypatch, tmp_path):
    """A truncated .so in the cache (a full disk, a killed copy) is rebuilt, not a silent fallback forever;
    and $CXX may be a wrapper command (`ccache g++`: here `env g++`)."""
    monkeypatch.setenv("KVBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", f"env {native.compiler()[0]}")
    native.load.cache_clear()
    try:
        built = native.build(native.ATTENTION)
        built.write_bytes(b"not a library")
        native.load.cache_clear()
        assert native.attention_isa() is not None, native.why_not
        assert built.stat().st_size > 1000
    finally:
        native.load.cache_clear()


# --- the float32 decode kernel, which full-precision caches attend with -----------------------------------------

@needs_native
@pytest.mark.parametrize("flags", [(), GENERIC], ids=["this-cpu", "generic"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_float_kernel_agrees_with_sdpa(flags, head_dim):
    """Rows 1 to 9 (groups of 4 and what is left), keys not a multiple of 16, a per-row mask hiding some keys,
    K/V read as views of a longer buffer; key blocks that split evenly over the kernel's interleaved streams
    and blocks left over (3 and 6 blocks of 16, 97 values)."""
    torch.manual_seed(head_dim)
    B, H = 3, 2
    for rows, keys in ((1, 1), (1, 33), (3, 17), (4, 16), (9, 40), (2, 50), (1, 97), (4, 111)):
        q = torch.randn(B, H, rows, head_dim)
        k, v = (torch.randn(B, H, keys + 7, head_dim)[:, :, :keys] for _ in range(2))
        seen = torch.rand(B, 1, rows, keys) > 0.3
        seen[..., 0] = True
        out = native.float_attention(q, k, v, seen, extra_flags=flags)
        torch.testing.assert_close(out, attend_sdpa(q, k, v, seen), atol=1e-5, rtol=1e-5)


def attend_sdpa(q, k, v, mask):
    """The reference: SDPA itself, whatever attend() would route these shapes to."""
    if isinstance(mask, str):  # "causal"
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@needs_native
def test_decode_steps_attend_with_the_kernel_and_prompts_with_sdpa(monkeypatch):
    """attend() hands a decode step over a large cache to the C++ kernel (counted), with SDPA's answer; a
    prompt (many rows), a small cache, or bfloat16 stay with SDPA."""
    import kvbench.cache as cache_module

    calls = count_answers(monkeypatch, "float_attention")
    q, k, v = torch.randn(16, 12, 1, 64), torch.randn(16, 12, 1400, 64), torch.randn(16, 12, 1400, 64)
    torch.testing.assert_close(cache_module.attend(q, k, v, None), attend_sdpa(q, k, v, None), atol=1e-5, rtol=1e-5)
    assert calls == [True]
    cache_module.attend(torch.randn(16, 12, 40, 64), k[:, :, :40], v[:, :, :40], "causal")  # a prompt
    cache_module.attend(q, k[:, :, :10], v[:, :, :10], None)  # 10 keys: below NATIVE_MIN_ELEMENTS
    cache_module.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert len(calls) == 1


@needs_native
def test_code_path_says_which_attention_a_decode_step_runs():
    from kvbench.bench.paths import attention_path
    from kvbench.config import load_config

    config = load_config("default").model
    big = attention_path(StaticCacheStub(), config, 16, 1000, torch.float32, torch.device("cpu"))
    assert big.startswith(f"kvbench C++ decode kernel ({native.attention_isa()} loops) from 86 keys"), big
    small = attention_path(StaticCacheStub(), config, 1, 100, torch.float32, torch.device("cpu"))
    assert small.startswith("SDPA"), small


class StaticCacheStub:  # a cache without attention of its own: the default path
    pass


@needs_native
def test_kv_evaluate_checks_the_float_kernel_and_fails_a_wrong_one(monkeypatch, tmp_path):
    """static, with every decode step on the C++ kernel (its size threshold lowered to 0), passes kv-evaluate's
    exact check; the kernel with its output scaled by 1.0001 fails it."""
    import kvbench.cache as cache_module

    monkeypatch.setattr(cache_module, "NATIVE_MIN_ELEMENTS", 0)
    config = head_dim_64_config(tmp_path)
    args = ["kv-evaluate", "--config", str(config), "--strategies", "static", "--new-tokens", "30",
            "--device", "cpu"]
    real = native.float_attention
    calls = count_answers(monkeypatch, "float_attention")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls and all(calls)
    monkeypatch.setattr(native, "float_attention", lambda *a: real(*a) * 1.0001)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "Traceback" not in result.output, result.output


@needs_native
def test_code_paths_name_each_batch_where_they_differ():
    """A batch sweep records, per strategy, which attention each batch size ran (the kernel is chosen by the
    cache's size); int8 attends the same way at every size."""
    from kvbench.api import load_model
    from kvbench.bench.paths import code_paths

    paths = code_paths(load_model("default", device="cpu"), ["static", "quantized", "paged"], [1, 16], 1000)
    static = paths["static"]["attention"]
    assert static.startswith("batch 1: SDPA") and "; batch 16: kvbench C++ decode kernel" in static, static
    assert not paths["quantized"]["attention"].startswith("batch"), paths["quantized"]
    assert paths["paged"]["attention"].startswith("SDPA"), paths["paged"]  # its gathered blocks: (B, S, H, hd)


@needs_native
def test_paged_cache_attends_with_sdpa_as_its_code_path_says(monkeypatch):
    """The paged cache's gathered K/V are in (B, S, H, hd) order: the kernel declines them, every step."""
    from kvbench.api import load_model
    from kvbench.generate import generate

    answered = []
    real = native.float_attention
    monkeypatch.setattr(native, "float_attention", lambda *a: answered.append(real(*a) is not None))
    import kvbench.cache as cache_module
    monkeypatch.setattr(cache_module, "NATIVE_MIN_ELEMENTS", 0)
    model = load_model("default", device="cpu")
    generate(model, torch.randint(0, 1000, (2, 5)), 3, "paged")
    assert answered and not any(answered)
