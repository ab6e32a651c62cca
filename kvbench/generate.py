"""Generation: prefill, decode_one, and the step loop shared by every strategy (naive included).

A generation of N new tokens is one prefill (the prompt's forward, which yields the first new token) and
N - 1 decode steps. `generation_steps` yields after each of them, so that callers can time, check or
stream every token without a second implementation of the loop.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from kvbench.cache import KVCache
from kvbench.errors import KVBenchError
from kvbench.model import AttentionRule, Decoder, random_ids  # noqa: F401  (random_ids: part of generate's surface)
from kvbench.sampling import SamplingSettings, Sampler, greedy
from kvbench.strategies import CacheShape, Strategy, resolve

GREEDY = SamplingSettings()

Chooser = Callable[[torch.Tensor], torch.Tensor]  # logits (B, V) -> token ids (B,)


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths as one batch (B, P_max), each row padded on the left, and the padding
    of each row (B,); None when every prompt has the same length (no padding, the fast paths stay).

    Left padding lines up every row's last prompt token in the last column, so one prefill ends every row
    and each decode step writes one column for all rows; positions and masks count from each row's start."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=prompts[0].dtype, device=prompts[0].device)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = p
    pads = torch.tensor([longest - len(p) for p in prompts], device=prompts[0].device)  # (B,)
    return ids, (pads if bool(pads.any()) else None)


def prefill(model: Decoder, prompt: torch.Tensor, cache: KVCache, pads: torch.Tensor | None = None,
            chunk: int | None = None) -> torch.Tensor:
    """Run the whole prompt (B, P) through the model, filling the cache; logits (B, V) of its last position.
    With `chunk`, the prompt enters `chunk` tokens per forward (multi-token updates at a non-zero position,
    as servers prefill long prompts)."""
    n_prompt = prompt.shape[1]
    step = chunk or n_prompt
    for start in range(0, n_prompt, step):
        logits = model(prompt[:, start:start + step], cache, start_pos=start, last_only=True, pads=pads)
    return logits[:, -1]


def decode_one(model: Decoder, token: torch.Tensor, cache: KVCache, pos: int,
               pads: torch.Tensor | None = None) -> torch.Tensor:
    """One token per sequence (B,) at column pos, attending to the cache; logits (B, V)."""
    return model(token[:, None], cache, start_pos=pos, last_only=True, pads=pads)[:, -1]


def naive_step(model: Decoder, ids: torch.Tensor, visibility: AttentionRule = None,
               pads: torch.Tensor | None = None) -> torch.Tensor:
    """The baseline: recompute the whole sequence (B, t), same kernels, logits of the last position only.
    `visibility` is the attention a strategy is checked against (Strategy.baseline): banded for sliding,
    and the whole sequence is still recomputed (with several layers, a token depends on more than the
    band's positions back)."""
    return model(ids, None, start_pos=0, last_only=True, visibility=visibility, pads=pads)[:, -1]


# (model, token, cache, column, pads) -> logits
Decode = Callable[[Decoder, torch.Tensor, KVCache, int, "torch.Tensor | None"], torch.Tensor]


def _decode_at(model: Decoder, token: torch.Tensor, cache: KVCache, position: torch.Tensor,
               pads: torch.Tensor | None) -> torch.Tensor:
    return model(token[:, None], cache, start_pos=position, last_only=True, pads=pads)[:, -1]


class CompiledDecode:
    """decode_one compiled with torch.compile, the position passed as a device tensor.

    Fixed shapes (the static cache in its fixed-shape mode, a 0-d position tensor updated in place) mean one
    compilation serves every step and every length; on CUDA, mode="reduce-overhead" captures the step in a
    CUDA graph, removing the per-kernel launch cost that dominates a small model's decode step.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.step = torch.compile(_decode_at, mode="reduce-overhead" if self.cuda else None, fullgraph=True,
                                  dynamic=False)
        self.graph_skips = cuda_graph_skips()
        self.marked = lambda: None  # the cache whose buffers were marked last (weakly): not every timed step

    def __call__(self, model: Decoder, token: torch.Tensor, cache: KVCache, pos: int,
                 pads: torch.Tensor | None = None) -> torch.Tensor:
        self.position.fill_(pos)  # a kernel argument, not a host-to-device copy: no sync
        if self.marked() is not cache:
            mark_fixed_addresses(cache)
            self.marked = weakref.ref(cache)
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        # CUDA-graph outputs live in buffers the next replay overwrites: callers may keep logits, so copy
        logits = self.step(model, token, cache, self.position, pads).clone()
        if self.cuda:
            require_cuda_graph(self.graph_skips)
        return logits


def mark_fixed_addresses(cache: KVCache) -> None:
    """Tell torch.compile that the cache's buffers keep their addresses. The compiled step writes them in place,
    and a CUDA graph may mutate only such inputs: unmarked, inductor ran the step without a graph, saying why
    only in a log off by default. Unguarded: a new cache (kv-evaluate makes several) re-records the graph
    rather than recompiling. Here, not when a cache is built: marking imports torch._dynamo (about a second),
    which an eager run never needs."""
    for buffer in cache.fixed_buffers():
        torch._dynamo.mark_static_address(buffer, guard=False)


def cuda_graph_skips() -> int:
    """How many times inductor has declined a CUDA graph in this process (it then runs the compiled kernels
    without one, and says why only in a log that is off by default)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def require_cuda_graph(skips_before: int) -> None:
    """Stop if the compiled step runs without a CUDA graph: its times would be reported as a graph's."""
    if cuda_graph_skips() > skips_before:
        raise KVBenchError("torch.compile ran the decode step without a CUDA graph, so static+compile would not "
                           "measure one: rerun with TORCH_LOGS=perf_hints to see why, or leave out --compile")


_compiled: dict[torch.device, CompiledDecode] = {}


def decoder_for(strategy: Strategy | str, device: torch.device) -> Decode:
    """The decode step a strategy uses: compiled for a compiled strategy, eager otherwise."""
    if not resolve(strategy).compiled:
        return decode_one
    if device not in _compiled:
        _compiled[device] = CompiledDecode(device)
    return _compiled[device]


@dataclass(frozen=True)
class Rollback:
    """Speculative decoding's rejected drafts: every `every` steps, `tokens` random draft tokens go through the
    cache at the next position (one multi-token forward) and are then rolled back with crop(), before the
    real token is decoded there. Whatever the drafts left behind must not change a single logit."""

    tokens: int
    every: int = 5
    seed: int = 0

    def most_tokens(self, new_tokens: int) -> int:
        """The longest drafts a generation of new_tokens takes: the first go in at step `every` and must end
        before the last token fed back (step i writes at column P + i - 1, the last at P + new_tokens - 2)."""
        return new_tokens - self.every

    def drafts(self, batch: int, vocab: int, device: torch.device) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield torch.randint(0, vocab, (batch, self.tokens), generator=generator).to(device)  # (B, K)


@dataclass(frozen=True)
class RowStops:
    """Rows of a batch that stop at different steps: row b after its own new_tokens[b] tokens, or after it
    emits eos_id, whichever comes first. A finished row stops growing its cache (cache.release(row): the
    paged cache returns its blocks to the pool); the batch goes on until its last row finishes, the finished
    rows' later tokens computed with the batch (one column per step) and ignored."""

    new_tokens: tuple[int, ...] | None = None  # per row; None: every row the run's new_tokens
    eos_id: int | None = None

    def limits(self, batch: int, new_tokens: int) -> list[int]:
        if self.new_tokens is None:
            return [new_tokens] * batch
        if len(self.new_tokens) != batch:
            raise ValueError(f"{len(self.new_tokens)} per-row token counts for a batch of {batch} rows")
        return [min(n, new_tokens) for n in self.new_tokens]

    def lengths(self, tokens: torch.Tensor) -> list[int]:
        """Each row's new tokens up to its stop, from the tokens (B, N) a generation chose."""
        limits = self.limits(tokens.shape[0], tokens.shape[1])
        if self.eos_id is not None:
            for row, ids in enumerate(tokens.tolist()):
                if self.eos_id in ids[:limits[row]]:
                    limits[row] = ids.index(self.eos_id) + 1  # the EOS is the row's last token
        return limits


class Finishing:
    """Which rows have stopped so far, during a generation; releases each one's cache as it stops."""

    def __init__(self, stops: RowStops | None, batch: int, new_tokens: int, cache: KVCache | None):
        self.stops, self.cache = stops, cache
        self.limits = stops.limits(batch, new_tokens) if stops else [new_tokens] * batch
        self.open = set(range(batch))

    def after(self, index: int, token: torch.Tensor) -> bool:
        """Step `index` chose `token` (B,): release the rows that stop here; True once every row has stopped."""
        eos = self.stops.eos_id if self.stops else None
        hit = (token == eos).tolist() if eos is not None else None  # one host sync per step, only with an EOS
        stopping = [row for row in sorted(self.open) if index + 1 >= self.limits[row] or (hit and hit[row])]
        self.open.difference_update(stopping)
        if self.open and self.cache is not None:  # the rows stopping with the last are kept: the cache is
            for row in stopping:  # the generation's result until reset() (contents are checked, memory read)
                self.cache.release(row)
        return not self.open


@dataclass
class Step:
    index: int  # 0 is the prefill
    logits: torch.Tensor  # (B, V) that chose `token`
    token: torch.Tensor  # (B,)


@torch.inference_mode()
def generation_steps(model: Decoder, prompt: torch.Tensor, new_tokens: int, cache: KVCache | None,
                     choose: Chooser = greedy, decode: Decode = decode_one, visibility: AttentionRule = None,
                     pads: torch.Tensor | None = None, prefill_chunk: int | None = None,
                     rollback: Rollback | None = None, stops: RowStops | None = None) -> Iterator[Step]:
    """Yield each new token; cache None means naive recomputation, attending as `visibility` says.
    The cache is reset first. `pads`: a left-padded ragged batch (see left_pad); `prefill_chunk`: the
    prompt enters the cache that many tokens at a time; `rollback`: rejected drafts written and rolled back;
    `stops`: rows that stop at different steps (the generation ends when the last one does)."""
    finishing = Finishing(stops, prompt.shape[0], new_tokens, cache)
    steps = (_naive_steps(model, prompt, new_tokens, choose, visibility, pads) if cache is None else
             _cached_steps(model, prompt, new_tokens, cache, choose, decode, pads, prefill_chunk, rollback))
    for step in steps:
        yield step
        if finishing.after(step.index, step.token):
            return


def _cached_steps(model: Decoder, prompt: torch.Tensor, new_tokens: int, cache: KVCache, choose: Chooser,
                  decode: Decode, pads: torch.Tensor | None, prefill_chunk: int | None,
                  rollback: Rollback | None) -> Iterator[Step]:
    cache.reset()
    n_prompt = prompt.shape[1]
    last_column = n_prompt + new_tokens - 2  # the last token fed back: drafts never reach past it
    drafts = rollback.drafts(prompt.shape[0], model.config.vocab_size, prompt.device) if rollback else None
    logits = prefill(model, prompt, cache, pads, prefill_chunk)
    token = choose(logits)
    yield Step(0, logits, token)
    for i in range(1, new_tokens):
        column = n_prompt + i - 1  # where the previous token goes
        if rollback and i % rollback.every == 0 and column + rollback.tokens - 1 <= last_column:
            model(next(drafts), cache, start_pos=column, last_only=True, pads=pads)  # drafts, then rejected
            cache.crop(column)
        logits = decode(model, token, cache, column, pads)
        token = choose(logits)
        yield Step(i, logits, token)


def _naive_steps(model: Decoder, prompt: torch.Tensor, new_tokens: int, choose: Chooser,
                 visibility: AttentionRule, pads: torch.Tensor | None) -> Iterator[Step]:
    batch, n_prompt = prompt.shape
    ids = torch.empty(batch, n_prompt + new_tokens, dtype=prompt.dtype, device=prompt.device)  # no per-step cat
    ids[:, :n_prompt] = prompt
    for i in range(new_tokens):
        logits = naive_step(model, ids[:, : n_prompt + i], visibility, pads)
        token = choose(logits)
        ids[:, n_prompt + i] = token
        yield Step(i, logits, token)


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) new tokens
    logits: torch.Tensor | None  # (B, N, V) the logits that chose them, when kept
    draws: torch.Tensor | None = None  # (B, N) the sampler's uniform draws (None when greedy)
    lengths: list[int] | None = None  # rows that stopped at different steps: each row's tokens up to its stop


