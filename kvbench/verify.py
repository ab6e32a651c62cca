"""evaluate and kv-evaluate as functions that return result objects. Nothing here prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvbench.config import AnyConfig, Seq2SeqConfig
from kvbench.errors import KVBenchError
from kvbench.generate import GREEDY, Generation, Step, generate, random_ids
from kvbench.model import Decoder
from kvbench.seq2seq import Seq2Seq
from kvbench.precision import QUANTIZED_THRESHOLDS, dtype_name
from kvbench.reference import reference_logits, reference_seq2seq_logits
from kvbench.sampling import SamplingSettings, filtered_probs, pick

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


def compare_logits(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Comparison:
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    large = expected.abs() > tol.atol
    max_rel = (diff[large] / expected.abs()[large]).max().item() if large.any() else 0.0
    worst = (diff / tol.bound(expected)).max().item()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).double().mean().item()
    return Comparison(name, diff.max().item(), max_rel, agreement, worst, bool(worst <= 1.0))


# --- expected-logits files -------------------------------------------------------------------------------------

@dataclass
class EvalInputs:
    """What evaluate feeds the model: token ids (B, T), and for an encoder-decoder source ids (B, S)."""

    input_ids: torch.Tensor
    src_ids: torch.Tensor | None = None


def write_expected(path: Path, inputs: EvalInputs, logits: torch.Tensor) -> None:
    tensors = {"input_ids": inputs.input_ids.to(torch.int64).contiguous(),
               "logits": logits.to(torch.float32).contiguous()}
    if inputs.src_ids is not None:
        tensors["src_ids"] = inputs.src_ids.to(torch.int64).contiguous()
    save_file(tensors, str(path))


def read_expected(path: Path, config: AnyConfig) -> tuple[EvalInputs, torch.Tensor]:
    """Inputs and logits (B, T, V) float32 from an expected file, checked against the config."""
    if not path.is_file():
        raise KVBenchError(f"expected file '{path}' not found; create one with --write-expected")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise KVBenchError(f"expected file '{path}' is not a valid safetensors file ({exc})") from None
    seq2seq = isinstance(config, Seq2SeqConfig)
    for key in ("input_ids", "logits", *(["src_ids"] if seq2seq else [])):
        if key not in tensors:
            raise KVBenchError(f"expected file '{path}' has no '{key}' tensor; it needs input_ids and logits"
                               + (" and src_ids (an encoder-decoder config)" if seq2seq else ""))
    ids, logits = tensors["input_ids"], tensors["logits"]
    inputs = EvalInputs(ids, tensors["src_ids"] if seq2seq else None)
    for name, t in (("input_ids", ids), ("src_ids", inputs.src_ids)):
        if t is not None and (t.dtype != torch.int64 or t.dim() != 2 or t.shape[0] != ids.shape[0]):
            raise KVBenchError(f"expected file '{path}': {name} must be int64 (B, T), got {t.dtype} {tuple(t.shape)}")
    if tuple(logits.shape) != (*ids.shape, config.vocab_size):
        raise KVBenchError(f"expected file '{path}': logits shape {tuple(logits.shape)} does not match input_ids "
                           f"{tuple(ids.shape)} and vocab_size {config.vocab_size}; was it made for this config?")
    check_prompt(ids, config.vocab_size, config, f"expected file '{path}'")
    if seq2seq:
        check_prompt(inputs.src_ids, config.src_vocab_size, config, f"expected file '{path}' (src_ids)")
    return inputs, logits.float()


def check_prompt(ids: torch.Tensor, vocab: int, config: AnyConfig, origin: str) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
        raise KVBenchError(f"{origin}: token ids must lie in 0..{vocab - 1}")
    if config.positional == "learned" and ids.shape[1] > config.max_seq_len:
        raise KVBenchError(f"{origin}: {ids.shape[1]} tokens exceed max_seq_len {config.max_seq_len}")


def random_prompt(config: AnyConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded random (target) token ids (B, P): the same prompt for the same seed, whatever the device."""
    return random_ids(config.vocab_size, batch, length, seed)


def random_inputs(config: AnyConfig, batch: int, length: int, src_len: int, seed: int) -> EvalInputs:
    """A seeded prompt, plus for an encoder-decoder a source drawn with seed + 1 (as for_generation does)."""
    src = random_ids(config.src_vocab_size, batch, src_len, seed + 1) if isinstance(config, Seq2SeqConfig) else None
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
    if inputs.src_ids is not None:
        return torch.from_numpy(reference_seq2seq_logits(weights, config, inputs.src_ids.numpy(),
                                                         inputs.input_ids.numpy()))
    return torch.from_numpy(reference_logits(weights, config, inputs.input_ids.numpy()))


def evaluate(model: Decoder | Seq2Seq, cpu_weights: dict[str, torch.Tensor], inputs: EvalInputs, tol: Tolerance,
             expected: torch.Tensor | None = None) -> tuple[EvaluateResult, torch.Tensor]:
    """Compare the model's logits at every prompt position with the NumPy reference (and expected logits).

    Returns the result and the reference logits (for --write-expected).
    """
    device = model.lm_head.weight.device
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


# --- kv-evaluate ------------------------------------------------------------------------------------------------

