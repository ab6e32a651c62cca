"""evaluate and kv-evaluate as functions that return result objects. Nothing here prints."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from kvbench.cache import KVCache
from kvbench.config import AnyConfig
from kvbench.errors import KVBenchError
from kvbench.generate import (GREEDY, Generation, Rollback, RowStops, Step, cache_tokens, for_model, generate, left_pad, new_cache, random_ids,
                              with_batch)
from kvbench.model import AttentionRule, Decoder, self_attention_mask
from kvbench.precision import CONTENTS_TOLERANCE, NEAR_TIE_KL, Thresholds, dtype_name
from kvbench.seq2seq import Seq2Seq
from kvbench.strategies import Strategy, resolve, window_of
from kvbench.families import family_of, reads_source
from kvbench.sampling import SamplingSettings, filtered_probs, pick
from kvbench.weights import save_tensors

LM_HEAD_CHUNK = 128  # positions per LM-head matmul when checking long runs: bounds memory at chunk x vocab


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def bound(self, expected: torch.Tensor) -> torch.Tensor:
        """Allowed |actual - expected| per element, as torch.allclose defines it."""
        return self.atol + self.rtol * expected.abs()


@dataclass
class Comparison:
    """How far `actual` logits are from `expected` ones, (B, T, V) each."""

    name: str
    max_abs: float  # max |actual - expected|
    max_rel: float  # max |actual - expected| / |expected| over elements with |expected| > atol
    argmax_agreement: float  # fraction of positions whose top token agrees
    worst_ratio: float  # max |actual - expected| / (atol + rtol |expected|): <= 1 passes
    passed: bool
    nonfinite: str | None = None  # where a NaN or infinity first appears: always a failure


def compare_logits(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Comparison:
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    large = expected.abs() > tol.atol
    max_rel = (diff[large] / expected.abs()[large]).max().item() if large.any() else 0.0
    worst = (diff / tol.bound(expected)).max().item()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).double().mean().item()
    nonfinite = first_nonfinite(actual, "actual") or first_nonfinite(expected, "expected")
    passed = nonfinite is None and worst <= 1.0  # NaN compares False: it never passes
    return Comparison(name, diff.max().item(), max_rel, agreement, worst, passed, nonfinite)


def first_nonfinite(logits: torch.Tensor, side: str) -> str | None:
    """'<side> logits hold NaN/inf from (row, position)' for logits (B, T, V), or None when all are finite."""
    bad = ~logits.isfinite().all(-1)  # (B, T)
    if not bad.any():
        return None
    row, position = (int(i) for i in bad.nonzero()[0])
    return f"{side} logits hold NaN/inf from row {row}, position {position}"


# --- expected-logits files -------------------------------------------------------------------------------------

@dataclass
class EvalInputs:
    """What evaluate feeds the model: token ids (B, T), and for an encoder-decoder source ids (B, S)."""

    input_ids: torch.Tensor
    src_ids: torch.Tensor | None = None


ORIGIN_KEY = "kvbench_model"  # the expected file's metadata: which model wrote it (model_origin)


def model_origin(loaded) -> str:
    """Which model an expected file was written for: the config's name, its values' hash, the weight file's
    name and size (a hint for a failed comparison, not a check: the logits are the check)."""
    values = json.dumps(loaded.model.model_dump(mode="json"), sort_keys=True, default=str)
    weights = loaded.weights_path
    on_disk = f", weights {weights.name} ({weights.stat().st_size} bytes)" if weights and weights.is_file() else ""
    return f"config {loaded.name} (values {hashlib.sha256(values.encode()).hexdigest()[:12]}){on_disk}"


def write_expected(path: Path, inputs: EvalInputs, logits: torch.Tensor, origin: str | None = None) -> None:
    tensors = {"input_ids": inputs.input_ids.to(torch.int64).contiguous(),
               "logits": logits.to(torch.float32).contiguous()}
    if inputs.src_ids is not None:
        tensors["src_ids"] = inputs.src_ids.to(torch.int64).contiguous()
    save_tensors(tensors, path, {ORIGIN_KEY: origin} if origin else None)


def expected_origin(path: Path) -> str | None:
    """The model an expected file says it was written for, if it says (files from before kvbench wrote it do not)."""
    try:
        with safe_open(path, "pt") as file:
            return (file.metadata() or {}).get(ORIGIN_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def read_expected(path: Path, config: AnyConfig) -> tuple[EvalInputs, torch.Tensor]:
    """Inputs and logits (B, T, V) float32 from an expected file, checked against the config."""
    if not path.is_file():
        raise KVBenchError(f"expected file '{path}' not found; create one with --write-expected")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise KVBenchError(f"expected file '{path}' is not a valid safetensors file ({exc})") from None
    seq2seq = reads_source(config)
    for key in ("input_ids", "logits", *(["src_ids"] if seq2seq else [])):
        if key not in tensors:
            raise KVBenchError(f"expected file '{path}' has no '{key}' tensor; it needs input_ids and logits"
                               + (" and src_ids (an encoder-decoder config)" if seq2seq else ""))
    ids, logits = tensors["input_ids"], tensors["logits"]
    inputs = EvalInputs(ids, tensors["src_ids"] if seq2seq else None)
    for name, t in (("input_ids", ids), ("src_ids", inputs.src_ids)):
        if t is not None and (t.dtype != torch.int64 or t.dim() != 2 or t.shape[0] != ids.shape[0]):
            raise KVBenchError(f"expected file '{path}': {name} must be int64 (B, T), got {t.dtype} {tuple(t.shape)}")
        if t is not None and t.numel() == 0:  # nothing to run the model on, nothing to compare
            raise KVBenchError(f"expected file '{path}': {name} {tuple(t.shape)} holds no token; it needs B, T >= 1")
    if not logits.is_floating_point():  # integer "logits" are not what any model wrote: refuse, don't compare
        raise KVBenchError(f"expected file '{path}': logits must be floating point, got {logits.dtype}")
    if tuple(logits.shape) != (*ids.shape, config.vocab_size):
        written_for = expected_origin(path)
        raise KVBenchError(f"expected file '{path}': logits shape {tuple(logits.shape)} does not match input_ids "
                           f"{tuple(ids.shape)} and vocab_size {config.vocab_size}; "
                           + (f"it was written for {written_for}" if written_for else "was it made for this config?"))
    check_prompt(ids, config.vocab_size, config, f"expected file '{path}'")
    if seq2seq:
        check_prompt(inputs.src_ids, config.src_vocab_size, config, f"expected file '{path}' (src_ids)")
    return inputs, logits.float()


def check_prompt(ids: torch.Tensor, vocab: int, config: AnyConfig, origin: str) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise KVBenchError(f"{origin}: token ids must lie in 0..{vocab - 1}")
    if ids.shape[1] > config.max_seq_len:  # past it, positions are untrained (or, learned, absent)
        raise KVBenchError(f"{origin}: {ids.shape[1]} tokens exceed max_seq_len {config.max_seq_len}")


def random_prompt(config: AnyConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded random (target) token ids (B, P): the same prompt for the same seed, whatever the device."""
    return random_ids(config.vocab_size, batch, length, seed)


