"""Attention sinks + a recent window (StreamingLLM, Xiao et al. 2023), as a kvbench cache plugin.

A query at position p attends to the first SINKS positions of the sequence (the "sinks", which soak up
attention a trained model puts somewhere) and to the last W positions (p-W+1 .. p). The cache holds exactly
those: SINKS fixed slots plus a ring of W, so its memory is bounded however long generation runs. Positions
keep their original values (keys are cached already rotated), so the cache is exact against naive
recomputation with the same visibility rule, which the class declares for kv-evaluate to use.

    kvbench kv-evaluate --config tiny --strategies static,examples/sink_cache.py:SinkCache --window 32
    kvbench benchmark --config tiny --strategies naive,sliding,examples/sink_cache.py:SinkCache --window 32

SinkCacheOffByOne is the same cache with its ring one slot short: it forgets the oldest position of the
window one step early. kv-evaluate fails it (exit 1); kvbench's tests show that.

Only kvbench's public API is used: KVCache, CacheShape (see the README's "Python API").
"""

from __future__ import annotations

import torch

from kvbench import CacheShape, KVCache

SINKS = 4  # StreamingLLM keeps the first 4 tokens


class SinkCache(KVCache):
    """Attention sinks + a recent window: the first 4 positions and the last W (--window), bounded memory."""

    name = "sink"
    exact = True
    bounded = True  # memory bounded by --window: it may generate past max_seq_len with rotary positions
    ragged = False  # sinks are each row's first tokens; with left padding those sit in different columns

    @staticmethod
    def visibility(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
        """(T, S): a query sees an earlier (or its own) key among the sinks or the last `window` positions."""
        offset = query_pos[:, None] - key_pos[None, :]  # (T, S)
        return (offset >= 0) & ((key_pos[None, :] < SINKS) | (offset < window))

    def __init__(self, shape: CacheShape):
        self.window = shape.window
        self.ring = self.ring_size(shape.window)
        slots = SINKS + self.ring
        size = (shape.batch, shape.n_heads, slots, shape.head_dim)
        self.k = [torch.zeros(size, dtype=shape.dtype, device=shape.device) for _ in range(shape.n_layers)]
        self.v = [torch.zeros(size, dtype=shape.dtype, device=shape.device) for _ in range(shape.n_layers)]
        self.slot_pos = torch.full((slots,), -1, dtype=torch.long, device=shape.device)  # position per slot

    def ring_size(self, window: int) -> int:
        return window

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Sinks keep slots 0..SINKS-1; later positions take ring slots in turn."""
        return torch.where(positions < SINKS, positions, SINKS + (positions - SINKS) % self.ring)

    def begin(self, start_pos, n_new, pads=None):
        if pads is not None:
            raise ValueError("SinkCache does not serve ragged (left-padded) batches")
        device = self.slot_pos.device
        self.query_pos = torch.arange(start_pos, start_pos + n_new, device=device)  # (T,)
        end = start_pos + n_new
        # what this pass leaves behind: its sinks and its newest `ring` positions (ring slots are then unique)
        kept = (self.query_pos < SINKS) | (self.query_pos >= end - self.ring)
        self.kept_index = kept.nonzero()[:, 0]
        self.kept_pos = self.query_pos[kept]
        self.kept_slots = self.slot_of(self.kept_pos)
        # what the ring held before the pass: every layer attends to it plus the new keys
        self.held = (self.slot_pos >= 0).nonzero()[:, 0]
        self.key_pos = torch.cat([self.slot_pos[self.held], self.query_pos])  # (S,) in the order update returns

    def end(self):
        self.slot_pos[self.kept_slots] = self.kept_pos  # after every layer: each saw the state before the pass

    def update(self, layer, start_pos, k, v):
        if k.shape[2] == 1:  # decode: after the write, everything held is visible to the one new query
            slot = int(self.kept_slots[0])
            self.k[layer][:, :, slot].copy_(k[:, :, 0])
            self.v[layer][:, :, slot].copy_(v[:, :, 0])
            filled = min(start_pos + 1, len(self.slot_pos))  # slots fill in order until the ring wraps
            return self.k[layer][:, :, :filled], self.v[layer][:, :, :filled]
        k_all = torch.cat([self.k[layer][:, :, self.held], k], dim=2)  # (B, H, held + T, hd)
        v_all = torch.cat([self.v[layer][:, :, self.held], v], dim=2)
        self.k[layer].index_copy_(2, self.kept_slots, k[:, :, self.kept_index])
        self.v[layer].index_copy_(2, self.kept_slots, v[:, :, self.kept_index])
        return k_all, v_all

    def mask(self, start_pos, n_new):
        if n_new == 1:
            return None  # see update(): the one query sees every slot it returns
        return self.visibility(self.query_pos, self.key_pos, self.window)

    def reset(self):
        self.slot_pos.fill_(-1)

    def contents(self, layer, length):
        held = (self.slot_pos >= 0).nonzero()[:, 0]
        order = self.slot_pos[held].argsort()
        slots = held[order]
        return self.slot_pos[slots], self.k[layer][:, :, slots], self.v[layer][:, :, slots]

    @property
    def nbytes(self):
        return sum(t.nbytes for t in self.k + self.v)

    def expected_bytes(self, tokens):
        B, H, slots, hd = self.k[0].shape
        return 2 * len(self.k) * B * H * min(tokens, slots) * hd * self.k[0].element_size()


class SinkCacheOffByOne(SinkCache):
    """The sink cache with a deliberate bug: its ring is one slot short of the window."""

    name = "sink-off-by-one"

    def ring_size(self, window: int) -> int:
        return window - 1
