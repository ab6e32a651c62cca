"""Model families: each says which config it reads, builds its torch model and runs its NumPy reference.

The one place that maps a config's `family` to code. A new family (a hybrid, a Mamba-style layer) is one
entry here, its model module, its reference function and, if it reads checkpoints, a layout in
checkpoints.py; generation, verification, the benchmark and the CLI ask the model itself for the rest
(device, dtype, the bytes and matrices of a decode step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import torch

from kvbench.config import SCHEMAS, AnyConfig, LoadedConfig, TransformersConfig
from kvbench.errors import KVBenchError
from kvbench.model import Decoder, LanguageModel
from kvbench.reference import reference_logits, reference_seq2seq_logits
from kvbench.seq2seq import Seq2Seq
from kvbench.strategies import FAMILY_WORDS, SELF_ONLY, TRANSFORMERS, get

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Family:
    name: str
    config: type  # its validated config schema
    build: Callable[[AnyConfig], LanguageModel]  # an uninitialised torch model
    # float64 logits (B, T, V) from weights, the config, target ids (B, T) and source ids (B, S) or None
    reference: Callable[[Weights, AnyConfig, np.ndarray, np.ndarray | None], np.ndarray]
    # a ready model from the loaded config, on a device in a dtype, when the family loads its own weights
    # (transformers' models: from_pretrained); None: build, then kvbench's weight files or random weights
    load: Callable[[LoadedConfig, torch.device | str, torch.dtype], object] | None = None
    reads_source: bool = False  # every forward also takes source ids (B, S): an encoder-decoder
    # what kv-evaluate and benchmark run when no strategy is named; None: the command's own default
    check_strategies: str | None = None
    bench_strategies: str | None = None
    # one line per strategy for kv-evaluate, where what a strategy caches is easy to mistake; None: nothing
    explain: Callable[[str], str] | None = None
    profiled: bool = False  # kvbench profile can break its decode step down by operation (kvbench's decoder)
    own_window: bool = False  # the model attends with its own window (transformers' config.json): no --window


def hf_engine():
    from kvbench import hf_engine  # imported on first use: it builds on strategies and imports transformers

    return hf_engine


def _no_reference(weights, config, ids, src):
    raise KVBenchError("evaluate's NumPy reference covers kvbench's own models; under --engine transformers, "
                       "kv-evaluate checks transformers' caches against transformers' uncached forward")


def seq2seq_way(name: str) -> str:
    """What an encoder-decoder strategy caches: its two caches are easy to confuse."""
    strategy = get(name, "encoder-decoder")
    if not strategy.cached:
        return "nothing cached: the encoder, cross- and self-attention K/V rerun every step"
    kind = name.removesuffix(SELF_ONLY)
    if not strategy.keeps_cross:
        return f"self-attention K/V cached ({kind}); encoder once, cross-attention K/V recomputed every step"
    return f"self-attention K/V cached ({kind}); encoder and cross-attention K/V computed once per generation"


ENGINE_STRATEGIES = "hf-dynamic,hf-static"  # transformers' own caches

FAMILIES = {
    "decoder": Family("decoder", SCHEMAS["decoder"], Decoder, lambda w, c, ids, src: reference_logits(w, c, ids),
                      profiled=True),
    "encoder-decoder": Family(
        "encoder-decoder", SCHEMAS["encoder-decoder"], Seq2Seq,
        lambda w, c, ids, src: reference_seq2seq_logits(w, c, src, ids), reads_source=True,
        check_strategies="naive,static,static+self-only,dynamic,dynamic+self-only",
        bench_strategies="naive,static+self-only,static",  # the three ways: nothing, self-attention, both cached
        explain=seq2seq_way),
    # transformers' own modeling code (--engine transformers): its uncached forward is the reference there
    TRANSFORMERS: Family(TRANSFORMERS, TransformersConfig, lambda c: hf_engine().skeleton(c), _no_reference,
                         lambda loaded, device, dtype: hf_engine().build(loaded, device, dtype),
                         check_strategies=ENGINE_STRATEGIES, bench_strategies=f"naive,{ENGINE_STRATEGIES}",
                         own_window=True),
}


def family_of(config: AnyConfig) -> Family:
    return FAMILIES[config.family]


def reads_source(config: AnyConfig) -> bool:
    """Whether every generation needs source ids beside the prompt (an encoder-decoder)."""
    return family_of(config).reads_source


def default_strategies(use: str) -> str:
    """The families' own defaults for --help: use is "check" (kv-evaluate) or "bench"."""
    return "; ".join(f"{FAMILY_WORDS[f.name]}: {getattr(f, use + '_strategies')}" for f in FAMILIES.values()
                     if getattr(f, use + "_strategies"))