def random_inputs(config: AnyConfig, batch: int, length: int, src_len: int, seed: int) -> EvalInputs:
    """A seeded prompt, plus for an encoder-decoder a source drawn with seed + 1 (as for_generation does)."""
    src = random_ids(config.src_vocab_size, batch, src_len, seed + 1) if reads_source(config) else None
    return EvalInputs(random_prompt(config, batch, length, seed), src)


# --- evaluate ---------------------------------------------------------------------------------------------------

@dataclass
class EvaluateResult:
    inputs: EvalInputs
    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


def numpy_reference(cpu_weights: dict[str, torch.Tensor], config: AnyConfig, inputs: EvalInputs) -> torch.Tensor:
    weights = {name: t.double().numpy() for name, t in cpu_weights.items()}
    src = None if inputs.src_ids is None else inputs.src_ids.numpy()
    return torch.from_numpy(family_of(config).reference(weights, config, inputs.input_ids.numpy(), src))


def evaluate(model: Decoder | Seq2Seq, cpu_weights: dict[str, torch.Tensor], inputs: EvalInputs, tol: Tolerance,
             expected: torch.Tensor | None = None) -> tuple[EvaluateResult, torch.Tensor]:
    """Compare the model's logits at every prompt position with the NumPy reference (and expected logits).

    Returns the result and the reference logits (for --write-expected).
    """
    device = model.device
    args = [inputs.input_ids.to(device)]
    if inputs.src_ids is not None:
        args.insert(0, inputs.src_ids.to(device))  # Seq2Seq.forward(src, tgt)
    with torch.inference_mode():
        logits = model(*args).float().cpu()  # (B, T, V)
    reference = numpy_reference(cpu_weights, model.config, inputs)
    comparisons = [compare_logits("torch vs NumPy reference", logits, reference, tol)]
    if expected is not None:
        comparisons.append(compare_logits("torch vs expected", logits, expected, tol))
        comparisons.append(compare_logits("NumPy reference vs expected", reference, expected, tol))
    return EvaluateResult(inputs, comparisons), reference


def evaluate_rows(model: Decoder, cpu_weights: dict[str, torch.Tensor], rows: list[torch.Tensor],
                  tol: Tolerance) -> EvaluateResult:
    """A ragged batch: the prompts left-padded into one forward, and each row's logits at its own positions
    compared with the NumPy reference run on that row alone (so padding may change no logit of any row)."""
    ids, pads = left_pad(rows)
    with torch.inference_mode():
        logits = model(ids.to(model.device), pads=None if pads is None else pads.to(model.device)).float().cpu()
    start = [0] * len(rows) if pads is None else pads.tolist()
    comparisons = []
    for r, row in enumerate(rows):
        reference = numpy_reference(cpu_weights, model.config, EvalInputs(row[None].cpu()))  # (1, n, V)
        comparisons.append(compare_logits(f"row {r} ({len(row)} tokens) vs NumPy",
                                          logits[r:r + 1, start[r]:], reference, tol))
    return EvaluateResult(EvalInputs(ids), comparisons)


# --- kv-evaluate ------------------------------------------------------------------------------------------------

