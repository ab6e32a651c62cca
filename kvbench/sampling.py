"""Token choice: greedy, or sampling with temperature, top-k and top-p, reproducible from a seed.

Sampling draws one uniform number u per sequence per step from a CPU generator seeded once, and picks the
token where the cumulative distribution first exceeds u (inverse-CDF sampling). The choice is then a fixed
function of (logits, u): two runs with the same seed draw the same u's, so a cached run and a naive run
choose the same tokens whenever their logits agree, and kv-evaluate can recompute naive's choice from the
recorded draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.config import check_seed
from kvbench.errors import KVBenchError


# Below this, logits / temperature overflow float32 for ordinary logits (10 / 1e-38 is inf) and sampling turns
# into NaN; long before that it is greedy in all but name (it picks the top token unless the top two are
# within 1e-5 of each other). Use 0 for greedy.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 means greedy (argmax); top_k and top_p then have no effect
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set of most likely tokens whose probability reaches p
    seed: int = 0

    def __post_init__(self):
        # math.isfinite first: nan fails no comparison, so `nan < 0` alone would let it through
        if not (math.isfinite(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE)):
            raise KVBenchError(f"--temperature must be 0 (greedy) or a finite number from {MIN_TEMPERATURE:g} "
                               f"(got {self.temperature:g})")
        if self.top_k is not None and self.top_k < 1:
            raise KVBenchError(f"--top-k must be a positive integer (got {self.top_k})")
        if self.top_p is not None and not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise KVBenchError(f"--top-p must lie in (0, 1] (got {self.top_p:g})")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            # greedy ignores both: a check run with them would look like a check of sampling and not be one
            given = "--top-k" if self.top_k is not None else "--top-p"
            raise KVBenchError(f"{given} filters sampling, but --temperature is 0 (greedy); give a temperature "
                               f"such as --temperature 1 to sample, or drop {given}")
        check_seed("--seed", self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        parts = [f"temperature {self.temperature:g}"]
        parts += [f"top-k {self.top_k}"] if self.top_k else []
        parts += [f"top-p {self.top_p:g}"] if self.top_p else []
        return ", ".join(parts) + f", seed {self.seed}"


def greedy(logits: torch.Tensor) -> torch.Tensor:
    # float32 first: argmax has no vectorised bfloat16 path on CPU (0.2 ms per step at 50257 entries).
    # The conversion is exact, so the chosen token (first index among equal maxima) is unchanged.
    return logits.float().argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, s: SamplingSettings, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sampling distribution (..., V): temperature, then top-k, then top-p (transformers' order)."""
    x = logits.to(dtype) / s.temperature
    if s.top_k is not None and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]  # (..., 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if s.top_p is not None and s.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = (mass_before >= s.top_p).scatter(-1, order, mass_before >= s.top_p)  # back to vocab order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF choice: the first token whose cumulative probability exceeds u (..., ) in [0, 1)."""
    cdf = torch.cumsum(probs, dim=-1)
    target = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


class Sampler:
    """A Chooser (logits (B, V) -> tokens (B,)) that records its draws for verification."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)  # on CPU: the same draws on any device
        self.draws: list[torch.Tensor] = []  # (B,) per step

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.settings.greedy:
            return greedy(logits)
        u = torch.rand(logits.shape[0], generator=self.generator)
        self.draws.append(u)
        return pick(filtered_probs(logits, self.settings), u.to(logits.device))
