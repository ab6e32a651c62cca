"""Ablation: decode-step variants timed in one run, so that each design choice's effect is measured against
its alternative under the same conditions (docs/perf.md quotes these tables).

Every variant generates N tokens and 1 token from the same prompt; its decode time per token is
(t(N) - t(1)) / (N - 1), which removes the prefill the same way for kvbench's loop and transformers' generate().
Variants run interleaved within each repeat, so machine drift hits all alike.
"""

from __future__ import annotations

import math

import copy
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from kvbench.bench import floor
from kvbench.bench.stats import iqr
from kvbench.bench.timing import synchronize
from kvbench.cache import KVCache, QuantizedCache
from kvbench.errors import KVBenchError
from kvbench.strategies import COMPILED
from kvbench.generate import cache_tokens, decoder_for, generation_steps, new_cache
from kvbench.model import Decoder, kernel_choices
from kvbench.weights import to_gpt2


@dataclass
class Variant:
    name: str
    generate: Callable[[int], None]  # generate n new tokens (timed)
    setup: Callable[[], None] = lambda: None  # outside the timed region (e.g. thread count)
    teardown: Callable[[], None] = lambda: None


class DequantizingCache(QuantizedCache):
    """The int8 cache as it was before it attended over its own storage: every step dequantizes everything
    it holds into a full-precision copy (update()) and runs SDPA on that (KVCache's default attend)."""

    attend = KVCache.attend


def _ours(name: str, model: Decoder, prompt: torch.Tensor, longest: int, strategy: str = "static",
          grad_mode=torch.inference_mode, threads: int | None = None, cache_class: type | None = None) -> Variant:
    cache = new_cache(model, strategy, prompt.shape[0], cache_tokens(prompt.shape[1], longest))
    if cache_class is not None:  # the strategy's cache, re-classed to a variant with the same storage
        cache.__class__ = cache_class
    decode = decoder_for(strategy, prompt.device)
    # generation_steps runs under inference_mode; __wrapped__ is the bare loop, for the grad-mode variant
    steps = generation_steps.__wrapped__

    def generate(n: int) -> None:
        with grad_mode():
            for _ in steps(model, prompt, n, cache, decode=decode):
                pass

    default_threads = torch.get_num_threads()
    return Variant(name, generate, setup=lambda: torch.set_num_threads(threads or default_threads),
                   teardown=lambda: torch.set_num_threads(default_threads))


def _transformers(name: str, model: Decoder, prompt: torch.Tensor, use_cache: bool) -> Variant:
    try:
        import transformers
    except ImportError:
        raise KVBenchError("the transformers variants need transformers: pip install -e '.[test]'") from None
    try:
        weights = to_gpt2(model)
    except KVBenchError as exc:
        raise KVBenchError(f"--variants {name}: {exc}; these variants run transformers' GPT-2 on the same weights: "
                           "give a GPT-2-shaped --config (default, tiny, demo)") from None
    c = model.config
    hf_config = transformers.GPT2Config(n_layer=c.n_layers, n_embd=c.d_model, n_head=c.n_heads, n_inner=c.d_ff,
                                        vocab_size=c.vocab_size, n_positions=c.max_seq_len,
                                        layer_norm_epsilon=c.layer_norm_eps, tie_word_embeddings=c.tie_embeddings,
                                        bos_token_id=None, eos_token_id=None)  # no early stop: exactly n tokens
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    if unexpected or any(not name.endswith(("attn.bias", "attn.masked_bias")) for name in missing):
        raise KVBenchError(f"weights do not map onto transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    hf = hf.to(device=prompt.device, dtype=model.dtype)
    mask = torch.ones_like(prompt)

    def generate(n: int) -> None:
        with torch.inference_mode():
            hf.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        use_cache=use_cache, pad_token_id=0)

    return Variant(name, generate)


VARIANTS = {
    "kvbench": "kvbench's static-cache decode as shipped (kernel chosen per dtype and, float32 on CPU, per row count by measurement)",
    "linear": "every Linear as F.linear on (out, in) weights, as nn.Linear stores them",
    "matmul": "every Linear as x @ W on (in, out) weights",
    "mv": "every Linear as torch.mv on (out, in) weights for a single row",
    "onednn": "every Linear as oneDNN's matmul on weights packed once in its layout",
    "no-inference-mode": "torch.no_grad instead of torch.inference_mode",
    "1-thread": "torch.set_num_threads(1)",
    "dynamic": "the dynamic cache (torch.cat each step) instead of the static one",
    "quantized": "the int8 cache, attending over its int8 storage (scales fused, torch.compile)",
    "quantized-copy": "the int8 cache dequantizing all it holds into a full-precision copy every step, then SDPA",
    "compiled": "static cache, decode step compiled with torch.compile (CUDA graph on CUDA), fixed shapes",
    "naive": "kvbench's naive baseline: the whole sequence recomputed each step",
    "hf-cache": "transformers' GPT-2 generate() with its KV cache, same weights",
    "hf-naive": "transformers' GPT-2 generate(use_cache=False), same weights",
}