def _worst(a: float, b: float) -> float:
    """The larger of two errors, NaN winning: a NaN must fail a check, never vanish (max(0.0, nan) is 0.0)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass
class Agreement:
    """How close a run's logits are to reference logits, over every step and row, on average and at worst."""

    max_abs: float = 0.0  # max |run - reference|
    worst_ratio: float = 0.0  # max |run - reference| / (atol + rtol |reference|): <= 1 is within tolerance
    mean_kl: float = 0.0  # mean KL(reference || run) of the softmax distributions, in nats
    worst_kl: float = 0.0  # the largest KL of any single step and row: a local bug is not diluted by the mean
    top1: float = 1.0  # fraction of (step, row) whose argmax agrees
    worst_streak: int = 0  # most consecutive steps of one row whose argmax disagrees (near-ties aside)
    _count: int = field(default=0, repr=False)
    _streak: torch.Tensor | None = field(default=None, repr=False)  # (B,) current run of disagreeing steps

    def add(self, run: torch.Tensor, reference: torch.Tensor, tol: Tolerance) -> None:
        """Fold in a chunk of consecutive steps' logits (B, c, V), both float64."""
        diff = (run - reference).abs()
        self.max_abs = _worst(self.max_abs, diff.max().item())
        self.worst_ratio = _worst(self.worst_ratio, (diff / tol.bound(reference)).max().item())
        log_ref, log_run = torch.log_softmax(reference, -1), torch.log_softmax(run, -1)
        kl = (log_ref.exp() * (log_ref - log_run)).sum(-1)  # (B, c)
        self.worst_kl = _worst(self.worst_kl, kl.max().item())
        agree = run.argmax(-1) == reference.argmax(-1)  # (B, c)
        # A flip between candidates naive rates almost equally, with the distributions otherwise the same, is
        # rounding; a random model stuck in a loop meets the same near-tie each cycle. Drift shows in the KL.
        self._fold_streaks(~agree & (kl > NEAR_TIE_KL))
        n, m = self._count, kl.numel()
        self.mean_kl = (self.mean_kl * n + kl.sum().item()) / (n + m)
        self.top1 = (self.top1 * n + agree.double().sum().item()) / (n + m)
        self._count = n + m

    @classmethod
    def pooled(cls, parts: list[Agreement]) -> Agreement:
        """One agreement over several generations: averages weighted by steps, worsts over all."""
        total = sum(p._count for p in parts)
        if not parts or total == 0:
            return cls()
        mean = lambda name: sum(getattr(p, name) * p._count for p in parts) / total  # noqa: E731
        worst = lambda name: functools.reduce(_worst, (getattr(p, name) for p in parts))  # noqa: E731
        return cls(worst("max_abs"), worst("worst_ratio"), mean("mean_kl"), worst("worst_kl"), mean("top1"),
                   max(p.worst_streak for p in parts), total)

    def _fold_streaks(self, disagree: torch.Tensor) -> None:
        disagree = disagree.cpu()  # one copy per chunk, not a device sync per step (and CPU with CPU)
        streak = torch.zeros(disagree.shape[0], dtype=torch.long) if self._streak is None else self._streak
        for column in disagree.long().T:  # step by step: a streak may span chunks
            streak = (streak + 1) * column
            self.worst_streak = max(self.worst_streak, int(streak.max()))
        self._streak = streak


@dataclass
class Divergence:
    """The first step where a strategy chose a different token than naive decoding would have."""

    step: int
    row: int
    chosen: int  # what the strategy chose
    naive_choice: int  # what naive decoding chooses from its logits (and the same random draw) at that step
    gap: float  # how far naive was from choosing `chosen`: a logit gap (greedy) or a probability gap (sampling)
    near_tie: bool  # gap within what the logit differences allow: rounding, not a cache bug


@dataclass
class NonFinite:
    """The first step where the cached or the naive logits hold a NaN or an infinity."""

    step: int
    row: int
    in_cached: bool
    in_naive: bool

    def describe(self) -> str:
        where = {(True, True): "cached and naive logits", (True, False): "cached logits (naive's are finite)",
                 (False, True): "naive logits"}[(self.in_cached, self.in_naive)]
        blame = "the model or its weights are broken, not the cache" if self.in_naive else "the cache produced it"
        return f"NaN/inf in the {where} from step {self.step} (row {self.row}): {blame}"


def find_nonfinite(cached: torch.Tensor, naive: torch.Tensor, first_step: int) -> NonFinite | None:
    """The first (step, row) of a chunk (B, c, V) where either side is not finite."""
    bad_cached, bad_naive = ~cached.isfinite().all(-1), ~naive.isfinite().all(-1)  # (B, c) each
    if not (bad_cached | bad_naive).any():
        return None
    row, step = _first(bad_cached | bad_naive)
    return NonFinite(first_step + step, row, bool(bad_cached[row, step]), bool(bad_naive[row, step]))


@dataclass
class ContentsCheck:
    """A cache's stored K/V against the K/V a fresh forward computes for the same positions."""

    provided: bool = True  # False: the cache (a plugin) does not expose its contents, so they are unchecked
    worst_ratio: float = 0.0  # max |stored - fresh| / allowed over layers, K and V, positions: <= 1 passes
    problem: str | None = None  # the first thing found wrong, in words

    @property
    def passed(self) -> bool:
        return not self.provided or (self.problem is None and self.worst_ratio <= 1.0)


