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

On transformers' own models (`--engine transformers`, hf_engine.py) the same names, and hf-sliding,
hf-offloaded and hf-quantized, are transformers' whole Cache classes, built from the model's config as
generate() builds them, and updated by transformers' model itself.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from typing import Callable

import torch

from kvbench.cache import KVCache, columns_mask, kv_bytes_formula
from kvbench.errors import KVBenchError
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

    @property
    def token_bytes(self):
        return self.expected_bytes(1) // self.shape.batch


# The first transformers whose caches behave as kvbench checks them: DynamicLayer.reset drops what it held (5.18;
# before, it zeroed the keys but kept their length, so a reused cache attended zeros) and StaticLayer can crop,
# which a rollback needs (5.24). Older versions fail kv-evaluate for transformers' reasons, not the cache's.
MIN_TRANSFORMERS = (5, 24)


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def installed_version() -> str:
    return importlib.metadata.version("transformers")


def recent_enough(version: str | None = None) -> bool:
    """Whether transformers (the installed one, or `version`) is at least MIN_TRANSFORMERS."""
    numbers = re.match(r"(\d+)\.(\d+)", version or installed_version())
    return numbers is not None and tuple(map(int, numbers.groups())) >= MIN_TRANSFORMERS


def _needs_recent_transformers(factory: Callable[[CacheShape], KVCache]) -> Callable[[CacheShape], KVCache]:
    """The factory, refusing an older transformers with what to install rather than failing its checks."""
    @functools.wraps(factory)
    def checked(shape: CacheShape) -> KVCache:
        if not recent_enough():
            wanted = ".".join(map(str, MIN_TRANSFORMERS))
            raise KVBenchError(f"the hf-* strategies need transformers >= {wanted}, whose caches reset and roll back "
                               f"as kv-evaluate checks them (installed: {installed_version()}): "
                               f"pip install -U 'transformers>={wanted}'")
        return factory(shape)
    return checked


@_needs_recent_transformers
def dynamic(shape: CacheShape) -> KVCache:
    from transformers.cache_utils import DynamicCache, DynamicLayer  # imported on first use: it loads slowly

    if shape.transformers_config is not None:  # transformers' model: every position kept, in every layer
        return _engine(shape, DynamicCache)
    return TransformersCache(shape, DynamicLayer, whole_buffer=False)


@_needs_recent_transformers
def static(shape: CacheShape) -> KVCache:
    from transformers.cache_utils import StaticCache, StaticLayer

    if shape.transformers_config is not None:  # as generate(cache_implementation="static") builds it
        return _engine(shape, lambda: StaticCache(config=shape.transformers_config, max_cache_len=shape.max_len))
    return TransformersCache(shape, lambda: StaticLayer(max_cache_len=shape.max_len), whole_buffer=True)


@_needs_recent_transformers
def sliding(shape: CacheShape) -> KVCache:
    """DynamicCache built from the model's config: its sliding layers keep only their window (W - 1 past
    positions), as generate() builds the cache of a model with a window."""
    from transformers.cache_utils import DynamicCache

    config = shape.transformers_config
    if not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers):
        raise KVBenchError(f"hf-sliding: this {config.model_type} model has no sliding window (config.json "
                           "sliding_window / layer_types); use hf-dynamic or hf-static")

    def make():
        cache = DynamicCache(config=config)
        if shape.rollback:  # sliding layers keep what a rollback may need until it is cropped (transformers' way)
            cache.activate_past_recording()
        return cache

    return _engine(shape, make)


@_needs_recent_transformers
def offloaded(shape: CacheShape) -> KVCache:
    """DynamicCache(offloading=True): each layer's K/V goes to CPU memory after its forward and is prefetched
    back to the GPU, on CUDA streams, before the next."""
    from transformers.cache_utils import DynamicCache

    if shape.device.type == "cpu":
        raise KVBenchError("hf-offloaded moves each layer's K/V from GPU to CPU memory between forwards (on CUDA "
                           "streams); on --device cpu the cache is in CPU memory already: run it with --device cuda")
    return _engine(shape, lambda: DynamicCache(offloading=True))


@_needs_recent_transformers
def quantized(shape: CacheShape) -> KVCache:
    """QuantizedCache with transformers' defaults (4 bits, a full-precision residual of the last 128
    tokens), on the first backend installed (transformers' own checks say which)."""
    from transformers.cache_utils import QuantizedCache
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    backend = "quanto" if is_optimum_quanto_available() else "hqq" if is_hqq_available() else None
    if backend is None:
        raise KVBenchError("hf-quantized needs a quantization backend for transformers' QuantizedCache: "
                           "pip install optimum-quanto (or hqq)")
    return _engine(shape, lambda: QuantizedCache(backend, shape.transformers_config))


def _engine(shape: CacheShape, make: Callable[[], object]) -> KVCache:
    from kvbench.hf_engine import EngineCache

    return EngineCache(shape, make)


def register_all() -> None:
    """Register the hf-* strategies when transformers is installed (without importing it now)."""
    from kvbench.strategies import TRANSFORMERS, Strategy, register

    if not available():
        return
    both, engine = frozenset({"decoder", TRANSFORMERS}), frozenset({TRANSFORMERS})
    register(Strategy("hf-dynamic", "transformers' DynamicLayer per layer (on transformers' models: "
                      "DynamicCache): K/V grow by concatenation", dynamic, families=both))
    register(Strategy("hf-static", "transformers' StaticLayer per layer (on transformers' models: StaticCache "
                      "from the model's config): preallocated, written with index_copy_", static, families=both))
    register(Strategy("hf-sliding", "transformers' DynamicCache from the model's config: sliding layers keep "
                      "their window only (models with a sliding window)", sliding, families=engine))
    register(Strategy("hf-offloaded", "transformers' DynamicCache(offloading=True): K/V in CPU memory between "
                      "forwards (CUDA only)", offloaded, families=engine))
    register(Strategy("hf-quantized", "transformers' QuantizedCache (4 bits, quanto or hqq backend; the last 128 "
                      "tokens in full precision)", quantized, exact=False, families=engine))
