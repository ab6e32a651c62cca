"""The benchmark sweep: cached against naive generation over lengths, warm-up excluded, strategies interleaved.

What is timed: the prefill (which yields the first new token) and each decode step, separately, with the
device synchronised (CUDA events). Outside the timed region: building the model, loading weights, allocating
the cache, the warm-up generations, and writing results.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np
import torch

from kvbench.bench import floor
from kvbench.bench.results import ResultsDir, RunKey
from kvbench.bench.timing import PeakMemory, StepClock, median_seconds
from kvbench.cache import KVCache
from kvbench.config import LoadedConfig
from kvbench.generate import Decode, cache_tokens, decode_one, decoder_for, generation_steps, naive_step, new_cache
from kvbench.model import Decoder
from kvbench.strategies import get
from kvbench.verify import random_prompt

WARMUP_TOKEN_CAP = 100  # warm-up generations stop here: same kernels, without doubling the naive sweep


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs; recorded in meta.json so that --resume continues with exactly these."""

    lengths: list[int]
    strategies: list[str]
    repeats: int = 3
    warmup: int = 1
    prompt_len: int = 16
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    window: int | None = None  # the sliding strategy's window
    src_len: int | None = None  # encoder-decoder: source tokens per sequence

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Run:
    strategy: str
    new_tokens: int  # the sweep point's length
    repeat: int  # -1 for a warm-up
    estimate_s: float
    warmup_tokens: int = 0  # a warm-up generates this many tokens, into the point's own cache

    @property
    def tokens(self) -> int:
        return self.warmup_tokens if self.is_warmup else self.new_tokens

    @property
    def key(self) -> RunKey:
        return (self.strategy, self.new_tokens, self.repeat)

    @property
    def is_warmup(self) -> bool:
        return self.repeat < 0


class Reporter(Protocol):
    """What the sweep tells the CLI; it never prints itself."""

    def compiled(self, seconds: float) -> None: ...
    def planned(self, runs: list[Run]) -> None: ...
    def starting(self, run: Run) -> None: ...
    def finished(self, run: Run, row: dict | None) -> None: ...


# --- cost estimate ----------------------------------------------------------------------------------------------

@dataclass
class CostModel:
    """Seconds per step, measured once before the sweep: naive as a quadratic in sequence length."""

    naive_poly: np.ndarray  # coefficients of seconds per naive step against sequence length
    decode_s: float  # one cached decode step

    def naive_step_s(self, seq_len: int) -> float:
        return max(float(np.polyval(self.naive_poly, seq_len)), 0.0)

    def run_s(self, strategy: str, prompt_len: int, new_tokens: int) -> float:
        if not get(strategy).cached:
            return sum(self.naive_step_s(prompt_len + i) for i in range(new_tokens))
        return self.naive_step_s(prompt_len) + (new_tokens - 1) * self.decode_s


