"""Streamed text generation for `kvbench generate`: one event per token, with its time, then a summary."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from kvbench.bench.timing import synchronize
from kvbench.cache import KVCache
from kvbench.generate import decoder_for, generation_steps, left_pad
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
    times: list[float] = field(default_factory=list)  # per step: the prefill, then one decode step each
    cache_bytes: int = 0
    rows: int = 1  # sequences generated together (a batch of --prompt-ids rows)

    @property
    def prefill_s(self) -> float:
        return self.times[0] if self.times else 0.0

    @property
    def decode_s(self) -> list[float]:
        return self.times[1:]

    def describe(self) -> str:
        if not self.times:
            return f"no token generated ({self.prompt_tokens} prompt tokens)"
        total, tokens = sum(self.times), len(self.times) * self.rows
        batch = f" ({len(self.times)} steps x {self.rows} rows)" if self.rows > 1 else ""
        line = (f"{tokens} tokens{batch} in {total:.3f} s ({tokens / total:.1f} tokens/s); prefill "
                f"{1000 * self.prefill_s:.1f} ms for {self.prompt_tokens} prompt tokens")
        if self.decode_s:
            ms = [1000 * s for s in self.decode_s]
            per = "step" if self.rows > 1 else "token"
            line += (f"; decode {statistics.median(ms):.2f} ms/{per} median (min {min(ms):.2f}, max {max(ms):.2f})")
        cache = f"{self.cache_bytes / 2**20:.2f} MiB" if self.cached else "none (naive recomputes)"
        return line + f"; {self.strategy} cache {cache}"


class TextStream:
    """Iterate to generate; `summary` is complete once the iteration ends."""

    def __init__(self, model, prompt: list[int], max_new_tokens: int, strategy: str, cache: KVCache | None,
                 sampling: SamplingSettings, tokenizer: Tokenizer | None):
        self.model, self.prompt, self.max_new_tokens = model, prompt, max_new_tokens
        self.strategy, self.cache, self.sampling, self.tokenizer = strategy, cache, sampling, tokenizer
        self.summary = StreamSummary(len(prompt), strategy, cache is not None)

    def __iter__(self) -> Iterator[TokenEvent]:
        device = self.model.device
        ids = torch.tensor([self.prompt], device=device)  # (1, P)
        feed = self.tokenizer.decoder() if self.tokenizer else (lambda token: f"{token} ")
        steps = generation_steps(self.model, ids, self.max_new_tokens, self.cache, Sampler(self.sampling),
                                 decoder_for(self.strategy, device))
        synchronize(device)
        start = time.perf_counter()
        for step in steps:
            token = int(step.token[0])  # a host copy: synchronises the device, so the time below is real
            self.summary.times.append(time.perf_counter() - start)
            # kept current (outside the timed region), so that a summary after Ctrl-C is right too
            self.summary.cache_bytes = self.cache.nbytes if self.cache is not None else 0
            yield TokenEvent(step.index, token, feed(token), self.summary.times[-1])
            start = time.perf_counter()  # restart after the caller has printed: its time is not the model's


@dataclass
class RowsResult:
    """A ragged batch's generation: each row's new tokens, and the batch's summary (times are batch steps)."""

    new_tokens: list[list[int]]
    summary: StreamSummary
    stopped: bool = False  # Ctrl-C ended it early


def generate_rows(model, prompts: list[list[int]], max_new_tokens: int, strategy: str, cache: KVCache | None,
                  sampling: SamplingSettings) -> RowsResult:
    """Generate after several prompts at once, as one left-padded batch (each row as if it were alone: see
    generate.left_pad), timing each batch step; stops early on Ctrl-C with what was generated so far."""
    device = model.device
    ids, pads = left_pad([torch.tensor(p, device=device) for p in prompts])  # (B, P_max), (B,) or None
    summary = StreamSummary(sum(len(p) for p in prompts), strategy, cache is not None, rows=len(prompts))
    steps = generation_steps(model, ids, max_new_tokens, cache, Sampler(sampling), decoder_for(strategy, device),
                             pads=pads)
    tokens: list[torch.Tensor] = []
    stopped = False
    synchronize(device)
    start = time.perf_counter()
    try:
        for step in steps:
            tokens.append(step.token.cpu())  # (B,): a host copy synchronises the device, so the time is real
            summary.times.append(time.perf_counter() - start)
            summary.cache_bytes = cache.nbytes if cache is not None else 0
            start = time.perf_counter()
    except KeyboardInterrupt:
        stopped = True  # what was generated stands; the caller prints it and says it stopped
    rows = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in prompts]  # (B, N)
    return RowsResult(rows, summary, stopped)