@dataclass
class GenerationCheck:
    """One generation of a strategy checked against naive recomputation of the same tokens."""

    label: str  # which generation of the plan: fresh cache, reused after a long run, ...
    new_tokens: int
    main: bool = False  # the generation the user asked for (the others test reuse and rows)
    vs_naive: Agreement = field(default_factory=Agreement)
    divergence: Divergence | None = None
    nonfinite: NonFinite | None = None
    contents: ContentsCheck | None = None  # None without a cache (naive)
    drift: Agreement | None = None  # sliding only: against full attention, for information
    error: str | None = None  # the cache raised instead of generating
    tokens: torch.Tensor | None = field(default=None, repr=False)  # (B, N)


@dataclass
class StrategyCheck:
    """Every generation of one strategy, judged exactly (within tolerance) or by `thresholds` (approximate)."""

    strategy: str
    exact: bool
    thresholds: Thresholds
    generations: list[GenerationCheck]

    @property
    def main(self) -> GenerationCheck:
        return next(g for g in self.generations if g.main)

    @property
    def new_tokens(self) -> int:
        return self.main.new_tokens

    @property
    def vs_naive(self) -> Agreement:
        return self.main.vs_naive

    @property
    def tokens(self) -> torch.Tensor | None:
        return self.main.tokens

    @property
    def drift(self) -> Agreement | None:
        return self.main.drift

    @property
    def divergence(self) -> Divergence | None:
        """The run asked for's first token divergence (the others' real mismatches are in `failures`)."""
        return self.main.divergence

    @property
    def max_abs(self) -> float:
        return functools.reduce(_worst, (g.vs_naive.max_abs for g in self.generations))

    @property
    def worst_ratio(self) -> float:
        return functools.reduce(_worst, (g.vs_naive.worst_ratio for g in self.generations))

    @property
    def worst_kl(self) -> float:
        return functools.reduce(_worst, (g.vs_naive.worst_kl for g in self.generations))

    @property
    def lowest_top1(self) -> float:
        return min(g.vs_naive.top1 for g in self.generations)

    @property
    def contents_unchecked(self) -> bool:
        """The cache (a plugin) does not expose its contents: its stored K/V were not checked."""
        return any(g.contents is not None and not g.contents.provided for g in self.generations)

    @property
    def contents_ratio(self) -> float | None:
        ratios = [g.contents.worst_ratio for g in self.generations if g.contents and g.contents.provided]
        return functools.reduce(_worst, ratios) if ratios else None

    def problems(self, g: GenerationCheck) -> list[str]:
        """What is wrong with one generation, in words; empty when it passes."""
        if g.error is not None:
            return [f"the cache raised {g.error}"]
        found = [g.nonfinite.describe()] if g.nonfinite else []
        a, t = g.vs_naive, self.thresholds
        if self.exact:
            if not a.worst_ratio <= 1.0:  # `not <=`: NaN fails
                found.append(f"logits differ from naive's by up to {a.max_abs:.2e}, {a.worst_ratio:.3g}x the tolerance")
            if g.divergence is not None and not g.divergence.near_tie:
                d = g.divergence
                found.append(f"chose {d.chosen} at step {d.step} (row {d.row}) where naive chooses {d.naive_choice}")
        else:  # the worst step here; the averages over every generation together (see failures)
            if not a.worst_kl <= t.max_step_kl:
                found.append(f"worst step KL {a.worst_kl:.2e} above {t.max_step_kl:g}")
            if not a.worst_streak <= t.max_streak:
                found.append(f"{a.worst_streak} consecutive steps disagree on the top token (at most {t.max_streak})")
        if g.contents is not None and not g.contents.passed:
            found.append(g.contents.problem or f"stored K/V off by {g.contents.worst_ratio:.3g}x what is allowed")
        return found

    @property
    def pooled(self) -> Agreement:
        """Every generation's steps together: what an approximate strategy's averages are judged on (a
        48-step generation alone is too few steps for a top-1 fraction to mean much)."""
        return Agreement.pooled([g.vs_naive for g in self.generations if g.error is None])

    def average_problems(self) -> list[str]:
        if self.exact:
            return []
        a, t = self.pooled, self.thresholds
        found = [f"mean KL {a.mean_kl:.2e} above {t.max_mean_kl:g}"] if not a.mean_kl <= t.max_mean_kl else []
        if not a.top1 >= t.min_top1:
            found.append(f"top-1 agreement {a.top1:.1%} below {t.min_top1:.0%}")
        return found

    @property
    def failures(self) -> list[str]:
        per_generation = [f"{g.label}: {problem}" for g in self.generations for problem in self.problems(g)]
        return per_generation + [f"all generations: {problem}" for problem in self.average_problems()]

    @property
    def passed(self) -> bool:
        return not self.failures


class ContentsError(Exception):
    """A cache's contents() returned something other than (positions, K, V) tensors."""


