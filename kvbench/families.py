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

from kvbench.config import SCHEMAS, AnyConfig
from kvbench.model import Decoder, LanguageModel
from kvbench.reference import reference_logits, reference_seq2seq_logits
from kvbench.seq2seq import Seq2Seq

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Family:
    name: str
    config: type  # its validated config schema
    build: Callable[[AnyConfig], LanguageModel]  # an uninitialised torch model
    # float64 logits (B, T, V) from weights, the config, target ids (B, T) and source ids (B, S) or None
    reference: Callable[[Weights, AnyConfig, np.ndarray, np.ndarray | None], np.ndarray]


FAMILIES = {
    "decoder": Family("decoder", SCHEMAS["decoder"], Decoder, lambda w, c, ids, src: reference_logits(w, c, ids)),
    "encoder-decoder": Family("encoder-decoder", SCHEMAS["encoder-decoder"], Seq2Seq,
                              lambda w, c, ids, src: reference_seq2seq_logits(w, c, src, ids)),
}


def family_of(config: AnyConfig) -> Family:
    return FAMILIES[config.family]
