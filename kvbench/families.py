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
from kvbench.strategies import TRANSFORMERS

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


def hf_engine():
    from kvbench import hf_engine  # imported on first use: it builds on strategies and imports transformers

    return hf_engine


def _no_reference(weights, config, ids, src):
    raise KVBenchError("evaluate's NumPy reference covers kvbench's own models; under --engine transformers, "
                       "kv-evaluate checks transformers' caches against transformers' uncached forward")


FAMILIES = {
    "decoder": Family("decoder", SCHEMAS["decoder"], Decoder, lambda w, c, ids, src: reference_logits(w, c, ids)),
    "encoder-decoder": Family("encoder-decoder", SCHEMAS["encoder-decoder"], Seq2Seq,
                              lambda w, c, ids, src: reference_seq2seq_logits(w, c, src, ids)),
    # transformers' own modeling code (--engine transformers): its uncached forward is the reference there
    TRANSFORMERS: Family(TRANSFORMERS, TransformersConfig, lambda c: hf_engine().skeleton(c), _no_reference,
                         lambda loaded, device, dtype: hf_engine().build(loaded, device, dtype)),
}


def family_of(config: AnyConfig) -> Family:
    return FAMILIES[config.family]
