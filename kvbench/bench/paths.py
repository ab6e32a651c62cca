"""Which code path each strategy's decode step runs: attention kernel, Linear kernel and layout, compiled or not.

Recorded in meta.json and shown under the benchmark's table, so that a silent fallback to a slow path (SDPA's
math backend instead of its fused one, a Linear re-laid for another dtype) shows beside the numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from kvbench import native
from kvbench.cache import NATIVE_MIN_ELEMENTS, KVCache, uses_native_kernel
from kvbench.generate import new_cache
from kvbench.kernels import ROW_COUNTS
from kvbench.model import SEVERAL_POSITIONS_PACKED_ROWS, kernel_choices
from kvbench.strategies import get

LINEAR_PATHS = {  # Linear.kernel -> what it computes and how W lies in memory
    "matmul": "x @ W, W (in, out)",
    "mv": "torch.mv, W (out, in) (F.linear above one row)",
    "linear": "F.linear, W (out, in)",
    "onednn": "oneDNN matmul on W packed once",
}
UNPACKED = (f"x @ W, W (in, out) for prompts and naive steps of over {SEVERAL_POSITIONS_PACKED_ROWS} rows, "
            "and when compiled")  # where the onednn kernel never packs


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> str:
    """The backend scaled_dot_product_attention picks for these inputs (FLASH_ATTENTION, MATH, ...)."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, k, mask, 0.0, causal)).name
    except (AttributeError, ImportError, RuntimeError, TypeError, ValueError):  # private API: may move
        return "unknown"


def attention_path(cache: KVCache | None, config, batch: int, visible: int, dtype: torch.dtype,
                   device: torch.device) -> str:
    """A cache that attends over its own storage names its kernel; the default path is SDPA, whose backend
    is asked with a decode step's shapes (one query row per query head of each K/V group)."""
    own = getattr(cache, "attention_path", None)
    if own is not None:
        return own
    kv_heads, head_dim = config.n_kv_heads if hasattr(config, "n_kv_heads") else config.n_heads, config.head_dim
    groups = config.n_heads // kv_heads
    if cache is None:  # naive: the whole sequence, causal
        q = torch.zeros(batch, kv_heads, visible, head_dim, dtype=dtype, device=device)  # (B, Hkv, T, hd)
        return f"SDPA {sdpa_backend(q, q, causal=True)}"
    q = torch.zeros(batch, kv_heads, groups, head_dim, dtype=dtype, device=device)  # (B, Hkv, g, hd)
    k = torch.zeros(batch, kv_heads, visible, head_dim, dtype=dtype, device=device)  # (B, Hkv, S, hd)
    sdpa = f"SDPA {sdpa_backend(q, k)}"
    if not (getattr(cache, "attends_in_head_order", True) and uses_native_kernel(batch, kv_heads, groups, visible, head_dim, dtype,
                                                               device)):
        return sdpa
    if native.attention_isa() is None:
        return f"{sdpa} ({native.why_not.get(native.ATTENTION, 'no C++ kernel')})"
    from_keys = -(-NATIVE_MIN_ELEMENTS // (batch * kv_heads * head_dim))
    return (f"kvbench C++ decode kernel ({native.attention_isa()} loops) from {from_keys} keys; "
            f"{sdpa} below and for prompts")


def linear_path(model: nn.Module) -> str:
    module = getattr(model, "model", model)  # an encoder-decoder bound to its source wraps the model
    kernels = sorted(kernel_choices(module))
    if not kernels:  # a model of its own code (transformers' under --engine transformers)
        return "the model's own (nn.Linear)"
    return "; ".join(describe_linear(kernel, rows) for kernel, rows in kernels)


def describe_linear(kernel: str, rows: int) -> str:
    """The kernel, and for onednn from which row count it packs (kvbench/kernels.py measures it on this machine)
    and where it does not."""
    if kernel != "onednn":
        return LINEAR_PATHS.get(kernel, kernel)
    if rows <= 1:
        return f"{LINEAR_PATHS[kernel]}; {UNPACKED}"
    if rows > ROW_COUNTS[-1]:  # packing won at none of the row counts tried
        when = (f" from {rows} rows (x @ W below: oneDNN measured slower at {ROW_COUNTS[0]}-{ROW_COUNTS[-1]} "
                "rows here)")
    else:
        when = f" from {rows} rows (x @ W below: measured faster here)"
    return f"{LINEAR_PATHS[kernel]}{when}; {UNPACKED}"


def compile_path(strategy: str, device: torch.device) -> str:
    if not get(strategy).compiled:
        return "eager"
    return "torch.compile (inductor" + (", CUDA graph)" if device.type == "cuda" else ")")


def code_paths(model, strategies: list[str], batches: list[int], visible: int) -> dict[str, dict[str, str]]:
    """Per strategy: {attention, linear, step} as its decode step runs them on this model and device, up to
    `visible` tokens; where batch sizes attend differently (a kernel chosen by the cache's size), each says."""
    paths = {}
    for strategy in strategies:
        paths[strategy] = {
            "attention": _attention_by_batch(model, strategy, sorted(set(batches)), visible),
            "linear": linear_path(model),
            "step": compile_path(strategy, model.device),
        }
    return paths


def _attention_by_batch(model, strategy: str, batches: list[int], visible: int) -> str:
    by_batch = {}
    for batch in batches:
        inner = new_cache(model, strategy, batch, 2)  # what kind of cache, not its size: a small one will do
        inner = getattr(inner, "self_cache", inner)  # an encoder-decoder's cache wraps the self-attention one
        by_batch[batch] = attention_path(inner, model.config, batch, visible, model.dtype, model.device)
    if len(set(by_batch.values())) == 1:
        return by_batch[batches[0]]
    return "; ".join(f"batch {batch}: {path}" for batch, path in by_batch.items())
