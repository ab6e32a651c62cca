"""Cache strategies: each one object, registered under its name; the only place that knows what a name means.

A strategy says which cache it allocates (or none: naive recomputation), how kv-evaluate judges it (exactly,
within tolerance, or by the KL / top-1 thresholds of an approximate cache), whether its attention is windowed
(then naive's reference is banded the same way, and its memory is bounded), whether its decode step is
compiled, and, for an encoder-decoder, whether it keeps the cross-attention K/V for the whole generation.
Everything else (generation, verification, the benchmark, plots, the CLI) asks the strategy, never its name.

Built-in strategies register here exactly as a plugin registers its own: `register(Strategy(...))`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from kvbench.cache import DynamicCache, KVCache, PagedCache, QuantizedCache, SlidingWindowCache, StaticCache
from kvbench.errors import KVBenchError
from kvbench.precision import QUANTIZED_THRESHOLDS, Thresholds, dtype_name

# Who may attend to whom, for a strategy whose attention is deliberately not full causal attention (attention
# sinks + a recent window, say): (query positions (T,), key positions (S,), window) -> bool (T, S), True where
# the query sees the key. kv-evaluate builds naive's baseline with the same rule.
Visibility = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

DEFAULT_WINDOW = 256
DEFAULT_BLOCK_SIZE = 16  # tokens per block of the paged cache (vLLM's default)
FAMILIES = frozenset({"decoder", "encoder-decoder"})  # kvbench's own models (a plugin's default)
TRANSFORMERS = "transformers"  # the family of a checkpoint run by transformers' own code (--engine transformers)
FAMILY_WORDS = {"decoder": "kvbench's decoder models", "encoder-decoder": "kvbench's encoder-decoder models",
                TRANSFORMERS: "transformers' models (--engine transformers)"}


@dataclass(frozen=True)
class CacheShape:
    """What a cache allocates for one generation: the model's layers and heads, the run's batch and length."""

    n_layers: int
    batch: int
    n_heads: int  # K/V heads
    head_dim: int
    max_len: int  # positions a generation writes
    dtype: torch.dtype
    device: torch.device
    window: int = DEFAULT_WINDOW  # read by windowed strategies only
    rollback: int = 0  # tokens a generation may roll back at once (a bounded cache keeps that many more)
    # transformers' own config when transformers' model runs (--engine transformers): its Cache classes are
    # built from it (which layers slide, and by how much); None on kvbench's models
    transformers_config: object | None = None

    @classmethod
    def of(cls, config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
           window: int | None = None, rollback: int = 0) -> CacheShape:
        """The cache shape of a model config: its n_kv_heads K/V heads (grouped-query attention stores only those)."""
        return cls(config.n_layers, batch, config.n_kv_heads, config.head_dim, max_len, dtype, device,
                   window_of(config, window), rollback, getattr(config, "hf_config", None))


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str  # one line: what it is
    cache: Callable[[CacheShape], KVCache] | None = None  # None: no cache, every step recomputes (naive)
    exact: bool = True  # kv-evaluate holds it to the logit tolerance; otherwise to precision's thresholds
    windowed: bool = False  # attends the last `window` positions: naive's reference is banded alike
    compiled: bool = False  # decode step compiled at fixed shapes (torch.compile; a CUDA graph on CUDA)
    keeps_cross: bool = True  # encoder-decoder: cross-attention K/V projected once per generation
    families: frozenset[str] = FAMILIES  # model families it applies to
    visibility: Visibility | None = None  # attention pattern other than causal: naive's baseline follows it
    thresholds: dict[str, Thresholds] | None = None  # approximate, by dtype name: its own, within kvbench's
    ragged: bool = True  # serves left-padded batches of different prompt lengths (kv-evaluate checks one)

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def new_cache(self, shape: CacheShape) -> KVCache | None:
        return None if self.cache is None else self.cache(shape)

    def baseline(self, window: int) -> int | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """What naive's reference attends like for this strategy: None (full causal), a band of `window`
        positions (windowed), or the strategy's own visibility rule at that window."""
        if self.visibility is not None:
            return functools.partial(self.visibility, window=window)
        return window if self.windowed else None

    def thresholds_for(self, dtype: torch.dtype) -> Thresholds:
        """What an approximate strategy is judged by in `dtype`: its own thresholds, never looser than kvbench's."""
        limit = QUANTIZED_THRESHOLDS[dtype_name(dtype)]
        own = (self.thresholds or {}).get(dtype_name(dtype))
        return limit if own is None else tightest(own, limit)


