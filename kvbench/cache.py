"""KV caches behind one small interface: update, mask, reset, nbytes, contents.

A cache stores each layer's keys and values so that a decode step computes K/V for the new token only.
`update` stores the new K/V and returns everything the new queries attend to; `mask` says which of those
keys each new query may see; `contents` gives back what is stored, by position, so that kv-evaluate can
check it against the K/V a fresh forward computes. "naive" is not a cache: it means no cache at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from kvbench import native

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


# A decode step's attention (a few query rows over a long cache) runs the C++ kernel of kvbench/csrc where it
# is faster than SDPA, measured on batch 16 x 12 heads x 1500 keys, cold: 6.2 against 7.7 ms at one query row,
# 12.7 against 15.9 at 16 rows. Below ~2^20 K elements the call's fixed costs make them even (batch 1, 1000 keys,
# warm: 0.20 against 0.18 ms), and prompts (many rows) are what SDPA's kernel is built for.
NATIVE_MAX_ROWS = 16
NATIVE_MIN_ELEMENTS = 2**20


def uses_native_kernel(batch: int, kv_heads: int, rows: int, keys: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> bool:
    """Whether attend() hands these shapes to the C++ decode kernel (if it could be built)."""
    return (device.type == "cpu" and dtype == torch.float32 and head_dim in (64, 128) and rows <= NATIVE_MAX_ROWS
            and batch * kv_heads * keys * head_dim >= NATIVE_MIN_ELEMENTS)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, T, hd) over k, v (B, H, S, hd) under a Mask: (B, H, T, hd).
    A decode step on the CPU runs kvbench's C++ kernel (see NATIVE_MAX_ROWS), anything else SDPA."""
    B, H, R, hd = q.shape
    if uses_native_kernel(B, H, R, k.shape[2], hd, q.dtype, q.device):
        out = native.float_attention(q, k, v, visible_rows(mask, B, R, k.shape[2], q.device))
        if out is not None:
            return out
    attn_mask = mask if isinstance(mask, torch.Tensor) else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=isinstance(mask, str))


def visible_rows(mask: Mask, batch: int, rows: int, keys: int, device: torch.device) -> torch.Tensor:
    """A Mask as one bool tensor (batch | 1, 1, rows, keys), what the C++ kernels read."""
    if mask is None:
        return torch.ones(1, 1, rows, keys, dtype=torch.bool, device=device)
    if isinstance(mask, str):  # "causal": square, the new tokens are all the keys
        return torch.ones(rows, keys, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, R, S)
    return mask if mask.dim() == 4 else mask[None, None]  # (B | 1, 1, R, S)


def hide_padding(mask: Mask, query_cols: torch.Tensor, key_cols: torch.Tensor, pads: torch.Tensor | None) -> Mask:
    """A ragged batch's visibility: `mask` (T, S) over columns (or None / "causal"), with each row's left
    padding hidden from its queries: (B, 1, T, S). Row b's first pads[b] columns are padding. A padding query
    still sees itself, so that no row of attention is empty (an empty row's softmax would be NaN, and NaN
    stored as a hidden key's value leaks through a zero weight: 0 x NaN is NaN)."""
    if pads is None:
        return mask
    if mask is None:
        mask = torch.ones(len(query_cols), len(key_cols), dtype=torch.bool, device=key_cols.device)  # (T, S)
    elif isinstance(mask, str):  # "causal"
        mask = key_cols[None, :] <= query_cols[:, None]  # (T, S)
    real = key_cols[None, :] >= pads[:, None]  # (B, S): keys of the row's own tokens
    own = key_cols[None, :] == query_cols[:, None]  # (T, S)
    return (mask[None] & (real[:, None, :] | own[None]))[:, None]  # (B, 1, T, S)


def columns_mask(start_pos: int, n_new: int, device: torch.device, pads: torch.Tensor | None) -> Mask:
    """Causal visibility of queries at start_pos.. over keys held in columns 0..start_pos+n_new-1 (what
    static, dynamic and quantized caches return), a ragged batch's padding hidden."""
    mask = causal_mask(start_pos, n_new, start_pos + n_new, device)
    if pads is None:
        return mask
    query_pos = torch.arange(start_pos, start_pos + n_new, device=device)  # (T,)
    return hide_padding(mask, query_pos, torch.arange(start_pos + n_new, device=device), pads)


@dataclass(frozen=True)
class CacheMemory:
    """What a cache allocated for a generation against what its tokens need: a preallocated or padded cache
    wastes the difference, a paged one only the unfilled end of each sequence's last block."""

    allocated: int  # bytes the cache set aside for the generation's sequences
    live: int  # bytes holding the sequences' own tokens (padding and unused slots excluded)

    @property
    def waste(self) -> float:
        """(allocated - live) / allocated: the share of the allocation holding nothing of use."""
        return (self.allocated - self.live) / self.allocated if self.allocated else 0.0