@dataclass
class Agreement:
    """How close a run's logits are to reference logits, over every step and row."""

    max_abs: float = 0.0  # max |run - reference|
    worst_ratio: float = 0.0  # max |run - reference| / (atol + rtol |reference|): <= 1 is within tolerance
    mean_kl: float = 0.0  # mean KL(reference || run) of the softmax distributions, in nats
    top1: float = 1.0  # fraction of (step, row) whose argmax agrees
    _count: int = field(default=0, repr=False)

    def add(self, run: torch.Tensor, reference: torch.Tensor, tol: Tolerance) -> None:
        """Fold in a chunk of logits (B, c, V), both float64."""
        diff = (run - reference).abs()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.worst_ratio = max(self.worst_ratio, (diff / tol.bound(reference)).max().item())
        log_ref, log_run = torch.log_softmax(reference, -1), torch.log_softmax(run, -1)
        kl = (log_ref.exp() * (log_ref - log_run)).sum(-1)  # (B, c)
        agree = (run.argmax(-1) == reference.argmax(-1)).double()
        n, m = self._count, kl.numel()
        self.mean_kl = (self.mean_kl * n + kl.sum().item()) / (n + m)
        self.top1 = (self.top1 * n + agree.sum().item()) / (n + m)
        self._count = n + m


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
class StrategyCheck:
    strategy: str
    new_tokens: int
    exact: bool  # judged by tolerance; otherwise (quantized) by the KL and top-1 thresholds
    vs_naive: Agreement
    divergence: Divergence | None = None
    drift: Agreement | None = None  # sliding only: against full attention, for information
    tokens: torch.Tensor | None = field(default=None, repr=False)  # (B, N)
    max_mean_kl: float = 0.0  # the thresholds an inexact strategy is held to (precision.QUANTIZED_THRESHOLDS)
    min_top1: float = 1.0

    @property
    def max_abs(self) -> float:
        return self.vs_naive.max_abs

    @property
    def worst_ratio(self) -> float:
        return self.vs_naive.worst_ratio

    @property
    def logits_ok(self) -> bool:
        if self.exact:
            return self.vs_naive.worst_ratio <= 1.0
        return self.vs_naive.mean_kl <= self.max_mean_kl and self.vs_naive.top1 >= self.min_top1

    @property
    def passed(self) -> bool:
        tokens_ok = self.divergence is None or self.divergence.near_tie or not self.exact
        return self.logits_ok and tokens_ok


def naive_logit_chunks(model: Decoder, prompt: torch.Tensor, tokens: torch.Tensor,
                       window: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """What naive recomputation gives at every step of a finished generation, from one causal forward.

    Step i of naive decoding runs the model on prompt + tokens[:i] and keeps the last position's logits.
    In a causal model, position t's output depends on tokens 0..t only, so one forward over
    prompt + tokens[:-1] yields all N of those logits at once (positions P-1 .. P+N-2): the same
    computation without N separate re-runs. tests/test_verify.py checks it against the step-by-step loop.
    With `window`, attention is banded as naive_step(window=...) does. Yields (first step, logits (B, c, V))
    in chunks of steps, to bound memory at chunk x vocab.
    """
    n_prompt, n_new = prompt.shape[1], tokens.shape[1]
    sequence = torch.cat([prompt, tokens[:, :-1]], dim=1)  # (B, P+N-1)
    with torch.inference_mode():
        hidden = model.hidden(sequence, window=window)[:, n_prompt - 1:]  # (B, N, D): positions that chose tokens
        for start in range(0, n_new, LM_HEAD_CHUNK):
            yield start, model.lm_head(hidden[:, start:start + LM_HEAD_CHUNK]).double()  # (B, c, V)


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


def check_generation(strategy: str, model: Decoder, prompt: torch.Tensor, generation: Generation, tol: Tolerance,
                     sampling: SamplingSettings = GREEDY, window: int | None = None) -> StrategyCheck:
    """Compare a generation's logits and tokens with naive recomputation on the same token sequence.

    For sliding, naive attends within the same window (exactness), and a second pass with full attention
    measures how far the window drifts from it."""
    sliding = is_sliding(strategy)
    max_kl, min_top1 = QUANTIZED_THRESHOLDS[dtype_name(model.lm_head.weight.dtype)]
    check = StrategyCheck(strategy, generation.tokens.shape[1], not strategy.startswith("quantized"), Agreement(),
                          tokens=generation.tokens, max_mean_kl=max_kl, min_top1=min_top1)
    for start, naive in naive_logit_chunks(model, prompt, generation.tokens, window if sliding else None):
        steps = slice(start, start + naive.shape[1])
        cached = generation.logits[:, steps].double()
        check.vs_naive.add(cached, naive, tol)
        if check.divergence is None:
            draws = generation.draws[:, steps] if generation.draws is not None else None
            check.divergence = first_divergence(generation.tokens[:, steps], naive, tol, sampling, draws, cached)
            if check.divergence is not None:
                check.divergence.step += start
    if sliding:
        check.drift = Agreement()
        for start, full in naive_logit_chunks(model, prompt, generation.tokens):
            check.drift.add(generation.logits[:, start:start + full.shape[1]].double(), full, tol)
    return check


def is_sliding(strategy: str) -> bool:
    return strategy.startswith("sliding")  # "sliding", or an encoder-decoder's "sliding+self-only"


def kv_evaluate(model: Decoder, prompt: torch.Tensor, new_tokens: int, strategies: list[str], tol: Tolerance,
                sampling: SamplingSettings = GREEDY, window: int | None = None,
                on_step: Callable[[str, Step], None] | None = None) -> list[StrategyCheck]:
    """Generate with each strategy and check logits and tokens against naive recomputation."""
    checks = []
    for strategy in strategies:
        callback = (lambda step, s=strategy: on_step(s, step)) if on_step else None
        generation = generate(model, prompt, new_tokens, strategy, keep_logits=True, sampling=sampling,
                              on_step=callback, window=window if is_sliding(strategy) else None)
        checks.append(check_generation(strategy, model, prompt, generation, tol, sampling, window))
    return checks