def tightest(a: Thresholds, b: Thresholds) -> Thresholds:
    """The stricter of two thresholds, field by field (a plugin's own are checked against kvbench's per dtype)."""
    return Thresholds(min(a.max_mean_kl, b.max_mean_kl), max(a.min_top1, b.min_top1),
                      min(a.max_step_kl, b.max_step_kl), min(a.max_streak, b.max_streak))


REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Make a strategy available under its name to every command. A name is registered once."""
    if strategy.name in REGISTRY:
        raise KVBenchError(f"strategy {strategy.name!r} is already registered")
    REGISTRY[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def names(family: str | None = None) -> tuple[str, ...]:
    """Registered strategy names, in registration order, for one model family or all."""
    return tuple(n for n, s in REGISTRY.items() if family is None or family in s.families)


def get(name: str, family: str | None = None, option: str = "--strategies") -> Strategy:
    """The strategy of a name, for a family; an unknown name is a one-line error naming `option`."""
    words = lambda f: FAMILY_WORDS.get(f, f"{f} models")  # noqa: E731
    choices = f"choose from {', '.join(names(family))}"
    if name in REGISTRY and family is not None and family not in REGISTRY[name].families:
        only = " and ".join(words(f) for f in sorted(REGISTRY[name].families))
        raise KVBenchError(f"{option}: strategy {name!r} runs on {only}, not on {words(family)}; {choices}")
    if name not in REGISTRY:
        where = f" for {words(family)}" if family else ""
        plugin = " (a plugin is named FILE.py:ClassName or module.path:ClassName)" if name.endswith(".py") else ""
        raise KVBenchError(f"{option}: unknown strategy {name!r}{where}{plugin}; {choices}")
    return REGISTRY[name]


def resolve(strategy: Strategy | str) -> Strategy:
    """Library entry points take a Strategy or its registered name."""
    return strategy if isinstance(strategy, Strategy) else get(strategy)


def _full_length(cls) -> Callable[[CacheShape], KVCache]:
    return lambda s: cls(s.n_layers, s.batch, s.n_heads, s.max_len, s.head_dim, s.dtype, s.device)


NAIVE = register(Strategy(
    "naive", "no cache: every step re-runs the whole sequence through the same model code and kernels",
    families=FAMILIES | {TRANSFORMERS}))
STATIC = register(Strategy(
    "static", "K and V buffers preallocated for the whole generation, written in place", _full_length(StaticCache)))
DYNAMIC = register(Strategy(
    "dynamic", "K and V grow by concatenation each step, as transformers' default cache does",
    lambda s: DynamicCache(s.n_layers, s.device)))
SLIDING = register(Strategy(
    "sliding", "a ring buffer of the last W positions (--window); attention windowed alike",
    lambda s: SlidingWindowCache(s.n_layers, s.batch, s.n_heads, s.window, s.head_dim, s.dtype, s.device, s.rollback),
    windowed=True))
QUANTIZED = register(Strategy(
    "quantized", "K and V stored as int8 with a float32 scale per token and head", _full_length(QuantizedCache),
    exact=False))
PAGED = register(Strategy(
    "paged", "K and V in 16-token blocks from a pool shared by the batch, taken as sequences grow (vLLM's layout)",
    lambda s: PagedCache(s.n_layers, s.batch, s.n_heads, s.head_dim, s.dtype, s.device, DEFAULT_BLOCK_SIZE,
                         blocks=s.batch)))  # one block per sequence to start; the pool grows as they do
COMPILED = register(dataclasses.replace(
    STATIC, name="static+compile", summary="the static cache with its decode step compiled at fixed shapes",
    compiled=True, families=frozenset({"decoder"})))
SELF_ONLY = "+self-only"
for _base in (STATIC, DYNAMIC, SLIDING, QUANTIZED):  # the encoder-decoder's self-attention-only variants
    register(dataclasses.replace(
        _base, name=_base.name + SELF_ONLY, keeps_cross=False, families=frozenset({"encoder-decoder"}),
        summary=f"{_base.name} for self-attention; cross-attention K/V projected again every step"))


def window_of(config, window: int | None) -> int:
    """The sliding window: the one asked for, else the config's sliding_window, else DEFAULT_WINDOW."""
    return window or config.sliding_window or DEFAULT_WINDOW


# transformers' own cache classes, as strategies beside these (when transformers is installed; see hf_caches.py)
from kvbench import hf_caches  # noqa: E402  (it builds on this module's Strategy and register)

hf_caches.register_all()