class KVCache(ABC):
    """Per-layer keys and values, shaped (batch, heads, tokens, head_dim).

    A forward pass calls begin(), then mask() once and attend() (which calls update()) once per layer,
    then end()."""

    # whether the K/V a decode step attends over are (B, H, S, hd) with keys head_dim apart, as kvbench's C++
    # decode kernel reads them (the benchmark's code path asks this; the kernel itself checks every call)
    attends_in_head_order = True

    pads: torch.Tensor | None = None  # (B,) left padding of each row of a ragged batch; None: no padding

    def begin(self, start_pos: int | torch.Tensor, n_new: int, pads: torch.Tensor | None = None) -> None:
        """A forward pass of n_new tokens from column start_pos starts (before any layer's update). In a
        ragged batch, row b's first pads[b] columns are left padding: mask() hides them."""
        self.pads = pads

    def end(self) -> None:
        """The forward pass is over: every layer has stored its K/V."""

    def fixed_buffers(self) -> list[torch.Tensor]:
        """Buffers a compiled decode step writes in place, whose addresses never change (a CUDA graph may
        mutate only such inputs); none unless the cache has a fixed-shape mode."""
        return []

    @abstractmethod
    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) for positions start_pos..start_pos+T-1; return the keys/values to attend."""

    def attend(self, layer: int, start_pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Mask) -> torch.Tensor:
        """Store k, v (B, H, T, hd) and attend the queries q (B, H, T, hd) over every key `mask` lets them
        see: (B, H, T, hd). The default stores with update() and runs SDPA on what it returns; a cache that
        can attend over its own storage (int8 blocks, pages) overrides this and skips the full copy."""
        k_all, v_all = self.update(layer, start_pos, k, v)
        return attend(q, k_all, v_all, mask)

    @abstractmethod
    def mask(self, start_pos: int, n_new: int) -> Mask:
        """Which returned keys the n_new queries starting at start_pos may see (same for every layer)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every stored token, keeping allocations, so the cache can serve a new sequence."""

    def crop(self, length: int) -> None:
        """Forget every column from `length` on (rejected draft tokens of speculative decoding): the next
        write is at `length`. Optional for a plugin: kv-evaluate --rollback reports one without it."""
        raise NotImplementedError(f"{type(self).__name__} cannot roll back")

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the cache holds in memory right now."""

    @abstractmethod
    def expected_bytes(self, tokens: int) -> int:
        """What the strategy's formula says it needs to hold `tokens` positions."""

    def contents(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the cache holds for `layer` after `length` tokens went through it since reset():
        (positions (S,) ascending, K (B, H, S, hd), V (B, H, S, hd)), as the next query would read them.

        kv-evaluate compares these with the K/V a fresh forward computes at the same positions, which catches
        an off-by-one, a lossy store or a stale slot even where the logits cannot resolve it. Optional for a
        plugin: one that does not provide it is reported as unchecked."""
        raise NotImplementedError

    def storage_bound(self, exact: torch.Tensor) -> torch.Tensor:
        """How far a stored element may lie from the exact K or V (B, H, S, hd) it stores: 0 for a lossless
        cache; a lossy one (quantized) states its own bound, which kv-evaluate holds it to."""
        return torch.zeros_like(exact)

    def release(self, row: int) -> None:
        """The sequence of `row` finished (its own stop, or an EOS) while others go on: a cache that can
        give its storage back does so here. The default keeps it: rows stored side by side in one buffer
        cannot shrink one row alone, so the finished row's slots stay allocated until reset()."""

    @property
    def token_bytes(self) -> int:
        """Bytes one token of one sequence takes, K and V of every layer. Optional for a plugin: without it
        the benchmark leaves the memory columns empty."""
        raise NotImplementedError(f"{type(self).__name__} does not say what a token takes")

    def memory_use(self, row_tokens: list[int]) -> CacheMemory:
        """Allocated and live bytes when row b's sequence holds row_tokens[b] tokens at its largest (its
        prompt, without padding, plus every new token fed back). The default: everything the cache holds
        is allocated, and each live token takes token_bytes."""
        return CacheMemory(self.nbytes, self.token_bytes * sum(row_tokens))


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

    def fixed_buffers(self):
        return self.k + self.v

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
            key_pos = torch.arange(self.max_len, device=device)  # (max_len,)
            return hide_padding(key_pos[None, :] <= query_pos[:, None], query_pos, key_pos, self.pads)
        return columns_mask(start_pos, n_new, device, self.pads)

    def reset(self):
        pass  # slots past the current position are never visible, so stale ones need no zeroing

    def crop(self, length):
        pass  # as reset: what lies past the position is never visible, and is overwritten next

    def contents(self, layer, length):
        positions = torch.arange(length, device=self.k[layer].device)  # slot p holds position p
        return positions, self.k[layer][:, :, :length], self.v[layer][:, :, :length]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)

    def expected_bytes(self, tokens):
        B, H, _, hd = self.k[0].shape
        return kv_bytes_formula(len(self.k), H, hd, tokens, B, self.k[0].element_size())

    @property
    def token_bytes(self):
        return self.expected_bytes(1) // self.k[0].shape[0]  # of one row: each row's slots are all allocated