def build_variants(names: list[str], model: Decoder, prompt: torch.Tensor, longest: int) -> list[Variant]:
    def with_kernel(kernel: str) -> Decoder:  # every row count on `kernel`, unlike the shipped choice
        if kernel_choices(model) == {(kernel, 1)}:
            return model  # already so: no copy (a second model on a GPU may not fit)
        return copy.deepcopy(model).use_kernel(kernel)

    makers = {
        "kvbench": lambda: _ours("kvbench", model, prompt, longest),
        "linear": lambda: _ours("linear", with_kernel("linear"), prompt, longest),
        "matmul": lambda: _ours("matmul", with_kernel("matmul"), prompt, longest),
        "mv": lambda: _ours("mv", with_kernel("mv"), prompt, longest),
        "onednn": lambda: _ours("onednn", with_kernel("onednn"), prompt, longest),
        "no-inference-mode": lambda: _ours("no-inference-mode", model, prompt, longest, grad_mode=torch.no_grad),
        "1-thread": lambda: _ours("1-thread", model, prompt, longest, threads=1),
        "dynamic": lambda: _ours("dynamic", model, prompt, longest, strategy="dynamic"),
        "quantized": lambda: _ours("quantized", model, prompt, longest, strategy="quantized"),
        "quantized-copy": lambda: _ours("quantized-copy", model, prompt, longest, strategy="quantized",
                                        cache_class=DequantizingCache),
        "compiled": lambda: _ours("compiled", model, prompt, longest, strategy=COMPILED.name),
        "naive": lambda: _ours("naive", model, prompt, longest, strategy="naive"),
        "hf-cache": lambda: _transformers("hf-cache", model, prompt, use_cache=True),
        "hf-naive": lambda: _transformers("hf-naive", model, prompt, use_cache=False),
    }
    return [makers[name]() for name in names]


def _seconds(variant: Variant, n: int, device: torch.device) -> float:
    variant.setup()
    synchronize(device)
    start = time.perf_counter()
    variant.generate(n)
    synchronize(device)
    elapsed = time.perf_counter() - start
    variant.teardown()
    return elapsed


def decode_ms(full_s: float, one_s: float, new_tokens: int) -> float:
    """Per decode token: a whole generation minus a one-token one, over the extra tokens. NaN where noise
    made the difference vanish (a run too short to resolve decoding): never a negative time."""
    per_token = 1000 * (full_s - one_s) / (new_tokens - 1)
    return per_token if per_token > 0 else math.nan


def run_ablation(variants: list[Variant], new_tokens: int, repeats: int, device: torch.device,
                 on_repeat: Callable[[int], None] = lambda r: None) -> pd.DataFrame:
    """Per-token decode time of each variant, repeats interleaved; one row per variant and repeat."""
    for variant in variants:  # warm-up, untimed: a whole generation, as benchmark's --warmup runs, because some
        _seconds(variant, new_tokens, device)  # kernels are built per shape (naive meets a new length each step)
    rows = []
    for repeat in range(repeats):
        for variant in variants:
            full, one = _seconds(variant, new_tokens, device), _seconds(variant, 1, device)
            rows.append(dict(variant=variant.name, repeat=repeat, total_s=full, prefill_s=one,
                             per_token_ms=decode_ms(full, one, new_tokens)))
        on_repeat(repeat)
    return pd.DataFrame(rows)


def summarize_ablation(rows: pd.DataFrame, model: Decoder, prompt_len: int, new_tokens: int, batch: int,
                       limits: floor.MachineLimits) -> pd.DataFrame:
    visible = prompt_len + new_tokens / 2  # mean keys attended over the decode steps
    step_bytes = floor.weight_bytes_per_step(model, batch) + floor.kv_bytes_read(model, visible, batch)
    floor_ms, bound = limits.floor(step_bytes, floor.cached_step_flops(model, visible, batch), batch)
    summary = rows.groupby("variant", sort=False)["per_token_ms"].agg(
        per_token_ms="median", iqr_ms=iqr).reset_index()
    summary["x_floor"] = summary["per_token_ms"] / floor_ms
    summary["x_first"] = summary["per_token_ms"] / summary["per_token_ms"].iloc[0]
    summary.attrs["floor_ms"], summary.attrs["bound"] = floor_ms, bound
    return summary

