"""The benchmark sweep: cached against naive generation over batch sizes x lengths, warm-up excluded,
strategies interleaved.

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
from kvbench.generate import (Decode, RowStops, cache_tokens, decode_one, decoder_for, for_generation,
                              generation_steps, left_pad, naive_step, new_cache)
from kvbench.model import Decoder
from kvbench.strategies import NAIVE, REGISTRY, get, names
from kvbench.verify import random_prompt

NAIVE_NAME = NAIVE.name
WARMUP_TOKEN_CAP = 100  # warm-up generations stop here: same kernels, without doubling the naive sweep
NAIVE_RUN_BUDGET_S = 60.0  # default --naive-max: the longest length whose naive run is estimated under this


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep runs; recorded in meta.json so that --resume continues with exactly these."""

    lengths: list[int]
    strategies: list[str]
    repeats: int = 3
    warmup: int = 1
    prompt_len: int = 16
    batch_size: list[int] = field(default_factory=lambda: [1])  # a second sweep axis (an int in older meta.json)
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    window: int | None = None  # the sliding strategy's window
    src_len: int | None = None  # encoder-decoder: source tokens per sequence
    naive_max: int | None = None  # naive points past this many new tokens are skipped; None: from the estimate
    engine: str = "kvbench"  # whose modeling code runs the model: kvbench's or transformers' (--engine)
    prompt_lens: list[int] | None = None  # a ragged batch: one prompt length per row (prompt_len is the longest)
    new_tokens_per_row: list[int] | None = None  # rows that stop at different steps (lengths is their largest)

    def __post_init__(self):
        if isinstance(self.batch_size, int):  # results directories written before batch became an axis
            object.__setattr__(self, "batch_size", [self.batch_size])

    @property
    def batches(self) -> list[int]:
        return sorted(self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def stops(self) -> RowStops | None:
        return RowStops(tuple(self.new_tokens_per_row)) if self.new_tokens_per_row else None

    def row_new_tokens(self, batch: int, new_tokens: int) -> list[int]:
        """New tokens each row generates at a point of new_tokens (its own stop, if it stops earlier)."""
        return (self.stops or RowStops()).limits(batch, new_tokens)

    def row_tokens(self, batch: int, new_tokens: int) -> list[int]:
        """Tokens each row's cache holds at its largest: its own prompt and every new token fed back."""
        prompts = self.prompt_lens or [self.prompt_len] * batch
        return [cache_tokens(p, n) for p, n in zip(prompts, self.row_new_tokens(batch, new_tokens), strict=True)]


# What `kvbench benchmark` and a sweep point run when not told otherwise: declared once
DEFAULTS = SweepSettings(lengths=[10, 50, 100, 500, 1000], strategies=["naive", "static"])
DEFAULT_SRC_LEN = 16  # encoder-decoder source tokens per sequence


def skipped_points(settings: SweepSettings, naive_max: int | None) -> list[tuple[str, int, int]]:
    """(strategy, batch, new_tokens) of the uncached points past naive_max: not run, marked in the summary."""
    if naive_max is None:
        return []
    # a strategy not registered now (a plugin's, redrawn without importing it) is a cache: never skipped
    uncached = [s for s in settings.strategies if s in REGISTRY and not REGISTRY[s].cached]
    return [(s, b, n) for s in uncached for b in settings.batches
            for n in settings.lengths if n > naive_max]


@dataclass(frozen=True)
class Run:
    strategy: str
    batch: int  # sequences generated at once
    new_tokens: int  # the sweep point's length
    repeat: int  # -1 for a warm-up
    estimate_s: float
    warmup_tokens: int = 0  # a warm-up generates this many tokens, into the point's own cache

    @property
    def tokens(self) -> int:
        return self.warmup_tokens if self.is_warmup else self.new_tokens

    @property
    def key(self) -> RunKey:
        return (self.strategy, self.batch, self.new_tokens, self.repeat)

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
    """Seconds per step, measured once before the sweep at one batch size: naive as a quadratic in sequence
    length, scaled linearly to other batches (it is arithmetic-bound); a cached step at the smallest and the
    largest batch, interpolated between them."""

    naive_poly: np.ndarray  # coefficients of seconds per naive step against sequence length, at batch `batch`
    decode_s: float  # one cached decode step at batch `batch`
    batch: int = 1
    decode_s_largest: tuple[int, float] | None = None  # (largest batch, its cached step) when it differs

    def naive_step_s(self, seq_len: int, batch: int | None = None) -> float:
        scale = (batch or self.batch) / self.batch
        return max(float(np.polyval(self.naive_poly, seq_len)), 0.0) * scale

    def decode_step_s(self, batch: int) -> float:
        if self.decode_s_largest is None or batch <= self.batch:
            return self.decode_s
        largest, largest_s = self.decode_s_largest
        share = min((batch - self.batch) / max(largest - self.batch, 1), 1.0)
        return self.decode_s + share * (largest_s - self.decode_s)

    def run_s(self, strategy: str, prompt_len: int, new_tokens: int, batch: int | None = None) -> float:
        if not get(strategy).cached:
            return sum(self.naive_step_s(prompt_len + i, batch) for i in range(new_tokens))
        return self.naive_step_s(prompt_len, batch) + (new_tokens - 1) * self.decode_step_s(batch or self.batch)

    def naive_max(self, settings: SweepSettings, budget_s: float = NAIVE_RUN_BUDGET_S) -> int:
        """The longest swept length whose naive run at the largest batch is estimated within budget_s (at
        least the shortest length, so that every sweep has one speed-up)."""
        largest = max(settings.batches)
        within = [n for n in settings.lengths if self.run_s(NAIVE_NAME, settings.prompt_len, n, largest) <= budget_s]
        return max(within, default=min(settings.lengths))


def _cached_step_s(model: Decoder, prompt: torch.Tensor, device: torch.device) -> float:
    # the first cached strategy of the model's family: static on kvbench's models, hf-dynamic on transformers'
    strategy = next(name for name in names(model.config.family) if get(name).cached)
    cache = new_cache(model, strategy, prompt.shape[0], prompt.shape[1] + 8)
    steps = generation_steps(model, prompt, 8, cache)
    next(steps)
    next(steps)  # first decode step: one-off costs
    return median_seconds(lambda: next(steps), device, repeats=5)


@torch.inference_mode()
def calibrate(model: Decoder, prompt: torch.Tensor, longest: int, device: torch.device,
              largest: tuple[Decoder, torch.Tensor] | None = None) -> CostModel:
    """Time a few naive forwards and cached decode steps to predict the sweep's duration; `largest` is the
    model and prompt of the largest batch, for its cached step."""
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
    at_largest = None
    if largest is not None and largest[1].shape[0] != prompt.shape[0]:
        at_largest = (largest[1].shape[0], _cached_step_s(*largest, device))
    return CostModel(poly, _cached_step_s(model, prompt, device), prompt.shape[0], at_largest)


# --- plan -------------------------------------------------------------------------------------------------------

def timed_runs(settings: SweepSettings, naive_max: int | None = None) -> set[RunKey]:
    """Every timed run the settings ask for, but the naive points past naive_max."""
    skipped = set(skipped_points(settings, naive_max))
    return {(s, b, n, r) for b in settings.batches for n in settings.lengths for s in settings.strategies
            for r in range(settings.repeats) if (s, b, n) not in skipped}


def plan_runs(settings: SweepSettings, costs: CostModel, done: set[RunKey], naive_max: int | None = None) -> list[Run]:
    """Every run still to do, in order: per batch and length, warm-ups, then repeats with strategies
    interleaved (so that machine drift hits every strategy of a point alike)."""
    wanted = timed_runs(settings, naive_max) - done
    runs: list[Run] = []
    for batch in settings.batches:
        for length in settings.lengths:
            timed = [Run(s, batch, length, r, costs.run_s(s, settings.prompt_len, length, batch))
                     for r in range(settings.repeats) for s in settings.strategies if (s, batch, length, r) in wanted]
            if not timed:
                continue
            warm = min(length, WARMUP_TOKEN_CAP)
            runs += [Run(s, batch, length, -1, costs.run_s(s, settings.prompt_len, warm, batch), warmup_tokens=warm)
                     for s in settings.strategies if any(r.strategy == s for r in timed) for _ in range(settings.warmup)]
            runs += timed
    return runs


# --- what a step must do, and how much of the machine a run used -------------------------------------------------

NO_LIMITS = dict(weight_bytes=math.nan, kv_bytes=math.nan, floor_ms=math.nan, bound="", bandwidth_gbs=math.nan,
                 gflops_per_token=math.nan, achieved_gflops=math.nan)


def step_limits(model, limits: floor.MachineLimits, run: Run, prompt_len: int, step_s: float) -> dict:
    """The floor of a decode step at this point, and how much of the machine the run used.

    Decode step i (1..N-1) attends to P + i tokens, P + N/2 on average. The floor is the same for every
    strategy: the least reading (full-precision K/V) and arithmetic any method must do to produce a token;
    naive does far more arithmetic, which achieved_gflops shows."""
    visible = [prompt_len + i for i in range(1, run.new_tokens)]
    if not visible:
        return dict(NO_LIMITS)
    mean_visible = sum(visible) / len(visible)
    weights = floor.weight_bytes_per_step(model, run.batch)
    kv = floor.kv_bytes_read(model, mean_visible, run.batch)
    cached_flops = floor.cached_step_flops(model, mean_visible, run.batch)
    floor_ms, bound = limits.floor(weights + kv, cached_flops, run.batch)
    if get(run.strategy).cached:
        flops = cached_flops
    else:
        flops = sum(floor.naive_step_flops(model, v, run.batch) for v in visible) / len(visible)
    return dict(weight_bytes=weights, kv_bytes=kv, floor_ms=floor_ms, bound=bound,
                bandwidth_gbs=(weights + kv) / step_s / 1e9, gflops_per_token=flops / 1e9,
                achieved_gflops=flops / step_s / 1e9)


def memory_columns(cache: KVCache | None, row_tokens: list[int]) -> dict:
    """kv_allocated_bytes, kv_live_bytes and kv_waste, as the cache reports them (naive holds nothing; a
    plugin that does not say what a token takes leaves them empty)."""
    if cache is None:
        return dict(kv_allocated_bytes=0, kv_live_bytes=0, kv_waste=math.nan)
    try:
        use = cache.memory_use(row_tokens)
    except NotImplementedError:
        return dict(kv_allocated_bytes=math.nan, kv_live_bytes=math.nan, kv_waste=math.nan)
    return dict(kv_allocated_bytes=use.allocated, kv_live_bytes=use.live, kv_waste=use.waste)


# --- one timed run ----------------------------------------------------------------------------------------------

@dataclass
class Timing:
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # one entry per decode step

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.decode_s)