def read_contents(cache: KVCache, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cache.contents(layer, length), checked to be three tensors: a plugin's of another shape is a
    ContentsError saying what it must return (kv-evaluate's failure line), never a traceback."""
    must = (f"{type(cache).__name__}.contents() must return (positions (S,), K (B, H, S, hd), "
            "V (B, H, S, hd))")
    try:
        positions, k, v = cache.contents(layer, length)
    except (TypeError, ValueError) as exc:
        raise ContentsError(f"{must}; unpacking it raised {type(exc).__name__}: {exc}") from None
    if not all(isinstance(t, torch.Tensor) for t in (positions, k, v)):
        raise ContentsError(f"{must}, as tensors")
    return positions, k, v


class KVRecorder(KVCache):
    """Not a cache: it keeps each layer's K/V of one plain forward over a whole sequence, the reference a
    cache's contents are checked against. Attention is as naive's (`visibility`: causal, banded, a rule).

    Where the cache under test holds every position, attention reads exactly what it holds: then a lossy
    cache's deeper layers get the same inputs as in the generation, so their K/V are comparable without a
    second rounding (a value re-quantized to the neighbouring int8 step would shift every later layer).
    Layer 0's K/V depend on the tokens alone, so a wrong store is still caught there."""

    def __init__(self, visibility: AttentionRule, device: torch.device, under_test: KVCache | None = None):
        self.visibility, self.device, self.under_test = visibility, device, under_test
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer, start_pos, k, v):
        self.k[layer], self.v[layer] = k, v
        return self._attended(layer, k, v)

    def _attended(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.under_test is None:
            return k, v
        try:
            positions, held_k, held_v = read_contents(self.under_test, layer, k.shape[2])
        except (NotImplementedError, ContentsError):  # nothing to read: check_contents reports which
            return k, v
        if torch.equal(positions.cpu(), torch.arange(k.shape[2])) and held_k.shape == k.shape == held_v.shape:
            return held_k.to(k.dtype), held_v.to(v.dtype)
        return k, v

    def mask(self, start_pos, n_new):
        return self_attention_mask(None, start_pos, n_new, self.visibility, self.device)

    def reset(self):
        self.k, self.v = {}, {}

    @property
    def nbytes(self):
        return sum(t.nbytes for t in [*self.k.values(), *self.v.values()])

    def expected_bytes(self, tokens):
        return self.nbytes


def naive_logit_chunks(model: Decoder, prompt: torch.Tensor, tokens: torch.Tensor,
                       visibility: AttentionRule = None) -> Iterator[tuple[int, torch.Tensor]]:
    """What naive recomputation gives at every step of a finished generation, from one causal forward.

    Step i of naive decoding runs the model on prompt + tokens[:i] and keeps the last position's logits.
    In a causal model, position t's output depends on tokens 0..t only, so one forward over
    prompt + tokens[:-1] yields all N of those logits at once (positions P-1 .. P+N-2): the same
    computation without N separate re-runs. tests/test_verify.py checks it against the step-by-step loop.
    Attention is as naive_step(visibility=...) does. Yields (first step, logits (B, c, V))
    in chunks of steps, to bound memory at chunk x vocab.
    """
    n_prompt, n_new = prompt.shape[1], tokens.shape[1]
    sequence = torch.cat([prompt, tokens[:, :-1]], dim=1)  # (B, P+N-1)
    with torch.inference_mode():
        hidden = model.hidden(sequence, visibility=visibility)[:, n_prompt - 1:]  # (B, N, D): positions that chose tokens
        for start in range(0, n_new, LM_HEAD_CHUNK):
            yield start, model.lm_head(hidden[:, start:start + LM_HEAD_CHUNK]).double()  # (B, c, V)


def _span(positions: torch.Tensor) -> str:
    if positions.numel() == 0:
        return "no positions"
    return f"{positions.numel()} positions {int(positions.min())}..{int(positions.max())}"


@torch.inference_mode()
def reference_kv(model: Decoder, sequence: torch.Tensor, visibility: AttentionRule, cache: KVCache) -> KVRecorder:
    """Every layer's K/V from one fresh forward over `sequence` (B, L) (see KVRecorder)."""
    recorder = KVRecorder(visibility, sequence.device, cache)
    model.hidden(sequence, for_model(model, recorder))
    return recorder


def held_positions(visibility: AttentionRule, length: int) -> torch.Tensor:
    """The positions a cache must hold after `length` tokens: every one (causal), the last W (a band of W),
    or those a strategy's visibility rule lets the last query see."""
    if visibility is None:
        return torch.arange(length)
    if callable(visibility):
        keys = torch.arange(length)
        return keys[visibility(keys[-1:], keys)[0]]
    return torch.arange(max(0, length - visibility), length)


def check_contents(cache: KVCache, model: Decoder, sequence: torch.Tensor, visibility: AttentionRule,
                   tol: Tolerance) -> ContentsCheck:
    """Each layer's stored K/V, by position, against those of a fresh forward over the `sequence` (B, L)
    that went through the cache: equal within `tol` (atol + rtol x the vector's largest element: the dtype's
    rounding between two kernels) plus the cache's own storage bound (0 for a lossless cache). A band of W
    keeps only the last W positions."""
    recorder = reference_kv(model, sequence, visibility, cache)
    length = sequence.shape[1]
    want = held_positions(visibility, length)
    result = ContentsCheck()
    for layer in sorted(recorder.k):
        try:
            positions, k, v = read_contents(cache, layer, length)
        except NotImplementedError:
            return ContentsCheck(provided=False)
        except ContentsError as exc:
            result.problem = str(exc)
            return result
        if not torch.equal(positions.cpu(), want):
            result.problem = f"layer {layer} holds {_span(positions.cpu())}, not {_span(want)}"
            return result
        for name, stored, fresh in (("K", k, recorder.k[layer]), ("V", v, recorder.v[layer])):
            _compare_stored(result, cache, f"layer {layer} {name}", stored, fresh[:, :, want.to(fresh.device)], want,
                            tol)
    return result


def _compare_stored(result: ContentsCheck, cache: KVCache, what: str, stored: torch.Tensor, fresh: torch.Tensor,
                    positions: torch.Tensor, tol: Tolerance) -> None:
    if tuple(stored.shape) != tuple(fresh.shape):
        result.problem = result.problem or f"{what} has shape {tuple(stored.shape)}, not {tuple(fresh.shape)}"
        return
    # rounding differences between the two forwards scale with each vector's largest element (low precision
    # rounds the big intermediate values that every element of a head's K or V is summed from)
    magnitude = fresh.double().abs().amax(dim=-1, keepdim=True)  # (B, H, S, 1)
    allowed = cache.storage_bound(fresh).double() + tol.atol + tol.rtol * magnitude  # (B, H, S, hd)
    error = (stored.double() - fresh.double()).abs()
    ratio = error / allowed
    result.worst_ratio = _worst(result.worst_ratio, ratio.max().item())
    bad = ~(ratio <= 1.0)  # NaN is bad
    if result.problem is None and bad.any():
        slot = int(bad.any(dim=3).any(dim=1).any(dim=0).nonzero()[0])  # the first position with a bad element
        worst = ratio[:, :, slot].nan_to_num(math.inf).argmax()  # its worst element
        result.problem = (f"{what} at position {int(positions[slot])} is {error[:, :, slot].flatten()[worst]:.2e} from a "
                          f"fresh forward's (allowed {allowed[:, :, slot].flatten()[worst]:.2e})")


def first_divergence(tokens: torch.Tensor, naive: torch.Tensor, tol: Tolerance, sampling: SamplingSettings = GREEDY,
                     draws: torch.Tensor | None = None, cached: torch.Tensor | None = None) -> Divergence | None:
    """Compare chosen tokens (B, N) with what naive decoding picks from naive logits (B, N, V)."""
    if sampling.greedy:
        return _greedy_divergence(tokens, naive, tol)
    return _sampled_divergence(tokens, naive, cached.double(), draws, sampling)


def _greedy_divergence(tokens: torch.Tensor, naive: torch.Tensor, tol: Tolerance) -> Divergence | None:
    naive_choice = naive.argmax(-1)  # (B, N)
    chosen_logit = naive.gather(-1, tokens[..., None])[..., 0]  # (B, N)
    best_logit = naive.gather(-1, naive_choice[..., None])[..., 0]
    # A tie in the naive logits may legitimately go either way; only a strictly worse choice diverges.
    differs = chosen_logit < best_logit
    if not differs.any():
        return None
    row, step = _first(differs)
    gap = float(best_logit[row, step] - chosen_logit[row, step])
    allowed = float(tol.bound(best_logit[row, step]))
    return Divergence(step, row, int(tokens[row, step]), int(naive_choice[row, step]), gap, gap <= allowed)


def _sampled_divergence(tokens: torch.Tensor, naive: torch.Tensor, cached: torch.Tensor, draws: torch.Tensor,
                        sampling: SamplingSettings) -> Divergence | None:
    """With sampling, naive's choice is the token whose CDF interval holds the same draw u. A different
    choice is a near-tie when u lies within the largest CDF difference between the two distributions of the
    chosen token's interval: any logit difference, however small, can move a boundary that far."""
    naive_probs = filtered_probs(naive, sampling, torch.float64)  # (B, N, V)
    naive_choice = pick(naive_probs, draws.to(naive.device))
    differs = naive_choice != tokens
    if not differs.any():
        return None
    row, step = _first(differs)
    cdf_naive = torch.cumsum(naive_probs[row, step], -1)
    cdf_cached = torch.cumsum(filtered_probs(cached[row, step], sampling, torch.float64), -1)
    slack = (cdf_naive - cdf_cached).abs().max().item() + 1e-6  # + float32 rounding of the run's own pick
    chosen = int(tokens[row, step])
    low = float(cdf_naive[chosen - 1]) if chosen else 0.0
    high, u = float(cdf_naive[chosen]), float(draws[row, step]) * float(cdf_naive[-1])
    gap = max(low - u, u - high, 0.0)
    return Divergence(step, row, chosen, int(naive_choice[row, step]), gap, gap <= slack)


def _first(mask: torch.Tensor) -> tuple[int, int]:
    """(row, step) of the earliest step with a True, the lowest row among equals."""
    step = int(mask.any(dim=0).nonzero()[0])
    return int(mask[:, step].nonzero()[0]), step


def check_generation(model: Decoder, prompt: torch.Tensor, generation: Generation, tol: Tolerance,
                     sampling: SamplingSettings = GREEDY, visibility: AttentionRule = None, cache: KVCache | None = None,
                     label: str = "generation", main: bool = True) -> GenerationCheck:
    """Compare a generation's logits and tokens with naive recomputation on the same token sequence, and the
    cache's contents (when given) with the K/V of that same forward.

    Naive attends by `visibility` (the strategy's baseline: exactness), and when that is not plain causal
    attention, a second pass with full attention measures, for the main generation, how far it drifts."""
    check = GenerationCheck(label, generation.tokens.shape[1], main, tokens=generation.tokens)
    for start, naive in naive_logit_chunks(model, prompt, generation.tokens, visibility):
        steps = slice(start, start + naive.shape[1])
        cached = generation.logits[:, steps].double()
        check.nonfinite = check.nonfinite or find_nonfinite(cached, naive, start)
        check.vs_naive.add(cached, naive, tol)
        if check.divergence is None and check.nonfinite is None:
            draws = generation.draws[:, steps] if generation.draws is not None else None
            check.divergence = first_divergence(generation.tokens[:, steps], naive, tol, sampling, draws, cached)
            if check.divergence is not None:
                check.divergence.step += start
    if cache is not None:
        fed = torch.cat([prompt, generation.tokens[:, :-1]], dim=1)  # (B, P+N-1): what went through the cache
        check.contents = check_contents(cache, model, fed, visibility, contents_tolerance(model))
    if visibility is not None and main:
        check.drift = Agreement()
        for start, full in naive_logit_chunks(model, prompt, generation.tokens):
            check.drift.add(generation.logits[:, start:start + full.shape[1]].double(), full, tol)
    return check


def contents_tolerance(model) -> Tolerance:
    return Tolerance(*CONTENTS_TOLERANCE[dtype_name(model.dtype)])


# --- the generations kv-evaluate runs per strategy --------------------------------------------------------------

REUSE_NEW_TOKENS = 48  # tokens of each extra generation: enough decode steps to read stale state
REUSE_SEED = 1009  # seeds of the extra generations' prompts: fixed, so that a failure reproduces


@dataclass(frozen=True)
class PlannedGeneration:
    label: str
    prompt: torch.Tensor  # (B, P)
    new_tokens: int
    fresh_cache: bool  # a new cache object; otherwise the previous one, reset, as generate and benchmark reuse it
    main: bool = False
    rows: list[torch.Tensor] | None = None  # a ragged batch: each row's own prompt (prompt is them left-padded)
    pads: torch.Tensor | None = None  # (B,) the padding of each row
    stops: RowStops | None = None  # rows that stop at different steps: each checked alone up to its stop

    @property
    def row_prompts(self) -> list[torch.Tensor] | None:
        """The prompts of rows checked one by one (a ragged batch, or rows with their own stops); else None."""
        return self.rows if self.rows is not None or self.stops is None else list(self.prompt)


def generation_plan(prompt: torch.Tensor | list[torch.Tensor], new_tokens: int, vocab: int, window: int,
                    ragged: bool = True, stops: RowStops | None = None) -> list[PlannedGeneration]:
    """The generations each cache strategy goes through, in order, one cache object reused across the first
    three: short then long (the run asked for) then short again with a prompt longer than the sliding window
    where it fits (the long-prompt prefill), then a batch of one more row, different prompts per row (a row
    broadcast hides at batch 1), then (decoders) a ragged batch: rows of different prompt lengths, left-padded,
    each row checked against naive generation of that row alone. Every one fits the run asked for: no longer
    prompt + tokens than it. A list of prompts (rows of different lengths) makes the run asked for ragged;
    `stops` makes its rows stop at different steps, each checked alone up to its own stop."""
    rows, pads = (prompt, None) if isinstance(prompt, list) else (None, None)
    if rows is not None:
        prompt, pads = left_pad(rows)
    batch, n_prompt = prompt.shape
    short = min(new_tokens, REUSE_NEW_TOKENS)
    long_prompt = max(1, min(window + 8, n_prompt + new_tokens - short))
    ids = lambda rows, length, i: random_ids(vocab, rows, length, REUSE_SEED + i).to(prompt.device)  # noqa: E731
    plan = [
        PlannedGeneration(f"fresh cache, {short} tokens", ids(batch, max(1, n_prompt // 2), 0), short, True),
        PlannedGeneration(f"{new_tokens} tokens as asked, the cache reused" + stops_text(stops) + (
                          ", each row against itself alone" if rows or stops else ""), prompt, new_tokens, False,
                          True, rows=rows, pads=pads, stops=stops),
        PlannedGeneration(f"cache reused after the long run, {long_prompt}-token prompt", ids(batch, long_prompt, 1),
                          short, False),
        PlannedGeneration(f"{batch + 1} rows, different prompts", ids(batch + 1, n_prompt, 2), short, True),
    ]
    longest = min(max(n_prompt, 4), n_prompt + new_tokens - short)
    lengths = sorted({longest, max(1, longest // 2), max(1, longest // 4)}, reverse=True)
    if ragged and len(lengths) > 1:
        rows = [ids(1, length, 3 + i)[0] for i, length in enumerate(lengths)]
        padded, pads = left_pad(rows)
        plan.append(PlannedGeneration(f"ragged batch, prompts of {'/'.join(map(str, lengths))} tokens, each row "
                                      "against itself alone", padded, short, True, rows=rows, pads=pads))
    return plan


def stops_text(stops: RowStops | None) -> str:
    if stops is None:
        return ""
    own = f"rows stopping after {'/'.join(map(str, stops.new_tokens))} tokens" if stops.new_tokens else ""
    eos = f"rows stopping at EOS id {stops.eos_id}" if stops.eos_id is not None else ""
    return ", " + (f"{own} or at EOS id {stops.eos_id}" if own and eos else own or eos)


def run_planned(strategy: Strategy, model, planned: PlannedGeneration, cache: KVCache | None, tol: Tolerance,
                sampling: SamplingSettings, visibility: AttentionRule,
                on_step: Callable[[Step], None] | None, prefill_chunk: int | None = None,
                rollback: Rollback | None = None) -> list[GenerationCheck]:
    """Generate as planned and check it; a cache that raises fails its check instead of stopping the others."""
    try:
        generation = generate(model, planned.prompt, planned.new_tokens, strategy, keep_logits=True,
                              sampling=sampling, on_step=on_step, visibility=visibility, cache=cache, pads=planned.pads,
                              prefill_chunk=prefill_chunk, rollback=rollback, stops=planned.stops)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  (a broken cache, a plugin's bug: report it as the failure it is)
        return [GenerationCheck(planned.label, planned.new_tokens, planned.main, error=f"{type(exc).__name__}: {exc}")]
    rows = planned.row_prompts
    if rows is None:
        return [check_generation(model, planned.prompt, generation, tol, sampling, visibility, cache,
                                 planned.label, planned.main)]
    return [check_generation(model, row[None], row_of(generation, r), tol, sampling, visibility, None,
                             f"{planned.label}: row {r} ({len(row)}-token prompt"
                             + (f", {generation.lengths[r]} tokens)" if generation.lengths else ")"), planned.main)
            for r, row in enumerate(rows)]


def row_of(generation: Generation, row: int) -> Generation:
    """One row of a batch's generation, as if it had been generated alone (B = 1), up to its own stop."""
    end = generation.lengths[row] if generation.lengths else generation.tokens.shape[1]
    pick = lambda t: None if t is None else t[row:row + 1, :end]  # noqa: E731
    return Generation(pick(generation.tokens), pick(generation.logits), pick(generation.draws))


def check_strategy(model, prompt: torch.Tensor | list[torch.Tensor], new_tokens: int, strategy: Strategy,
                   tol: Tolerance,
                   sampling: SamplingSettings, window: int | None,
                   on_step: Callable[[int], None] | None, prefill_chunk: int | None = None,
                   rollback: Rollback | None = None, stops: RowStops | None = None) -> StrategyCheck:
    """Run a strategy through its plan (naive: the run asked for only) and judge every generation."""
    size = window_of(model.config, window)
    baseline = strategy.baseline(size)  # naive attends as the strategy does: causal, banded, or by its own rule
    plan = generation_plan(prompt, new_tokens, model.config.vocab_size, size,
                           ragged=not reads_source(model.config) and strategy.ragged, stops=stops)
    if not strategy.cached:  # no cache to reuse: the run asked for only
        plan = [dataclasses.replace(p, label=f"{new_tokens} tokens as asked") for p in plan if p.main]
    total = sum(p.new_tokens for p in plan)
    callback = (lambda step: on_step(total)) if on_step else None
    cache, checks = None, []
    longest = max(len(row) for row in prompt) if isinstance(prompt, list) else prompt.shape[1]
    for i, planned in enumerate(plan):
        # every other generation gets its own encoder-decoder source too: a reset that kept the last
        # source's encoder output would then show
        runner = model if planned.main else with_batch(model, planned.prompt.shape[0], REUSE_SEED + i)
        if planned.fresh_cache or cache is None:
            cache = new_cache(runner, strategy, planned.prompt.shape[0], cache_tokens(longest, new_tokens), size,
                              rollback.tokens if rollback else 0)
        checks.extend(run_planned(strategy, runner, planned, cache, tol, sampling, baseline, callback, prefill_chunk,
                                  rollback))
    return StrategyCheck(strategy.name, strategy.exact, strategy.thresholds_for(model.dtype), checks)


def kv_evaluate(model: Decoder, prompt: torch.Tensor | list[torch.Tensor], new_tokens: int,
                strategies: list[Strategy | str],
                tol: Tolerance,
                sampling: SamplingSettings = GREEDY, window: int | None = None,
                on_step: Callable[[str, int], None] | None = None,
                prefill_chunk: int | None = None, rollback: Rollback | None = None,
                stops: RowStops | None = None) -> list[StrategyCheck]:
    """Generate with each strategy and check logits, tokens and cache contents against naive recomputation,
    over several generations per cache object (see generation_plan). on_step(strategy, total) after each
    step, with the total number of steps that strategy will run. `prefill_chunk`: every prompt enters the
    cache that many tokens at a time. `prompt` as a list of 1-D prompts of different lengths: the run asked
    for is a ragged batch, each row checked against that row generated alone. `stops`: the rows of the run
    asked for stop at different steps, each checked alone up to its own stop."""
    checks = []
    for strategy in map(resolve, strategies):
        callback = (lambda total, s=strategy.name: on_step(s, total)) if on_step else None
        checks.append(check_strategy(model, prompt, new_tokens, strategy, tol, sampling, window, callback,
                                     prefill_chunk, rollback, stops))
    return checks