@torch.inference_mode()
def calibrate(model: Decoder, prompt: torch.Tensor, longest: int, device: torch.device) -> CostModel:
    """Time a few naive forwards and cached decode steps to predict the sweep's duration."""
    n_prompt = prompt.shape[1]
    seq_lens = sorted({n_prompt, n_prompt + (longest - 1) // 2, n_prompt + longest - 1})
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    naive_times = []
    for seq_len in seq_lens:
        ids = torch.randint(0, vocab, (prompt.shape[0], seq_len + 3), generator=gen).to(device)
        naive_step(model, ids[:, :seq_len])  # the very first call pays one-off costs
        # then three new lengths, as the naive loop sees: some kernels (oneDNN's bfloat16) are built per shape
        lengths = iter(range(seq_len + 1, seq_len + 4))
        naive_times.append(median_seconds(lambda: naive_step(model, ids[:, :next(lengths)]), device, repeats=3))
    poly = np.polyfit(seq_lens, naive_times, deg=min(2, len(seq_lens) - 1))
    cache = new_cache(model, "static", prompt.shape[0], n_prompt + 8)
    steps = generation_steps(model, prompt, 8, cache)
    next(steps)
    next(steps)  # first decode step: one-off costs
    decode_s = median_seconds(lambda: next(steps), device, repeats=5)
    return CostModel(poly, decode_s)


# --- plan -------------------------------------------------------------------------------------------------------

def timed_runs(settings: SweepSettings) -> set[RunKey]:
    """Every timed run the settings ask for."""
    return {(s, n, r) for n in settings.lengths for s in settings.strategies for r in range(settings.repeats)}


def plan_runs(settings: SweepSettings, costs: CostModel, done: set[RunKey]) -> list[Run]:
    """Every run still to do, in order: per length, warm-ups, then repeats with strategies interleaved."""
    runs: list[Run] = []
    for length in settings.lengths:
        timed = [Run(s, length, r, costs.run_s(s, settings.prompt_len, length))
                 for r in range(settings.repeats) for s in settings.strategies if (s, length, r) not in done]
        if not timed:
            continue
        warm = min(length, WARMUP_TOKEN_CAP)
        runs += [Run(s, length, -1, costs.run_s(s, settings.prompt_len, warm), warmup_tokens=warm)
                 for s in settings.strategies for _ in range(settings.warmup)]
        runs += timed
    return runs


# --- one timed run ----------------------------------------------------------------------------------------------

@dataclass
class Timing:
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.decode_s)


def time_generation(model: Decoder, prompt: torch.Tensor, new_tokens: int, cache: KVCache | None,
                    device: torch.device, decode: Decode = decode_one) -> Timing:
    """Generate new_tokens, marking the clock before the prefill and after every step."""
    clock = StepClock(device)
    clock.mark()
    for _ in generation_steps(model, prompt, new_tokens, cache, decode=decode):
        clock.mark()
    durations = clock.durations()
    return Timing(durations[0], durations[1:])


class Sweep:
    """Runs the plan, one row per timed run into the results directory."""

    def __init__(self, loaded: LoadedConfig, model: Decoder, settings: SweepSettings, results: ResultsDir,
                 device: torch.device, device_name: str, bandwidth_gbs: float):
        self.loaded, self.model, self.settings, self.bandwidth_gbs = loaded, model, settings, bandwidth_gbs
        self.results, self.device, self.device_name = results, device, device_name
        self.prompt = random_prompt(loaded.model, settings.batch_size, settings.prompt_len, settings.seed).to(device)
        self.memory = PeakMemory(device)
        self.caches: dict[tuple[str, int], KVCache | None] = {}

    def cache_for(self, strategy: str, new_tokens: int) -> KVCache | None:
        """Allocated before any timing, reset (not reallocated) per run: one per strategy and length, except
        a compiled strategy's, sized once for the longest length so that its shapes never change (a new
        shape would mean a new compilation)."""
        if get(strategy).compiled:
            if strategy not in self.caches:
                tokens = cache_tokens(self.settings.prompt_len, max(self.settings.lengths))
                self.caches[strategy] = new_cache(self.model, strategy, self.settings.batch_size, tokens)
            return self.caches[strategy]
        key = (strategy, new_tokens)
        if key not in self.caches:
            # free the caches of other lengths first (a compiled strategy's, keyed by its name, stays)
            self.caches = {k: v for k, v in self.caches.items() if isinstance(k, str) or k[1] == new_tokens}
            tokens = cache_tokens(self.settings.prompt_len, new_tokens)
            self.caches[key] = new_cache(self.model, strategy, self.settings.batch_size, tokens, self.settings.window)
        return self.caches[key]

    def compile_seconds(self) -> float | None:
        """Compile the compiled strategies' decode step now, outside every timed run; None if none in the sweep."""
        compiled = [s for s in self.settings.strategies if get(s).compiled]
        if not compiled:
            return None
        start = time.perf_counter()
        for strategy in compiled:
            cache = self.cache_for(strategy, max(self.settings.lengths))
            time_generation(self.model, self.prompt, 3, cache, self.device, decoder_for(strategy, self.device))
        return time.perf_counter() - start

    def execute(self, run: Run) -> dict | None:
        cache = self.cache_for(run.strategy, run.new_tokens)
        self.memory.start()
        timing = time_generation(self.model, self.prompt, run.tokens, cache, self.device,
                                 decoder_for(run.strategy, self.device))
        if run.is_warmup:
            return None
        row = self.row(run, timing, cache, self.memory.peak_bytes())
        self.results.append_run(row, self.step_rows(run, timing))
        return row

    def row(self, run: Run, timing: Timing, cache: KVCache | None, peak: int) -> dict:
        s = self.settings
        n_decode = run.new_tokens - 1
        decode_s = sum(timing.decode_s)
        held = cache_tokens(s.prompt_len, run.new_tokens)  # tokens the cache has seen by the end
        return dict(
            config=self.loaded.name, strategy=run.strategy, device=self.device.type, device_name=self.device_name,
            dtype=s.dtype, threads=torch.get_num_threads(), batch_size=s.batch_size, prompt_len=s.prompt_len,
            new_tokens=run.new_tokens, repeat=run.repeat, total_s=timing.total_s, prefill_s=timing.prefill_s,
            decode_s=decode_s, per_token_ms=1000 * decode_s / n_decode if n_decode else math.nan,
            tokens_per_s=s.batch_size * run.new_tokens / timing.total_s,
            kv_cache_bytes=cache.nbytes if cache is not None else 0,
            kv_cache_formula_bytes=cache.expected_bytes(held) if cache is not None else 0,
            peak_mem_bytes=peak, mem_growth_bytes=self.memory.growth_bytes(peak), **self.limits_columns(run, decode_s / n_decode if n_decode else math.nan),
            finished_at=datetime.now().isoformat(timespec="seconds"),
        )

    def limits_columns(self, run: Run, step_s: float) -> dict:
        """The memory floor of a decode step at this length, and how much of the machine the run used.

        Decode step i (1..N-1) attends to P + i tokens, P + N/2 on average. The floor is the same for every
        strategy: the least reading any method must do to produce a token; naive does far more arithmetic.
        """
        s, model = self.settings, self.model
        visible = [s.prompt_len + i for i in range(1, run.new_tokens)]
        if not visible:
            return dict(floor_ms=math.nan, bandwidth_gbs=math.nan, gflops_per_token=math.nan, achieved_gflops=math.nan)
        mean_visible = sum(visible) / len(visible)
        step_bytes = floor.weight_bytes_per_step(model, s.batch_size) + floor.kv_bytes_read(model, mean_visible,
                                                                                            s.batch_size)
        if not get(run.strategy).cached:
            flops = sum(floor.naive_step_flops(model, v, s.batch_size) for v in visible) / len(visible)
        else:
            flops = floor.cached_step_flops(model, mean_visible, s.batch_size)
        return dict(floor_ms=1000 * step_bytes / (self.bandwidth_gbs * 1e9), bandwidth_gbs=step_bytes / step_s / 1e9,
                    gflops_per_token=flops / 1e9, achieved_gflops=flops / step_s / 1e9)

    def step_rows(self, run: Run, timing: Timing) -> list[dict]:
        first_position = self.settings.prompt_len  # decode step i feeds the token at position P + i - 1
        return [dict(strategy=run.strategy, new_tokens=run.new_tokens, repeat=run.repeat, step=i + 1,
                     position=first_position + i, step_ms=1000 * seconds)
                for i, seconds in enumerate(timing.decode_s)]

    def run(self, runs: list[Run], reporter: Reporter) -> None:
        reporter.planned(runs)
        for run in runs:
            reporter.starting(run)
            reporter.finished(run, self.execute(run))