def time_generation(model: Decoder, prompt: torch.Tensor, new_tokens: int, cache: KVCache | None,
                    device: torch.device, decode: Decode = decode_one, pads: torch.Tensor | None = None,
                    stops: RowStops | None = None) -> Timing:
    """Generate new_tokens, marking the clock before the prefill and after every step. `pads`: a left-padded
    ragged batch; `stops`: rows that stop at different steps."""
    clock = StepClock(device)
    clock.mark()
    for _ in generation_steps(model, prompt, new_tokens, cache, decode=decode, pads=pads, stops=stops):
        clock.mark()
    durations = clock.durations()
    return Timing(durations[0], durations[1:])


class Sweep:
    """Runs the plan, one row per timed run into the results directory."""

    def __init__(self, loaded: LoadedConfig, model, settings: SweepSettings, results: ResultsDir,
                 device: torch.device, device_name: str, limits: floor.MachineLimits):
        self.loaded, self.base_model, self.settings, self.limits = loaded, model, settings, limits
        self.results, self.device, self.device_name = results, device, device_name
        self.memory = PeakMemory(device)
        self.caches: dict[tuple, KVCache | None] = {}
        self.inputs: dict[int, tuple] = {}

    def model_and_prompt(self, batch: int) -> tuple[Decoder, torch.Tensor]:
        """The model as generation runs it at this batch (an encoder-decoder bound to its source batch) and the
        seeded prompt (batch, prompt_len); built once per batch, outside every timing."""
        if batch not in self.inputs:
            s = self.settings
            model = for_generation(self.base_model, batch, s.src_len or 0, s.seed)
            prompt = random_prompt(self.loaded.model, batch, s.prompt_len, s.seed).to(self.device)
            pads = None
            if s.prompt_lens:  # each row its own prompt, drawn as kv-evaluate draws a ragged batch's
                prompt, pads = left_pad([random_prompt(self.loaded.model, 1, n, s.seed + row)[0].to(self.device)
                                         for row, n in enumerate(s.prompt_lens)])
            self.inputs = {batch: (model, prompt, pads)}  # one batch at a time: a large batch's source is not kept
        return self.inputs[batch][:2]

    def pads(self, batch: int) -> torch.Tensor | None:
        """A ragged batch's left padding per row (B,); None when every prompt has the same length."""
        self.model_and_prompt(batch)
        return self.inputs[batch][2]

    def cache_for(self, strategy: str, batch: int, new_tokens: int) -> KVCache | None:
        """Allocated before any timing, reset (not reallocated) per run: one per strategy, batch and length,
        except a compiled strategy's, sized once per batch for the longest length so that its shapes never
        change within a batch (a new shape would mean a new compilation)."""
        model, _ = self.model_and_prompt(batch)
        compiled = get(strategy).compiled
        key = (strategy, batch) if compiled else (strategy, batch, new_tokens)
        if key not in self.caches:
            # free the caches of other points first (a compiled strategy's of this batch stays)
            self.caches = {k: v for k, v in self.caches.items() if k[1] == batch and (len(k) == 2 or k[2] == new_tokens)}
            longest = max(self.settings.lengths) if compiled else new_tokens
            tokens = cache_tokens(self.settings.prompt_len, longest)
            self.caches[key] = new_cache(model, strategy, batch, tokens, None if compiled else self.settings.window)
        return self.caches[key]

    def compile_seconds(self, batch: int) -> float | None:
        """Compile the compiled strategies' decode step for this batch, outside every timed run; None if none."""
        compiled = [s for s in self.settings.strategies if get(s).compiled]
        if not compiled:
            return None
        model, prompt = self.model_and_prompt(batch)
        start = time.perf_counter()
        for strategy in compiled:
            cache = self.cache_for(strategy, batch, max(self.settings.lengths))
            time_generation(model, prompt, 3, cache, self.device, decoder_for(strategy, self.device), self.pads(batch))
        return time.perf_counter() - start

    def execute(self, run: Run) -> dict | None:
        model, prompt = self.model_and_prompt(run.batch)
        cache = self.cache_for(run.strategy, run.batch, run.new_tokens)
        self.memory.start()
        timing = time_generation(model, prompt, run.tokens, cache, self.device, decoder_for(run.strategy, self.device),
                                 self.pads(run.batch), self.settings.stops)
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
        generated = sum(s.row_new_tokens(run.batch, run.new_tokens))  # rows that stop early generate fewer
        return dict(
            config=self.loaded.name, strategy=run.strategy, device=self.device.type, device_name=self.device_name,
            dtype=s.dtype, threads=torch.get_num_threads(), batch_size=run.batch, prompt_len=s.prompt_len,
            new_tokens=run.new_tokens, repeat=run.repeat, total_s=timing.total_s, prefill_s=timing.prefill_s,
            decode_s=decode_s, per_token_ms=1000 * decode_s / n_decode if n_decode else math.nan,
            tokens_per_s=generated / timing.total_s,
            kv_cache_bytes=cache.nbytes if cache is not None else 0,
            kv_cache_formula_bytes=cache.expected_bytes(held) if cache is not None else 0,
            **memory_columns(cache, s.row_tokens(run.batch, run.new_tokens)),
            peak_mem_bytes=peak, mem_growth_bytes=self.memory.growth_bytes(peak),
            **step_limits(self.model_and_prompt(run.batch)[0], self.limits, run, s.prompt_len,
                          decode_s / n_decode if n_decode else math.nan),
            finished_at=datetime.now().isoformat(timespec="seconds"),
        )

    def step_rows(self, run: Run, timing: Timing) -> list[dict]:
        first_position = self.settings.prompt_len  # decode step i feeds the token at position P + i - 1
        return [dict(strategy=run.strategy, batch_size=run.batch, new_tokens=run.new_tokens, repeat=run.repeat, step=i + 1,
                     position=first_position + i, step_ms=1000 * seconds)
                for i, seconds in enumerate(timing.decode_s)]

    def run(self, runs: list[Run], reporter: Reporter, on_compiled=lambda batch, seconds: None) -> None:
        """Each batch's compiled decode step is compiled just before the batch's first run (outside every timing)."""
        reporter.planned(runs)
        compiled_for: set[int] = set()
        for run in runs:
            if run.batch not in compiled_for:
                compiled_for.add(run.batch)
                seconds = self.compile_seconds(run.batch)
                if seconds is not None:
                    on_compiled(run.batch, seconds)
                    reporter.compiled(seconds)
            reporter.starting(run)
            reporter.finished(run, self.execute(run))
