"""evaluate and kv-evaluate as functions that return result objects. Nothing here prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvbench.config import ModelConfig
from kvbench.errors import KVBenchError
from kvbench.generate import Generation, Step, generate
from kvbench.model import Decoder
from kvbench.reference import reference_logits

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

def write_expected(path: Path, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
    save_file({"input_ids": input_ids.to(torch.int64).contiguous(),
               "logits": logits.to(torch.float32).contiguous()}, str(path))


def read_expected(path: Path, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) int64 and logits (B, T, V) float32 from an expected file, checked against the config."""
    if not path.is_file():
        raise KVBenchError(f"expected file '{path}' not found; create one with --write-expected")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise KVBenchError(f"expected file '{path}' is not a valid safetensors file ({exc})") from None
    for key in ("input_ids", "logits"):
        if key not in tensors:
            raise KVBenchError(f"expected file '{path}' has no '{key}' tensor; it needs input_ids and logits")
    ids, logits = tensors["input_ids"], tensors["logits"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise KVBenchError(f"expected file '{path}': input_ids must be int64 (B, T), got {ids.dtype} {tuple(ids.shape)}")
    if tuple(logits.shape) != (*ids.shape, config.vocab_size):
        raise KVBenchError(f"expected file '{path}': logits shape {tuple(logits.shape)} does not match input_ids "
                           f"{tuple(ids.shape)} and vocab_size {config.vocab_size}; was it made for this config?")
    check_prompt(ids, config, f"expected file '{path}'")
    return ids, logits.float()


def check_prompt(ids: torch.Tensor, config: ModelConfig, origin: str) -> None:
    if ids.numel() and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise KVBenchError(f"{origin}: token ids must lie in 0..{config.vocab_size - 1}")
    if config.positional == "learned" and ids.shape[1] > config.max_seq_len:
        raise KVBenchError(f"{origin}: {ids.shape[1]} tokens exceed max_seq_len {config.max_seq_len}")


def random_prompt(config: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded random token ids (B, P): the same prompt for the same seed, whatever the device."""
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- evaluate ---------------------------------------------------------------------------------------------------

@dataclass
class EvaluateResult:
    input_ids: torch.Tensor
    comparisons: list[Comparison]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)


def numpy_reference(cpu_weights: dict[str, torch.Tensor], config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    weights = {name: t.double().numpy() for name, t in cpu_weights.items()}
    return torch.from_numpy(reference_logits(weights, config, ids.numpy()))


def evaluate(model: Decoder, cpu_weights: dict[str, torch.Tensor], input_ids: torch.Tensor, tol: Tolerance,
             expected: torch.Tensor | None = None) -> tuple[EvaluateResult, torch.Tensor]:
    """Compare the model's logits at every prompt position with the NumPy reference (and expected logits).

    Returns the result and the reference logits (for --write-expected).
    """
    device = model.lm_head.weight.device
    with torch.inference_mode():
        logits = model(input_ids.to(device)).float().cpu()  # (B, T, V)
    reference = numpy_reference(cpu_weights, model.config, input_ids)
    comparisons = [compare_logits("torch vs NumPy reference", logits, reference, tol)]
    if expected is not None:
        comparisons.append(compare_logits("torch vs expected", logits, expected, tol))
        comparisons.append(compare_logits("NumPy reference vs expected", reference, expected, tol))
    return EvaluateResult(input_ids, comparisons), reference


# --- kv-evaluate ------------------------------------------------------------------------------------------------

@dataclass
class Divergence:
    """The first step where a strategy chose a different token than naive decoding would have."""

    step: int
    row: int
    chosen: int  # what the strategy chose
    naive_choice: int  # what naive decoding chooses from its logits at that step
    gap: float  # naive logit of naive_choice minus naive logit of chosen (>= 0)
    near_tie: bool  # gap within tolerance: float rounding, not a cache bug


@dataclass
class StrategyCheck:
    strategy: str
    new_tokens: int
    max_abs: float  # max |strategy logits - naive logits| over every step, row and vocab entry
    worst_ratio: float  # max diff / (atol + rtol |naive|): <= 1 means logits within tolerance
    divergence: Divergence | None = None
    tokens: torch.Tensor | None = field(default=None, repr=False)  # (B, N)

    @property
    def logits_ok(self) -> bool:
        return self.worst_ratio <= 1.0

    @property
    def passed(self) -> bool:
        return self.logits_ok and (self.divergence is None or self.divergence.near_tie)


def naive_logit_chunks(model: Decoder, prompt: torch.Tensor, tokens: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """What naive recomputation gives at every step of a finished generation, from one causal forward.

    Step i of naive decoding runs the model on prompt + tokens[:i] and keeps the last position's logits.
    In a causal model, position t's output depends on tokens 0..t only, so one forward over
    prompt + tokens[:-1] yields all N of those logits at once (positions P-1 .. P+N-2): the same
    computation without N separate re-runs. tests/test_verify.py checks it against the step-by-step loop.
    Yields (first step, logits (B, c, V)) in chunks of steps, to bound memory at chunk x vocab.
    """
    n_prompt, n_new = prompt.shape[1], tokens.shape[1]
    sequence = torch.cat([prompt, tokens[:, :-1]], dim=1)  # (B, P+N-1)
    with torch.inference_mode():
        hidden = model.hidden(sequence)[:, n_prompt - 1:]  # (B, N, D): the positions that chose new tokens
        for start in range(0, n_new, LM_HEAD_CHUNK):
            yield start, model.lm_head(hidden[:, start:start + LM_HEAD_CHUNK]).double()  # (B, c, V)


def first_divergence(tokens: torch.Tensor, naive: torch.Tensor, tol: Tolerance) -> Divergence | None:
    """Compare chosen tokens (B, N) with naive's greedy choice from naive logits (B, N, V)."""
    naive_choice = naive.argmax(-1)  # (B, N)
    chosen_logit = naive.gather(-1, tokens[..., None])[..., 0]  # (B, N)
    best_logit = naive.gather(-1, naive_choice[..., None])[..., 0]
    # A tie in the naive logits may legitimately go either way; only a strictly worse choice diverges.
    differs = chosen_logit < best_logit
    if not differs.any():
        return None
    step = int(differs.any(dim=0).nonzero()[0])
    row = int(differs[:, step].nonzero()[0])
    gap = float(best_logit[row, step] - chosen_logit[row, step])
    allowed = float(tol.bound(best_logit[row, step]))
    return Divergence(step, row, int(tokens[row, step]), int(naive_choice[row, step]), gap, gap <= allowed)


def check_generation(strategy: str, model: Decoder, prompt: torch.Tensor, generation: Generation,
                     tol: Tolerance) -> StrategyCheck:
    """Compare a generation's logits and tokens with naive recomputation on the same token sequence."""
    check = StrategyCheck(strategy, generation.tokens.shape[1], 0.0, 0.0, None, generation.tokens)
    for start, naive in naive_logit_chunks(model, prompt, generation.tokens):
        steps = slice(start, start + naive.shape[1])
        diff = (generation.logits[:, steps].double() - naive).abs()  # (B, c, V)
        check.max_abs = max(check.max_abs, diff.max().item())
        check.worst_ratio = max(check.worst_ratio, (diff / tol.bound(naive)).max().item())
        if check.divergence is None:
            check.divergence = first_divergence(generation.tokens[:, steps], naive, tol)
            if check.divergence is not None:
                check.divergence.step += start
    return check


def kv_evaluate(model: Decoder, prompt: torch.Tensor, new_tokens: int, strategies: list[str], tol: Tolerance,
                on_step: Callable[[str, Step], None] | None = None) -> list[StrategyCheck]:
    """Generate with each strategy and check logits and tokens against naive recomputation."""
    checks = []
    for strategy in strategies:
        callback = (lambda step, s=strategy: on_step(s, step)) if on_step else None
        generation = generate(model, prompt, new_tokens, strategy, keep_logits=True, on_step=callback)
        checks.append(check_generation(strategy, model, prompt, generation, tol))
    return checks