class DynamicCache(KVCache):
    """Grows by concatenation every step, as transformers' default cache does: simple, but reallocates."""

    def __init__(self, n_layers: int, device: torch.device | str = "cpu"):
        self.n_layers, self.device_hint = n_layers, device  # the device of masks before anything is stored
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
        device = self.k[0].device if self.k[0] is not None else self.device_hint
        return columns_mask(start_pos, n_new, device, self.pads)

    def reset(self):
        self.k: list[torch.Tensor | None] = [None] * self.n_layers
        self.v: list[torch.Tensor | None] = [None] * self.n_layers

    def crop(self, length):
        self.k = [None if t is None else t[:, :, :length] for t in self.k]  # views: the next cat copies anyway
        self.v = [None if t is None else t[:, :, :length] for t in self.v]

    def contents(self, layer, length):
        k, v = self.k[layer], self.v[layer]
        if k is None:
            return torch.arange(0), k, v
        return torch.arange(k.shape[2], device=k.device), k, v  # whatever it holds: the checker counts them

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v if t is not None)

    def expected_bytes(self, tokens):
        if self.k[0] is None:
            return 0
        B, H, _, hd = self.k[0].shape
        return kv_bytes_formula(self.n_layers, H, hd, tokens, B, self.k[0].element_size())

    @property
    def token_bytes(self):
        # every row grows to the batch's widest: padding columns and a finished row's later columns are held
        return self.expected_bytes(1) // self.k[0].shape[0] if self.k[0] is not None else 0


class SlidingWindowCache(KVCache):
    """A ring buffer of the last `window` positions per layer: memory stays bounded however long the run.

    Position p lives in slot p % slots. Attention is windowed: a query at p sees positions p-window+1..p.
    With slots = window (no rollback), one new token sees exactly what the ring holds after the write, so no
    mask is needed (attention does not care about key order: positions are already inside K and V). For
    several new tokens (a prefill), the queries see what the ring held before plus the new keys, under a
    banded causal mask. To roll back R tokens the ring keeps R spare slots: positions a rollback brings back
    into the window, which a ring of exactly `window` slots would have overwritten.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, spare: int = 0):
        self.window, self.spare, self.slots = window, spare, window + spare
        shape = (batch, n_heads, self.slots, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slot_pos = torch.full((self.slots,), -1, dtype=torch.long, device=device)  # position per slot; -1 empty

    def begin(self, start_pos, n_new, pads=None):
        super().begin(start_pos, n_new, pads)
        # the newest `window` of this pass's positions, and the slots they go to: committed to slot_pos at end(),
        # so that every layer's update (and mask) sees what the ring held before the pass
        kept = torch.arange(max(0, n_new - self.slots), n_new, device=self.slot_pos.device)
        self.pending = (kept, (start_pos + kept) % self.slots, start_pos + kept)  # (index in pass, slot, position)

    def end(self):
        _, slots, positions = self.pending
        self.slot_pos[slots] = positions

    def update(self, layer, start_pos, k, v):
        n_new = k.shape[2]
        if n_new == 1:
            slot = start_pos % self.slots
            self.k[layer][:, :, slot].copy_(k[:, :, 0])
            self.v[layer][:, :, slot].copy_(v[:, :, 0])
            held = min(start_pos + 1, self.slots)  # slots fill in order from 0 until the ring wraps
            return self.k[layer][:, :, :held], self.v[layer][:, :, :held]
        held = (self.slot_pos >= 0).nonzero()[:, 0]  # slot order: the same order mask() lists positions in
        k_all = torch.cat([self.k[layer][:, :, held], k], dim=2)  # (B, H, held + T, hd)
        v_all = torch.cat([self.v[layer][:, :, held], v], dim=2)
        kept, slots, _ = self.pending
        self.k[layer].index_copy_(2, slots, k[:, :, kept])
        self.v[layer].index_copy_(2, slots, v[:, :, kept])
        return k_all, v_all

    def mask(self, start_pos, n_new):
        if n_new == 1 and self.pads is None and self.spare == 0:
            return None  # the one new query sees exactly what the ring holds
        device = self.slot_pos.device
        query_pos = torch.arange(start_pos, start_pos + n_new, device=device)  # (T,)
        if n_new == 1:
            held = min(start_pos + 1, self.slots)
            key_pos = self.slot_pos[:held].clone()  # (held,) slot order, as update() returns them
            key_pos[start_pos % self.slots] = start_pos  # the slot this step writes
            in_window = sliding_mask(query_pos, key_pos, self.window) & (key_pos >= 0)  # (1, held): spare slots
            return hide_padding(in_window, query_pos, key_pos, self.pads)
        held = self.slot_pos[self.slot_pos >= 0]  # positions of the slots update() will return first
        key_pos = torch.cat([held, query_pos])  # (S,)
        if held.numel() == 0 and start_pos == 0 and n_new <= self.window:
            return hide_padding("causal", query_pos, key_pos, self.pads)
        return hide_padding(sliding_mask(query_pos, key_pos, self.window), query_pos, key_pos, self.pads)

    def reset(self):
        self.slot_pos.fill_(-1)

    def crop(self, length):
        newest = int(self.slot_pos.max())
        if newest - length > self.spare:  # the window of position `length` reaches below what the ring kept
            raise ValueError(f"sliding cache with {self.spare} spare slots cannot roll back {newest + 1 - length} "
                             f"tokens (at most {self.spare + 1})")
        self.slot_pos[self.slot_pos >= length] = -1

    def contents(self, layer, length):
        # the last `window` positions: what attention reads (spare slots keep older ones for a rollback only)
        newest = int(self.slot_pos.max())
        held = ((self.slot_pos >= 0) & (self.slot_pos > newest - self.window)).nonzero()[:, 0]  # (S,) in the window
        positions, order = self.slot_pos[held].sort()
        slots = held[order]  # filled slots in position order
        return positions, self.k[layer][:, :, slots], self.v[layer][:, :, slots]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)

    def expected_bytes(self, tokens):
        B, H, _, hd = self.k[0].shape
        return kv_bytes_formula(len(self.k), H, hd, min(tokens, self.slots), B, self.k[0].element_size())

    @property
    def token_bytes(self):
        B, H, _, hd = self.k[0].shape
        return kv_bytes_formula(len(self.k), H, hd, 1, 1, self.k[0].element_size())

    def memory_use(self, row_tokens):
        # the ring keeps a row's last `window` positions live; spare slots and a short row's padding are waste
        return CacheMemory(self.nbytes, self.token_bytes * sum(min(t, self.window) for t in row_tokens))


def sliding_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(T, S): query at q sees keys at q-window+1 .. q."""
    offset = query_pos[:, None] - key_pos[None, :]
    return (offset >= 0) & (offset < window)


