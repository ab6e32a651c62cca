"""Streamed text generation for `kvbench generate`: one event per token, with its time, then a summary."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from kvbench.bench.timing import synchronize
from kvbench.cache import KVCache
from kvbench.generate import decoder_for, generation_steps
from kvbench.sampling import Sampler, SamplingSettings
from kvbench.tokenizer import Tokenizer


@dataclass
class TokenEvent:
    index: int  # 0 is the token the prefill produced
    token: int
    text: str  # what this token adds to the text ("" while a multi-byte character is incomplete)
    seconds: float  # the prefill for token 0, one decode step after


@dataclass
class StreamSummary:
    prompt_tokens: int
    strategy: str
    cached: bool = True
    times: list[float] = field(default_factory=list)
    cache_bytes: int = 0

    @property
    def prefill_s(self) -> float:
        return self.times[0] if self.times else 0.0

    @property
    def decode_s(self) -> list[float]:
        return self.times[1:]

    def describe(self) -> str:
        if not self.times:
            return f"no token generated ({self.prompt_tokens} prompt tokens)"
        total = sum(self.times)
        line = (f"{len(self.times)} tokens in {total:.3f} s ({len(self.times) / total:.1f} tokens/s); prefill "
                f"{1000 * self.prefill_s:.1f} ms for {self.prompt_tokens} prompt tokens")
        if self.decode_s:
            ms = [1000 * s for s in self.decode_s]
            line += (f"; decode {statistics.median(ms):.2f} ms/token median (min {min(ms):.2f}, max {max(ms):.2f})")
        cache = f"{self.cache_bytes / 2**20:.2f} MiB" if self.cached else "none (naive recomputes)"
        return line + f"; {self.strategy} cache {cache}"


class TextStream:
    """Iterate to generate; `summary` is complete once the iteration ends."""

    def __init__(self, model, prompt: list[int], max_new_tokens: int, strategy: str, cache: KVCache | None,
                 sampling: SamplingSettings, tokenizer: Tokenizer | None, window: int | None = None):
        self.model, self.prompt, self.max_new_tokens = model, prompt, max_new_tokens
        self.strategy, self.cache, self.sampling, self.tokenizer, self.window = strategy, cache, sampling, tokenizer, window
        self.summary = StreamSummary(len(prompt), strategy, cache is not None)

    def __iter__(self) -> Iterator[TokenEvent]:
        device = self.model.device
        ids = torch.tensor([self.prompt], device=device)  # (1, P)
        feed = self.tokenizer.decoder() if self.tokenizer else (lambda token: f"{token} ")
        steps = generation_steps(self.model, ids, self.max_new_tokens, self.cache, Sampler(self.sampling),
                                 decoder_for(self.strategy, device), self.window)
        synchronize(device)
        start = time.perf_counter()
        for step in steps:
            token = int(step.token[0])  # a host copy: synchronises the device, so the time below is real
            self.summary.times.append(time.perf_counter() - start)
            # kept current (outside the timed region), so that a summary after Ctrl-C is right too
            self.summary.cache_bytes = self.cache.nbytes if self.cache is not None else 0
            yield TokenEvent(step.index, token, feed(token), self.summary.times[-1])
            start = time.perf_counter()  # restart after the caller has printed: its time is not the model's