def cache_tokens(prompt_len: int, new_tokens: int) -> int:
    """Tokens a cache holds at the end: the prompt plus every new token but the last, which is never fed back."""
    return prompt_len + new_tokens - 1


def new_cache(model: Decoder, strategy: Strategy | str, batch: int, max_len: int,
              window: int | None = None, rollback: int = 0) -> KVCache | None:
    """The strategy's cache sized for max_len tokens (or `window` for a windowed one), on the model's device
    and dtype; None for naive. For an encoder-decoder, the self-attention cache is wrapped with the source's
    cross-attention K/V, kept for the whole generation if the strategy keeps them."""
    strategy = resolve(strategy)
    shape = CacheShape.of(model.config, batch, max_len, model.dtype, model.device, window, rollback)
    return for_model(model, strategy.new_cache(shape), keep_cross=strategy.keeps_cross)


def for_model(model, cache: KVCache | None, keep_cross: bool = True) -> KVCache | None:
    """A self-attention cache as the model needs it (an encoder-decoder's wrapped with its source's K/V)."""
    return model.wrap_cache(cache, keep_cross)


def generate(model: Decoder, prompt: torch.Tensor, new_tokens: int, strategy: Strategy | str, keep_logits: bool = False,
             sampling: SamplingSettings = GREEDY, on_step: Callable[[Step], None] | None = None,
             window: int | None = None, cache: KVCache | None = None,
             pads: torch.Tensor | None = None, prefill_chunk: int | None = None,
             rollback: Rollback | None = None, stops: RowStops | None = None,
             visibility: AttentionRule = None) -> Generation:
    """Generate new_tokens after prompt (B, P) with a strategy (an object or a name of kvbench.strategies).

    `window` sizes a windowed strategy's cache; `visibility` is how naive attends (the baseline another
    strategy is checked against: Strategy.baseline gives it, e.g. banded to the window for sliding). `cache`
    reuses a cache object of the strategy (reset first, as generate --interactive and benchmark reuse one);
    by default a new one is allocated. `pads` (B,): a ragged batch left-padded by left_pad. `prefill_chunk`:
    the prompt enters the cache that many tokens per forward. `rollback`: speculative drafts written into
    the cache and rolled back every few steps (see Rollback); the cache must be made with that rollback.
    `stops`: rows that stop at different steps; Generation.lengths says where each did."""
    if cache is None:
        cache = new_cache(model, strategy, prompt.shape[0], cache_tokens(prompt.shape[1], new_tokens), window,
                          rollback.tokens if rollback else 0)
    decode = decoder_for(strategy, prompt.device)
    sampler = Sampler(sampling)
    tokens, logits = [], []
    for step in generation_steps(model, prompt, new_tokens, cache, sampler, decode, visibility, pads,
                                 prefill_chunk, rollback, stops):
        tokens.append(step.token)
        if keep_logits:
            logits.append(step.logits.float())
        if on_step is not None:
            on_step(step)
    draws = torch.stack(sampler.draws, dim=1) if sampler.draws else None
    tokens = torch.stack(tokens, dim=1)  # (B, N): N the steps run, up to the last row's stop
    return Generation(tokens, torch.stack(logits, dim=1) if keep_logits else None, draws,
                      stops.lengths(tokens) if stops else None)


def for_generation(model, batch: int, src_len: int, seed: int):
    """The model generation code runs: a decoder as it is; an encoder-decoder bound to a seeded random source
    batch (B, src_len), drawn with seed + 1 so that it differs from the target prompt drawn with seed."""
    return model.for_generation(batch, src_len, seed)


def with_batch(model, batch: int, seed: int):
    """The same model for `batch` rows of new inputs: an encoder-decoder rebound to a new seeded source
    batch of the same source length; a decoder as it is."""
    return model.with_rows(batch, seed)
