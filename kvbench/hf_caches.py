"""transformers' own cache classes behind kvbench's cache interface: `hf-dynamic` (DynamicLayer: grows by
concatenation) and `hf-static` (StaticLayer: preallocated, written with index_copy_), registered when
transformers is installed, verified by kv-evaluate and timed by benchmark like any built-in strategy.

The adapter adds no work per step beyond the wrapped class's own update(): kvbench's model hands each
layer's K/V (B, n_kv_heads, T, head_dim) to that layer's transformers object, which stores them at its own
length (transformers' layers count what they hold; kvbench checks that this is where the pass writes) and
returns what to attend. StaticLayer returns its whole buffer; the adapter attends a view of the filled
part (no copy), where transformers' models mask the rest.

Not wrapped: transformers' sliding-window layers hold W - 1 positions and cannot roll back past the window
(kvbench's contents and rollback checks assume W); the quantized layers need optimum-quanto or hqq, not
installed here; Fp8QuantizedLayer freezes one scale per tensor at the first update.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from kvbench.cache import KVCache, columns_mask, kv_bytes_formula
from kvbench.strategies import CacheShape


class TransformersCache(KVCache):
    """One transformers cache layer object per kvbench layer."""

    def __init__(self, shape: CacheShape, make_layer: Callable[[], object], whole_buffer: bool):
        self.shape, self.whole_buffer = shape, whole_buffer
        self.layers = [make_layer() for _ in range(shape.n_layers)]
        self.length = 0  # tokens the layers hold: where they append next

    def begin(self, start_pos, n_new, pads=None):
        super().begin(start_pos, n_new, pads)
        if start_pos != self.length:  # transformers' layers append where they are: they take no position
            raise ValueError(f"transformers' cache holds {self.length} tokens; cannot write at {start_pos}")
        self.end_pos = start_pos + n_new

    def end(self):
        self.length = self.end_pos

    def update(self, layer, start_pos, k, v):
        keys, values = self.layers[layer].update(k, v)
        if self.whole_buffer:
            return keys[:, :, :self.end_pos], values[:, :, :self.end_pos]  # views of the filled slots
        return keys, values

    def mask(self, start_pos, n_new):
        return columns_mask(start_pos, n_new, self.shape.device, self.pads)

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.length = 0

    def crop(self, length):
        if length < self.length:
            for layer in self.layers:
                layer.crop(length - self.length)  # transformers takes the number of tokens to drop, negated
        self.length = min(self.length, length)

    def contents(self, layer, length):
        held = self.layers[layer]
        keys, values = held.keys[:, :, :self.length], held.values[:, :, :self.length]
        return torch.arange(keys.shape[2], device=keys.device), keys, values

    @property
    def nbytes(self):
        return sum(t.nbytes for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))

    def expected_bytes(self, tokens):
        s = self.shape
        return kv_bytes_formula(s.n_layers, s.n_heads, s.head_dim, tokens, s.batch, s.dtype.itemsize)


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def dynamic(shape: CacheShape) -> TransformersCache:
    from transformers.cache_utils import DynamicLayer  # imported on first use: transformers loads slowly

    return TransformersCache(shape, DynamicLayer, whole_buffer=False)


def static(shape: CacheShape) -> TransformersCache:
    from transformers.cache_utils import StaticLayer

    return TransformersCache(shape, lambda: StaticLayer(max_cache_len=shape.max_len), whole_buffer=True)


def register_all() -> None:
    """Register hf-dynamic and hf-static when transformers is installed (without importing it now)."""
    from kvbench.strategies import Strategy, register

    if not available():
        return
    decoder = frozenset({"decoder"})
    register(Strategy("hf-dynamic", "transformers' DynamicLayer per layer: K/V grow by concatenation", dynamic,
                      families=decoder))
    register(Strategy("hf-static", "transformers' StaticLayer per layer: preallocated, written with index_copy_",
                      static, families=decoder))