DEQUANTIZE_FROM_ROWS = 192  # query rows from which dequantizing what a pass reads, once, then SDPA, beats the
# int8 kernel, whose conversions repeat for every group of query rows (batch 16 x 12 heads x 1500 keys, cold: the
# C++ kernel 2.6 ms at 1 row, 3.3 at 4, 9.2 at 16, 32.6 at 64; dequantize + SDPA 80-140 ms from 1 to 128 rows)


class QuantizedCache(KVCache):
    """K and V stored as int8 with one float32 scale per token and head; attention reads the int8 storage.

    Symmetric per-vector quantisation: scale = max|x| / 127 over the head_dim entries of one token's head.
    About 3.8x smaller than float32 K/V at head_dim 64 (64 + 4 bytes instead of 256). Not exact: it is
    checked against thresholds on logit error, KL divergence and top-1 agreement, not tolerance.

    Why attend() is its own: dequantizing the whole cache into a full-precision copy every step (what
    update() + SDPA would do) reads the int8 cache, writes 4 bytes per element and reads them again, so the
    cache that exists to read fewer bytes read more. int8_attention() instead folds each key's scale into its
    score and each value's scale into its softmax weight, converting int8 to float in registers (the C++ kernel
    of kvbench/csrc on CPUs with a compiler, else a torch.compile'd fused loop), so a step reads 1 byte per
    element plus a scale per vector. A pass of many new tokens (a prompt) is the exception: the kernels repeat
    their conversions for every few query rows, so there one
    dequantized copy of what the pass reads, shared by all its rows, and SDPA cost less (the same arithmetic
    over the same stored values: tests/test_cache.py checks the two agree).
    """

    @property
    def attention_path(self) -> str:
        """Which int8 kernel a decode step runs here (the benchmark records it, so a fallback shows)."""
        return int8_attention_path(self.kq[0].device, self.kq[0].shape[-1])

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.dtype, self.max_len = dtype, max_len
        values, scales = (batch, n_heads, max_len, head_dim), (batch, n_heads, max_len, 1)
        self.kq = [torch.zeros(values, dtype=torch.int8, device=device) for _ in range(n_layers)]
        self.vq = [torch.zeros(values, dtype=torch.int8, device=device) for _ in range(n_layers)]
        self.ks = [torch.zeros(scales, dtype=torch.float32, device=device) for _ in range(n_layers)]
        self.vs = [torch.zeros(scales, dtype=torch.float32, device=device) for _ in range(n_layers)]

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127  # (B, H, T, 1)
        return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (q * scale).to(self.dtype)  # (B, H, T, hd)

    def store(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Quantize and store k, v (B, H, T, hd) at start_pos..; returns how many positions are now held."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"quantized cache holds {self.max_len} tokens; position {end - 1} does not fit")
        for q_store, s_store, x in ((self.kq, self.ks, k), (self.vq, self.vs, v)):
            q, scale = self.quantize(x)
            q_store[layer][:, :, start_pos:end].copy_(q)
            s_store[layer][:, :, start_pos:end].copy_(scale)
        return end

    def stored(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int8 K, its scales, the int8 V, its scales of positions 0..end-1: views (B, H, end, hd | 1).
        The one place storage is read, by attention and by contents() alike."""
        return (self.kq[layer][:, :, :end], self.ks[layer][:, :, :end], self.vq[layer][:, :, :end],
                self.vs[layer][:, :, :end])

    def update(self, layer, start_pos, k, v):
        return self.read(layer, self.store(layer, start_pos, k, v))

    def attend(self, layer, start_pos, q, k, v, mask):
        end = self.store(layer, start_pos, k, v)
        if q.shape[2] >= DEQUANTIZE_FROM_ROWS:  # a prefill: one dequantized copy, shared by all its query rows
            return attend(q, *self.read(layer, end), mask)
        kq, ks, vq, vs = self.stored(layer, end)
        return int8_attention(q, kq, ks, vq, vs, mask)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions 0..end-1, dequantized: what contents() reports (attention never builds this)."""
        kq, ks, vq, vs = self.stored(layer, end)
        return self.dequantize(kq, ks), self.dequantize(vq, vs)  # (B, H, end, hd) each

    def mask(self, start_pos, n_new):
        return columns_mask(start_pos, n_new, self.kq[0].device, self.pads)

    def reset(self):
        pass  # as the static cache: slots past the position are never read

    def crop(self, length):
        pass

    def contents(self, layer, length):
        return torch.arange(length, device=self.kq[layer].device), *self.read(layer, length)

    def storage_bound(self, exact):
        # symmetric int8 per vector: the step is max|x| / 127 and rounding errs by at most half a step
        return exact.float().abs().amax(dim=-1, keepdim=True).expand(exact.shape) / 254

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.kq + self.vq + self.ks + self.vs)

    def expected_bytes(self, tokens):
        B, H, _, hd = self.kq[0].shape
        return 2 * len(self.kq) * H * tokens * B * (hd * 1 + 4)  # int8 values + a float32 scale per vector

    @property
    def token_bytes(self):
        return self.expected_bytes(1) // self.kq[0].shape[0]


# --- attention over int8 storage -------------------------------------------------------------------------------

QUERY_BLOCK = 128  # query rows per fused call: a long prefill's scores (B, H, rows, S) stay this many rows tall


def _int8_scores_softmax_values(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, vq: torch.Tensor,
                                vs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v with k = kq * ks and v = vq * vs, never building k or v.

    q (B, H, R, hd) float; kq, vq (B, H, S, hd) int8; ks, vs (B, H, S, 1); visible bool (B, 1, R, S).
    Compiled, the products below are fused loops that convert int8 to float in registers: the (B, H, R, S, hd)
    broadcasts are never materialized. Arithmetic in float32 whatever the model's dtype."""
    hd = q.shape[-1]
    q32 = q.float()
    scores = (q32[:, :, :, None, :] * kq[:, :, None, :, :].float()).sum(-1)  # (B, H, R, S): q . kq per key
    scores = scores * (ks[:, :, None, :, 0] * hd ** -0.5)  # each key's scale, folded into its score
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1) * vs[:, :, None, :, 0]  # (B, H, R, S): each value's scale folded in
    return (weights[..., None] * vq[:, :, None, :, :].float()).sum(-2)  # (B, H, R, hd)


_compiled_int8 = None  # built on first use: compiling costs seconds, and most runs never use this cache


def _fused_kernel():
    global _compiled_int8
    if _compiled_int8 is None:
        _compiled_int8 = torch.compile(_int8_scores_softmax_values, dynamic=True, fullgraph=True)
    return _compiled_int8


COMPILED_MIN_ELEMENTS = 2**20  # int8 K elements below which the eager kernel is faster: a compiled call's
# guards and dispatch cost ~0.1-0.2 ms (measured on tiny.yaml: 0.25 ms per layer against SDPA's 0.06 ms)
KEY_CHUNK = 256  # keys per chunk of the eager kernel: each chunk's float copy stays in the CPU's cache


def _chunked_int8_attention(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, vq: torch.Tensor,
                            vs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The eager kernel, same arithmetic: keys and values dequantized KEY_CHUNK positions at a time, so that no
    full-precision copy of the whole cache is ever built; the scores (B, H, R, S) are the only full-width tensor.
    q (B, H, R, hd); visible bool (B, 1, R, S); returns (B, H, R, hd) float32."""
    q32, S = q.float() * q.shape[-1] ** -0.5, kq.shape[2]
    chunks = range(0, S, KEY_CHUNK)
    scores = torch.cat([q32 @ (kq[:, :, c:c + KEY_CHUNK].float() * ks[:, :, c:c + KEY_CHUNK]).transpose(-1, -2)
                        for c in chunks], dim=-1)  # (B, H, R, S)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)  # (B, H, R, S)
    out = torch.zeros_like(q32)  # (B, H, R, hd)
    for c in chunks:
        out += weights[..., c:c + KEY_CHUNK] @ (vq[:, :, c:c + KEY_CHUNK].float() * vs[:, :, c:c + KEY_CHUNK])
    return out


def _attend_block(q, kq, ks, vq, vs, visible) -> torch.Tensor:
    """The C++ kernel where it applies (CPU, head_dim 64 or 128, a compiler on the machine); else large caches
    run the compiled fused kernel, small ones, or any the compiler gives up on (too many shapes in one
    process), the eager chunked kernel: all read int8, none copies the whole cache."""
    out = native.int8_attention(q, kq, ks, vq, vs, visible)
    if out is not None:
        return out
    if kq.numel() >= COMPILED_MIN_ELEMENTS:
        try:
            return _fused_kernel()(q, kq, ks, vq, vs, visible)
        except (torch._dynamo.exc.FailOnRecompileLimitHit, torch._dynamo.exc.Unsupported):
            pass
    return _chunked_int8_attention(q, kq, ks, vq, vs, visible)


def int8_attention_path(device: torch.device, head_dim: int) -> str:
    fallback = "torch.compile'd fused loop for large caches, else chunked eager"
    if device.type != "cpu":
        return f"kvbench int8 attention: {fallback}"
    if head_dim not in (64, 128):
        return f"kvbench int8 attention: {fallback} (the C++ kernel takes head_dim 64 or 128)"
    isa = native.attention_isa()
    if isa is None:
        return f"kvbench int8 attention: {fallback} ({native.why_not.get(native.ATTENTION, 'no C++ kernel')})"
    return f"kvbench int8 attention: C++ kernel ({isa} loops, built here with -march=native; prompts dequantize once)"


def int8_attention(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
                   mask: Mask) -> torch.Tensor:
    """Attention of q (B, H, R, hd) over int8 keys and values (B, H, S, hd) with per-vector scales (B, H, S, 1),
    under a Mask over (R, S) (R may be groups x new tokens: query heads folded into rows; a ragged batch's
    mask is per row, (B, 1, R, S)); (B, H, R, hd) in q's dtype. Query rows go in blocks, so that a long
    prefill's scores never hold every row at once."""
    B, R, S = q.shape[0], q.shape[2], kq.shape[2]
    mask = visible_rows(mask, B, R, S, q.device).expand(B, 1, R, S)  # one layout for every call: fewer compiled variants
    blocks = [_attend_block(q[:, :, r0:r0 + QUERY_BLOCK], kq, ks, vq, vs, mask[:, :, r0:r0 + QUERY_BLOCK])
              for r0 in range(0, R, QUERY_BLOCK)]
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # (B, H, R, hd)
    return out.to(q.dtype)


def kv_bytes_formula(n_layers: int, n_heads: int, head_dim: int, tokens: int, batch: int, bytes_per_element: int) -> int:
    """Size of a full-precision KV cache: K and V, for every layer, head, position and sequence."""
    return 2 * n_layers * n_heads * head_dim * tokens * batch * bytes_per_element


WORKSPACE_SPARE = 4  # blocks per row the paged cache's gather workspace keeps spare when it grows


def to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Integer arrays as int64 tensors on the device, in one copy that, on a GPU, the host does not wait for
    (from pinned memory, which torch keeps until the copy is done)."""
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    parts = flat.split([a.size for a in arrays])
    return [part.view(a.shape) for part, a in zip(parts, arrays)]


class PagedCache(KVCache):
    """K and V in a pool of fixed-size blocks shared by the batch, a block table per sequence (as vLLM's
    PagedAttention): a sequence takes a block when it needs one and gives its blocks back when it finishes,
    so memory follows the tokens actually held, not batch x the longest sequence.

    Tokens are stored by their position in their own sequence: a ragged batch's left padding takes no room.
    The pool grows by doubling when no block is free (a reallocation, amortised; a server would size it
    once). Attention gathers each sequence's blocks into one (B, H, S, hd) tensor per layer, in a reused
    workspace: a copy of the K/V attended, every step (kvbench's own kernel does not read blocks in place).
    """

    # what it attends over is gathered in (B, S, H, hd) order, keys H x hd apart: SDPA reads that, kvbench's
    # C++ decode kernel (keys head_dim apart) declines it
    attends_in_head_order = False

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, block_size: int = 16, blocks: int = 1):
        self.n_layers, self.batch, self.block_size = n_layers, batch, block_size
        shape = (max(1, blocks), block_size, n_heads, head_dim)  # (blocks, block_size, H, hd): a block's tokens contiguous
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.free = list(range(shape[0]))  # block ids nobody holds
        self.tables: list[list[int]] = [[] for _ in range(batch)]  # per sequence: its blocks, in position order
        self.finished: set[int] = set()  # rows whose sequence ended: they take no block until reset()
        self.most_blocks = [0] * batch  # per sequence: the most blocks it has held since reset()
        self.gathered: list[torch.Tensor | None] = [None, None]  # K and V gather buffers (see gather)
        self.table: torch.Tensor | None = None  # the tables on the device, (B, blocks); None when they changed
        self._pads_read, self._offsets = None, None  # the pads tensor last read back, and its values (host)

    # --- blocks ---------------------------------------------------------------------------------------------

    def _take_block(self) -> int:
        if not self.free:
            self._grow()
        return self.free.pop(0)

    def _grow(self) -> None:
        old = self.k[0].shape[0]
        self.k = [torch.cat([t, torch.zeros_like(t)]) for t in self.k]  # (2 x blocks, bs, H, hd)
        self.v = [torch.cat([t, torch.zeros_like(t)]) for t in self.v]
        self.free.extend(range(old, 2 * old))

    def release(self, row: int) -> None:
        """The sequence of `row` finished: its blocks go back to the pool for others to take, and it stores
        nothing more until reset() (its row of later passes is computed, and ignored)."""
        self.free.extend(self.tables[row])
        self.tables[row] = []
        self.table = None
        self.finished.add(row)

    @property
    def held_bytes(self) -> int:
        """Bytes of the blocks sequences hold now (the pool may hold more, free)."""
        return sum(map(len, self.tables)) * self.block_bytes

    # --- a forward pass -------------------------------------------------------------------------------------

    # Which slots a pass writes and which blocks each row reads are worked out on the host, where the tables
    # are, and go to the device in one copy that does not wait for it: on a GPU, each torch.tensor(list,
    # device=...) or nonzero() would make the host wait for the GPU's queue to drain, several times a step.

    def begin(self, start_pos, n_new, pads=None):
        if isinstance(start_pos, torch.Tensor):
            raise ValueError("the paged cache has no fixed-shape (compiled) mode")
        super().begin(start_pos, n_new, pads)
        offsets = self._host_offsets()  # (B,)
        for row, pad in enumerate(offsets):
            while row not in self.finished and len(self.tables[row]) * self.block_size < start_pos + n_new - pad:
                self.tables[row].append(self._take_block())
            self.most_blocks[row] = max(self.most_blocks[row], len(self.tables[row]))
        positions = start_pos + np.arange(n_new)[None, :] - offsets[:, None]  # (B, T): < 0 is padding
        live = np.array([row not in self.finished for row in range(self.batch)])  # (B,)
        rows, cols = np.nonzero((positions >= 0) & live[:, None])  # which (row, new token) are stored: (N,) each
        stored = positions[rows, cols]  # (N,) their positions in their own sequences
        table = self._table_array()  # (B, blocks)
        slots = table[rows, stored // self.block_size] * self.block_size + stored % self.block_size  # (N,) flat
        device = self.k[0].device
        self.table, self.write_rows, self.write_cols, self.write_slots = to_device([table, rows, cols, slots], device)
        columns = start_pos + torch.arange(n_new, device=device)  # (T,)
        pads_column = 0 if pads is None else pads.to(device)[:, None]  # (B, 1)
        self.query_pos = (columns[None, :] - pads_column).expand(self.batch, n_new)  # (B, T): < 0 is padding

    def _host_offsets(self) -> np.ndarray:
        """Each row's left padding, read back from the device once per generation (the pads tensor is the
        generation's), not once per pass."""
        if self.pads is None:
            return np.zeros(self.batch, dtype=np.int64)
        if self.pads is not self._pads_read:
            self._pads_read, self._offsets = self.pads, self.pads.cpu().numpy().astype(np.int64)
        return self._offsets

    def _table_array(self) -> np.ndarray:
        width = max(1, max(len(t) for t in self.tables))
        padded = [t + [t[0] if t else 0] * (width - len(t)) for t in self.tables]  # short rows: any block, masked
        return np.array(padded, dtype=np.int64)  # (B, blocks)

    def _table_tensor(self) -> torch.Tensor:
        """The block tables on the device: this pass's, or rebuilt after a release or a crop changed them."""
        if self.table is None:
            self.table, = to_device([self._table_array()], self.k[0].device)
        return self.table

    def update(self, layer, start_pos, k, v):
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            flat = pool.view(-1, *pool.shape[2:])  # (blocks*bs, H, hd)
            rows = new.permute(0, 2, 1, 3)[self.write_rows, self.write_cols]  # (N, H, hd)
            flat.index_copy_(0, self.write_slots, rows)
        return self.gather(layer)

    def gather(self, layer: int, reuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's K/V by position, its blocks laid end to end: (B, H, S, hd), S = blocks x block_size.

        With `reuse`, views of two workspace buffers that every layer and step reuse (the next gather
        overwrites them): copying into memory already touched runs ~6x faster here than into a fresh
        allocation, whose pages the kernel faults in on first write (50 MB per gather at batch 16 x 1000)."""
        table = self._table_tensor()  # (B, blocks)
        flat = table.flatten()  # (B * blocks,): row by row
        out = []
        for i, pool in enumerate((self.k[layer], self.v[layer])):
            into = self._workspace(i, len(flat)) if reuse else None
            blocks = torch.index_select(pool, 0, flat, out=into)  # (B*blocks, bs, H, hd)
            rows = blocks.view(self.batch, -1, *pool.shape[2:])  # (B, S, H, hd)
            out.append(rows.transpose(1, 2))  # (B, H, S, hd)
        return out[0], out[1]

    def _workspace(self, i: int, n_blocks: int) -> torch.Tensor:
        """The first n_blocks blocks of gather buffer i (0: K, 1: V), regrown when too small with room for
        WORKSPACE_SPARE more blocks per row (a reallocation every 64 steps, not every block)."""
        held, pool = self.gathered[i], self.k[0]
        stale = held is not None and held.is_inference() and not torch.is_inference_mode_enabled()  # read-only now
        if held is None or held.shape[0] < n_blocks or stale:
            self.gathered[i] = None  # freed before the new one is taken: never two at once
            size = n_blocks + WORKSPACE_SPARE * self.batch
            held = torch.empty(size, *pool.shape[1:], dtype=pool.dtype, device=pool.device)  # (size, bs, H, hd)
            self.gathered[i] = held
        return held[:n_blocks]

    @property
    def workspace_bytes(self) -> int:
        """The gather buffers: one layer's K and V of the batch's widest table, plus WORKSPACE_SPARE blocks per
        row (not K/V storage: 1 / n_layers of a static cache of the same length, at most)."""
        return sum(t.nbytes for t in self.gathered if t is not None)

    def mask(self, start_pos, n_new):
        S = max(1, max(len(t) for t in self.tables)) * self.block_size
        key_pos = torch.arange(S, device=self.k[0].device)  # (S,) positions within each sequence
        # a padding query (position < 0) sees its row's first token, so that its attention row is not empty
        return (key_pos[None, None, :] <= self.query_pos.clamp_min(0)[:, :, None])[:, None]  # (B, 1, T, S)

    def reset(self):
        for row in range(self.batch):
            self.release(row)
        self.finished.clear()
        self.most_blocks = [0] * self.batch

    def crop(self, length):
        for row, pad in enumerate(self._host_offsets()):
            keep = -(-max(0, length - int(pad)) // self.block_size)  # whole blocks still holding kept tokens
            self.free.extend(self.tables[row][keep:])
            self.tables[row] = self.tables[row][:keep]
        self.table = None

    def contents(self, layer, length):
        k, v = self.gather(layer, reuse=False)  # its own copy: the workspace is overwritten by the next gather
        return torch.arange(length, device=k.device), k[:, :, :length], v[:, :, :length]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)

    @property
    def block_bytes(self) -> int:
        """One block of K and V across every layer."""
        return 2 * self.n_layers * self.k[0][0].nbytes

    def expected_bytes(self, tokens):
        blocks = self.batch * -(-tokens // self.block_size)  # whole blocks per sequence
        return blocks * self.block_bytes

    @property
    def token_bytes(self):
        return self.block_bytes // self.block_size

    def memory_use(self, row_tokens):
        # each sequence's blocks at its largest (a finished one's counted as it released them): whole blocks,
        # so the waste is the unfilled end of each sequence's last block. The pool itself (nbytes) may be
        # larger, holding free blocks for the next sequences.
        return CacheMemory(sum(self.most_blocks) * self.block_bytes, self.token_bytes * sum(row_tokens))
