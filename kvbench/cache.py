"""KV caches behind one small interface: update, mask, reset, nbytes.

A cache stores each layer's keys and values so that a decode step computes K/V for the new token only.
`update` stores the new K/V and returns everything the new queries attend to; `mask` says which of those
keys each new query may see. "naive" is not a cache: it means no cache at all (every step recomputes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import torch

# What attention is told about visibility: None = every returned key, "causal" = square lower-triangular,
# or a bool tensor (T, S) where True means "query t may attend to key s".
Mask = Union[None, str, torch.Tensor]


def causal_mask(start_pos: int, n_new: int, n_keys: int, device: torch.device) -> Mask:
    """Visibility for queries at positions start_pos.. over keys at positions 0..n_keys-1."""
    if n_new == 1:
        return None  # a single newest query sees every key stored so far
    if start_pos == 0 and n_keys == n_new:
        return "causal"  # lets SDPA use its fused causal path
    query_pos = torch.arange(start_pos, start_pos + n_new, device=device)  # (T,)
    key_pos = torch.arange(n_keys, device=device)  # (S,)
    return key_pos[None, :] <= query_pos[:, None]  # (T, S)


class KVCache(ABC):
    """Per-layer keys and values, shaped (batch, heads, tokens, head_dim)."""

    @abstractmethod
    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) for positions start_pos..start_pos+T-1; return the keys/values to attend."""

    @abstractmethod
    def mask(self, start_pos: int, n_new: int) -> Mask:
        """Which returned keys the n_new queries starting at start_pos may see (same for every layer)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every stored token, keeping allocations, so the cache can serve a new sequence."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the cache holds in memory right now."""


class StaticCache(KVCache):
    """Preallocated K and V buffers, written in place: no allocation while decoding (as gpt-fast does).

    With an int start position, attention sees a view of the filled slots. With a tensor start position (the
    compiled decode step), every shape is fixed: new K/V go in with index_copy_, attention gets the whole
    buffer and a mask hides the slots after the query, so one compilation (or one CUDA graph) serves every step.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, n_heads, max_len, head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def update(self, layer, start_pos, k, v):
        if isinstance(start_pos, torch.Tensor):
            slots = start_pos + torch.arange(k.shape[2], device=k.device)  # (T,)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]  # (B, H, max_len, hd): fixed shape, masked by mask()
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"static cache holds {self.max_len} tokens; position {end - 1} does not fit")
        self.k[layer][:, :, start_pos:end].copy_(k)
        self.v[layer][:, :, start_pos:end].copy_(v)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # views (B, H, end, hd), no copy

    def mask(self, start_pos, n_new):
        device = self.k[0].device
        if isinstance(start_pos, torch.Tensor):
            query_pos = start_pos + torch.arange(n_new, device=device)  # (T,)
            return torch.arange(self.max_len, device=device)[None, :] <= query_pos[:, None]  # (T, max_len)
        return causal_mask(start_pos, n_new, start_pos + n_new, device)

    def reset(self):
        pass  # slots past the current position are never visible, so stale ones need no zeroing

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)


class DynamicCache(KVCache):
    """Grows by concatenation every step, as transformers' default cache does: simple, but reallocates."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.reset()

    def update(self, layer, start_pos, k, v):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k.contiguous(), v.contiguous()
        else:
            if start_pos != self.k[layer].shape[2]:
                raise ValueError(f"dynamic cache holds {self.k[layer].shape[2]} tokens; cannot write at {start_pos}")
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)  # (B, H, S+T, hd)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def mask(self, start_pos, n_new):
        device = self.k[0].device if self.k[0] is not None else "cpu"
        return causal_mask(start_pos, n_new, start_pos + n_new, device)

    def reset(self):
        self.k: list[torch.Tensor | None] = [None] * self.n_layers
        self.v: list[torch.Tensor | None] = [None] * self.n_layers

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v if t is not None)


def kv_bytes_formula(n_layers: int, n_heads: int, head_dim: int, tokens: int, batch: int, bytes_per_element: int) -> int:
    """Size of a full-precision KV cache: K and V, for every layer, head, position and sequence."""
    return 2 * n_layers * n_heads * head_dim * tokens * batch * bytes_per_element


COMPILED = "static+compile"  # the static cache with its decode step compiled (fixed shapes)
STRATEGIES = ("naive", "static", "dynamic", COMPILED)


def make_cache(strategy: str, config, batch: int, max_len: int, dtype: torch.dtype,
               device: torch.device | str) -> KVCache | None:
    """The cache a strategy uses; None for naive (no cache: recompute every step)."""
    if strategy == "naive":
        return None
    if strategy in ("static", COMPILED):
        return StaticCache(config.n_layers, batch, config.n_heads, max_len, config.head_dim, dtype, device)
    if strategy == "dynamic":
        return DynamicCache(config.n_layers)
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
