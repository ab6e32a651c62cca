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
from kvbench.model import Decoder, random_ids
from kvbench.strategies import NAIVE, REGISTRY, get, window_of
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

    def preparing(self, what: str) -> None: ...  # a step before the runs that may take a while (probes, estimate)
    def compiled(self, seconds: float) -> None: ...
    def planned(self, runs: list[Run]) -> None: ...
    def starting(self, run: Run) -> None: ...
    def finished(self, run: Run, row: dict | None) -> None: ...


# --- cost estimate ----------------------------------------------------------------------------------------------

# Tokens (batch x context) a cached step's second, longer calibration context may hold: a step's cost is a line
# in the tokens it attends (attention and any copying grow with them, reading the weights does not), and two
# points give the line. At batch 1 the context reaches 2048 tokens, far enough that the slope is not noise; at
# batch 16, 256 (its prefill ~0.5 s on 2 cores), where the cache's share of the step is larger anyway.
CALIBRATION_TOKENS = 4096
SHORTEST_LINE = 16  # second contexts shorter than this are not timed: the step is taken as flat


def calibration_extra(longest: int, batch: int) -> int:
    """Tokens past the prompt of the longer calibration context: half the sweep's longest length, at most
    CALIBRATION_TOKENS across the batch."""
    return min(longest // 2, CALIBRATION_TOKENS // batch)


@dataclass(frozen=True)
class StepLine:
    """Seconds of one cached decode step against the tokens it attends, through two measured steps."""

    visible: float  # tokens attended at the shorter measurement
    seconds: float  # its step
    per_token: float = 0.0  # seconds more per token attended; never negative (noise is no speed-up)
    cap: float = math.inf  # a windowed strategy attends at most its window

    def at(self, visible: float) -> float:
        return self.seconds + self.per_token * max(min(visible, self.cap) - self.visible, 0.0)


def naive_terms(batch: int, seq_len: int) -> np.ndarray:
    """What a naive forward's time is fitted on: a constant, its rows (batch x length: the Linears), and its
    attention's work (batch x length^2)."""
    return np.array([1.0, batch * seq_len, batch * seq_len**2])


@dataclass
class CostModel:
    """Seconds per step, measured once before the sweep: a naive forward as a + b x rows + c x batch x length^2,
    fitted to forwards at the smallest batch over the sweep's lengths and at the largest over short ones; each
    cached strategy's step as a line in the tokens attended, at the smallest and the largest batch,
    interpolated between them."""

    naive: np.ndarray  # (a, b, c) of naive_terms
    steps: dict[tuple[str, int], StepLine]  # (cached strategy, batch) -> its step, at the calibrated batches

    def naive_step_s(self, seq_len: int, batch: int = 1) -> float:
        return max(float(naive_terms(batch, seq_len) @ self.naive), 0.0)

    def decode_step_s(self, strategy: str, batch: int, visible: float) -> float:
        calibrated = sorted(b for name, b in self.steps if name == strategy)
        low, high = calibrated[0], calibrated[-1]
        at_low = self.steps[strategy, low].at(visible)
        if batch <= low or high == low:
            return at_low
        share = min((batch - low) / (high - low), 1.0)
        return at_low + share * (self.steps[strategy, high].at(visible) - at_low)

    def run_s(self, strategy: str, prompt_len: int, new_tokens: int, batch: int = 1) -> float:
        if not get(strategy).cached:
            return sum(self.naive_step_s(prompt_len + i, batch) for i in range(new_tokens))
        # decode step i (1..N-1) attends prompt_len + i tokens: on a line, N-1 steps at the mean, prompt_len + N/2
        return (self.naive_step_s(prompt_len, batch)
                + (new_tokens - 1) * self.decode_step_s(strategy, batch, prompt_len + new_tokens / 2))

    def naive_max(self, settings: SweepSettings, budget_s: float = NAIVE_RUN_BUDGET_S) -> int:
        """The longest swept length whose naive run at the largest batch is estimated within budget_s (at
        least the shortest length, so that every sweep has one speed-up)."""
        largest = max(settings.batches)
        within = [n for n in settings.lengths if self.run_s(NAIVE_NAME, settings.prompt_len, n, largest) <= budget_s]
        return max(within, default=min(settings.lengths))


def _cached_step_s(model: Decoder, prompt: torch.Tensor, strategy: str, device: torch.device,
                   window: int | None, new_tokens: int = 8) -> float:
    """One decode step of `strategy` after the prompt (B, P): the median of 5, attending P + 2 .. P + 6 tokens,
    in a generation of new_tokens (fewer when the sweep's longest is shorter: its positions may end at the
    config's last). Eager: a compiled strategy (static+compile) is estimated as its eager step, which on CUDA
    overstates it."""
    cache = new_cache(model, strategy, prompt.shape[0], prompt.shape[1] + new_tokens, window)
    steps = generation_steps(model, prompt, new_tokens, cache)
    next(steps)  # the prefill
    decode_steps = new_tokens - 1
    if decode_steps == 0:
        return 0.0  # one token: the sweep decodes nothing either
    if decode_steps > 1:
        next(steps)  # first decode step: one-off costs
    return median_seconds(lambda: next(steps), device, repeats=min(5, max(decode_steps - 1, 1)))


def _step_line(model: Decoder, prompt: torch.Tensor, strategy: str, longest: int, device: torch.device,
               window: int | None) -> StepLine:
    """The strategy's step after the prompt and after calibration_extra more tokens of it, as a line (flat
    past the window, for a strategy that attends one)."""
    batch, n_prompt = prompt.shape
    chosen = get(strategy)
    cap = window_of(model.config, window) if chosen.windowed or chosen.visibility is not None else math.inf
    short = StepLine(n_prompt + 4, _cached_step_s(model, prompt, strategy, device, window, min(8, longest)), cap=cap)
    extra = calibration_extra(longest, batch)
    if cap < math.inf:  # past the window the step is flat: the second context stays within it
        extra = min(extra, int(cap) - n_prompt - 4)
    if extra < SHORTEST_LINE:
        return short
    more = random_ids(model.config.vocab_size, batch, extra, seed=1)
    longer = torch.cat([prompt, more.to(prompt.device)], dim=1)  # (B, P + extra)
    long_s = _cached_step_s(model, longer, strategy, device, window)
    return StepLine(short.visible, short.seconds, max(long_s - short.seconds, 0.0) / extra, cap)


@torch.inference_mode()
def calibrate(model: Decoder, prompt: torch.Tensor, longest: int, device: torch.device, strategies: list[str],
              largest: tuple[Decoder, torch.Tensor] | None = None, window: int | None = None) -> CostModel:
    """Time a few naive forwards, and each cached strategy's decode steps at two contexts, to predict the
    sweep's duration; `largest` is the model and prompt of the largest batch, whose steps are timed too."""
    n_prompt = prompt.shape[1]
    batches = [(model, prompt)]
    if largest is not None and largest[1].shape[0] != prompt.shape[0]:
        batches.append(largest)
    # naive runs: its forwards over the sweep's lengths at the smallest batch, and over short ones at the largest
    # (a long one would cost more than it tells); cached runs only: the prompt's forward, which their prefill is
    naive = any(not get(name).cached for name in strategies)
    lengths = {n_prompt, n_prompt + (longest - 1) // 2, n_prompt + longest - 1} if naive else {n_prompt}
    forwards = [(model, prompt.shape[0], seq_len) for seq_len in sorted(lengths)]
    if len(batches) > 1:
        short = {n_prompt, n_prompt + calibration_extra(longest, largest[1].shape[0])} if naive else {n_prompt}
        forwards += [(largest[0], largest[1].shape[0], seq_len) for seq_len in sorted(short)]
    fitted = _fit_naive([(batch, seq_len, _naive_step_s(m, batch, seq_len, device)) for m, batch, seq_len in forwards])
    steps = {(name, p.shape[0]): _step_line(m, p, name, longest, device, window)
             for name in strategies if get(name).cached for m, p in batches}
    return CostModel(fitted, steps)


def _naive_step_s(model: Decoder, batch: int, seq_len: int, device: torch.device) -> float:
    """A naive forward of (batch, about seq_len) random tokens: one three short of it to pay one-off costs, then
    the median of the three up to seq_len, each a new length as the naive loop sees them (some kernels,
    oneDNN's bfloat16, are built per shape); never past seq_len, which may be the config's last position."""
    ids = random_ids(model.config.vocab_size, batch, seq_len, seed=seq_len).to(device)
    first, *lengths = [max(seq_len - back, 1) for back in (3, 2, 1, 0)]
    naive_step(model, ids[:, :first])
    lengths = iter(lengths)
    return median_seconds(lambda: naive_step(model, ids[:, :next(lengths)]), device, repeats=3)


def _fit_naive(measured: list[tuple[int, int, float]]) -> np.ndarray:
    """Least squares on relative error (each (batch, length, seconds) divided by its seconds), so that the long
    forwards do not drown the short ones; as many coefficients as distinct forwards allow, none negative: more
    rows or more attention never cost less, and a negative term fitted to noise (fast, small models) would
    predict long forwards faster than short ones. A term that comes out negative is dropped and the rest refit."""
    terms = np.array([naive_terms(batch, seq_len) for batch, seq_len, _ in measured])
    seconds = np.array([t for *_, t in measured])
    kept = list(range(min(len(measured), 3)))
    while True:
        fitted, *_ = np.linalg.lstsq(terms[:, kept] / seconds[:, None], np.ones(len(measured)), rcond=None)
        if (fitted >= 0).all() or len(kept) == 1:
            break
        kept.pop(int(np.argmin(fitted)))
    coef = np.zeros(3)
    coef[kept] = np.maximum(fitted, 0.0)
    return coef


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
