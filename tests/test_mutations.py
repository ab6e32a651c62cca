"""The mutation suite: deliberate bugs in kvbench's real caches, each of which kv-evaluate must fail.

Every mutation patches one method of a real cache class (what a developer's slip would change), then runs
`kvbench kv-evaluate` on the shipped tiny config with the options a user types (1000 new tokens, batch 1,
prompt 16, the default window) naming only the strategy. Each must exit 1. The same command without the
mutation passes (test_unmutated_strategies_pass), so a failure is the bug's, not the checker's.

The README states the score ("kv-evaluate catches N of N deliberate cache bugs"); a test keeps it true.
Add a mutation here whenever a bug slips past kv-evaluate in the wild.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import kvbench.verify as verify
from conftest import CONFIGS, REPO, random_model
from kvbench.cache import DynamicCache, QuantizedCache, SlidingWindowCache, StaticCache
from kvbench.seq2seq import Seq2SeqCache
from kvbench.cli import app
from kvbench.generate import GREEDY

REAL_STATIC_UPDATE = StaticCache.update
REAL_QUANTIZE = QuantizedCache.quantize
REAL_STORED = QuantizedCache.stored
REAL_QUANTIZED_STORE = QuantizedCache.store
REAL_SLIDING_UPDATE = SlidingWindowCache.update
REAL_DYNAMIC_UPDATE = DynamicCache.update


# --- the bugs ---------------------------------------------------------------------------------------------------

def sliding_reset_noop(self):
    pass  # the ring keeps the last generation's positions: the next prefill attends to them


def dynamic_reset_keeps_tokens(self):
    if not hasattr(self, "k"):  # the first reset (from __init__) works; later ones forget to clear
        self.k, self.v = [None] * self.n_layers, [None] * self.n_layers


def quantized_length_survives_reset(self, layer, start_pos, k, v):
    end = REAL_QUANTIZED_STORE(self, layer, start_pos, k, v)
    self.high_water = max(getattr(self, "high_water", 0), end)  # never lowered by reset
    return self.high_water if k.shape[2] == 1 else end


def scale_per_sequence(x):
    scale = x.float().abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-12) / 127  # (B, H, 1, 1)
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def four_bit(x):
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
    return (x.float() / scale).round().clamp(-7, 7).to(torch.int8), scale


def scale_25_percent_large(x):
    q, scale = REAL_QUANTIZE(x)
    return q, scale * 1.25


def v_with_k_scale(self, layer, end):
    kq, ks, vq, _ = REAL_STORED(self, layer, end)
    return kq, ks, vq, ks  # K's scale for V


def quantized_drops_first_after_512(self, layer, end):
    kq, ks, vq, vs = REAL_STORED(self, layer, end)
    if end > 512:
        kq, vq = kq.clone(), vq.clone()
        kq[:, :, 0], vq[:, :, 0] = 0, 0
    return kq, ks, vq, vs


def static_drops_first_after_512(self, layer, start_pos, k, v):
    keys, values = REAL_STATIC_UPDATE(self, layer, start_pos, k, v)
    if k.shape[2] == 1 and start_pos + 1 > 512:
        return keys[:, :, 1:], values[:, :, 1:]  # position 0 evicted from what the query sees
    return keys, values


def static_one_slot_too_far(self, layer, start_pos, k, v):
    end = start_pos + k.shape[2]
    shift = 1 if k.shape[2] == 1 and end < self.max_len else 0
    REAL_STATIC_UPDATE(self, layer, start_pos + shift, k, v)
    return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def static_lossy_float16(self, layer, start_pos, k, v):
    return REAL_STATIC_UPDATE(self, layer, start_pos, k.half().to(k.dtype), v.half().to(v.dtype))


def static_row_broadcast(self, layer, start_pos, k, v):
    return REAL_STATIC_UPDATE(self, layer, start_pos, k[:1].expand_as(k), v[:1].expand_as(v))


def static_attends_whole_buffer(self, layer, start_pos, k, v):
    keys, values = REAL_STATIC_UPDATE(self, layer, start_pos, k, v)
    if k.shape[2] == 1:
        return self.k[layer], self.v[layer]  # stale and empty slots after the position too
    return keys, values


def static_nan_at_700(self, layer, start_pos, k, v):
    if start_pos == 700:
        k = torch.full_like(k, float("nan"))
    return REAL_STATIC_UPDATE(self, layer, start_pos, k, v)


def dynamic_raises_at_600(self, layer, start_pos, k, v):
    if start_pos == 600:
        raise RuntimeError("index out of range in a research cache")
    return REAL_DYNAMIC_UPDATE(self, layer, start_pos, k, v)


def sliding_off_by_one_at_wrap(self, layer, start_pos, k, v):
    if k.shape[2] == 1 and start_pos >= self.window:
        start_pos += 1  # after the wrap, each token lands in the next position's slot
    return REAL_SLIDING_UPDATE(self, layer, start_pos, k, v)


def sliding_long_prefill_files_one_slot_off(self, layer, start_pos, k, v):
    n_new = k.shape[2]
    if n_new <= self.window:
        return REAL_SLIDING_UPDATE(self, layer, start_pos, k, v)
    kept = torch.arange(n_new - self.window, n_new, device=k.device)  # a fresh prefill: nothing held before
    slots = (start_pos + kept + 1) % self.window  # each position filed in its neighbour's slot
    self.k[layer].index_copy_(2, slots, k[:, :, kept])
    self.v[layer].index_copy_(2, slots, v[:, :, kept])
    if layer == len(self.k) - 1:
        self.slot_pos[slots] = start_pos + kept
    return k, v


def seq2seq_reset_keeps_the_source(self):
    self.self_cache.reset()  # forgets the self-attention K/V, keeps the last source's encoder output and K/V


@dataclass(frozen=True)
class Mutation:
    name: str
    strategy: str
    cls: type
    method: str
    replacement: Callable
    extra: tuple[str, ...] = ()  # options beyond the defaults, where the bug is about them
    static: bool = False  # the replacement is a staticmethod
    config: str = "tiny.yaml"


# Where the user's 1000 tokens cost half a minute (bfloat16 matmuls on the CPU; the encoder-decoder's 32k
# vocabulary) and the bug shows from the first steps, a shorter run keeps the suite within its budget.
SHORT = ("--new-tokens", "100")

MUTATIONS = [
    Mutation("sliding reset is a no-op", "sliding", SlidingWindowCache, "reset", sliding_reset_noop),
    Mutation("dynamic reset keeps the last generation's tokens", "dynamic", DynamicCache, "reset",
             dynamic_reset_keeps_tokens),
    Mutation("quantized stored length survives reset", "quantized", QuantizedCache, "store",
             quantized_length_survives_reset),
    Mutation("int8: one scale per sequence, not per vector", "quantized", QuantizedCache, "quantize",
             scale_per_sequence, static=True),
    Mutation("int8 cache holding 4-bit values", "quantized", QuantizedCache, "quantize", four_bit, static=True),
    Mutation("int8 scales stored 25% too large", "quantized", QuantizedCache, "quantize", scale_25_percent_large,
             static=True),
    Mutation("V dequantized with K's scale", "quantized", QuantizedCache, "stored", v_with_k_scale),
    Mutation("quantized drops position 0 after 512", "quantized", QuantizedCache, "stored",
             quantized_drops_first_after_512),
    Mutation("static drops position 0 after 512", "static", StaticCache, "update", static_drops_first_after_512),
    Mutation("static writes K/V one slot too far", "static", StaticCache, "update", static_one_slot_too_far),
    Mutation("static writes K/V one slot too far, bfloat16", "static", StaticCache, "update",
             static_one_slot_too_far, ("--dtype", "bfloat16", *SHORT)),
    Mutation("static writes K/V one slot too far, float16, reference model", "static", StaticCache, "update",
             static_one_slot_too_far, ("--dtype", "float16"), config="reference.yaml"),
    Mutation("static stores K/V as float16 (lossy, called exact)", "static", StaticCache, "update",
             static_lossy_float16),
    Mutation("static stores K/V as float16, reference model", "static", StaticCache, "update",
             static_lossy_float16, config="reference.yaml"),
    Mutation("static writes row 0's K/V into every row", "static", StaticCache, "update", static_row_broadcast),
    Mutation("static attends its whole buffer, stale slots included", "static", StaticCache, "update",
             static_attends_whole_buffer),
    Mutation("static stores NaN at one position", "static", StaticCache, "update", static_nan_at_700),
    Mutation("dynamic raises mid-generation", "dynamic", DynamicCache, "update", dynamic_raises_at_600),
    Mutation("sliding writes one slot too far after the wrap", "sliding", SlidingWindowCache, "update",
             sliding_off_by_one_at_wrap),
    Mutation("encoder-decoder reset keeps the last source's encoder output", "static", Seq2SeqCache, "reset",
             seq2seq_reset_keeps_the_source, SHORT, config="seq2seq.yaml"),
    Mutation("sliding long-prompt prefill files positions one slot off", "sliding", SlidingWindowCache, "update",
             sliding_long_prefill_files_one_slot_off),
]


def kv_evaluate_args(strategy: str, extra: tuple[str, ...] = (), config: str = "tiny.yaml") -> list[str]:
    return ["kv-evaluate", "--config", str(CONFIGS / config), "--strategies", strategy, "--device", "cpu", *extra]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_kv_evaluate_catches_the_mutation(runner, monkeypatch, mutation):
    replacement = staticmethod(mutation.replacement) if mutation.static else mutation.replacement
    monkeypatch.setattr(mutation.cls, mutation.method, replacement)
    result = runner.invoke(app, kv_evaluate_args(mutation.strategy, mutation.extra, mutation.config))
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("strategy,extra,config", sorted({(m.strategy, m.extra, m.config) for m in MUTATIONS}))
def test_unmutated_strategies_pass(runner, strategy, extra, config):
    result = runner.invoke(app, kv_evaluate_args(strategy, extra, config))
    assert result.exit_code == 0, result.output


def test_readme_states_the_mutation_score():
    score = re.search(r"catches (\d+) of (\d+) deliberate cache bugs", (REPO / "README.md").read_text())
    assert score is not None and int(score.group(1)) == int(score.group(2)) == len(MUTATIONS)


# --- broken models, not caches: non-finite logits fail and name naive -------------------------------------------

def test_nan_weights_fail_and_blame_the_model():
    model = random_model(1)
    model.ln_f.weight[3] = float("nan")
    [check] = verify.kv_evaluate(model, torch.randint(0, 97, (1, 4)), 10, ["static"], verify.Tolerance(1e-4, 1e-4))
    assert not check.passed
    assert any("naive" in f and "model" in f for f in check.failures), check.failures


def test_disagreement_streaks_span_chunks():
    agreement = verify.Agreement()
    agreement._fold_streaks(torch.tensor([[False, True, True]]))
    agreement._fold_streaks(torch.tensor([[True, False, True]]))  # continues the streak: 3 in a row
    assert agreement.worst_streak == 3


def test_near_tie_flips_do_not_make_a_streak_but_drift_does():
    reference = torch.zeros(1, 5, 10, dtype=torch.float64)
    reference[..., 3], reference[..., 4] = 1.0, 0.999  # every step: 3 barely ahead of 4
    flipped = reference.clone()
    flipped[..., 4] = 1.001  # the top token flips, the distribution barely moves (KL ~ 1e-7)
    near_tie = verify.Agreement()
    near_tie.add(flipped, reference, verify.Tolerance(1e-4, 1e-4))
    assert near_tie.top1 == 0.0 and near_tie.worst_streak == 0
    drifted = reference.clone()
    drifted[..., 4] = 3.0  # the same flip by a wide margin: a real change of distribution
    drift = verify.Agreement()
    drift.add(drifted, reference, verify.Tolerance(1e-4, 1e-4))
    assert drift.worst_streak == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_disagreement_streaks_of_logits_on_the_gpu():
    agreement = verify.Agreement()
    agreement._fold_streaks(torch.tensor([[True, True, False]], device="cuda"))
    assert agreement.worst_streak == 2


def test_float16_overflow_fails():
    model = random_model(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e6)  # entries ~2e4 still fit float16; logits summed from them do not (> 65504)
    model = model.half()
    [check] = verify.kv_evaluate(model, torch.randint(0, 97, (1, 4)), 10, ["static"], verify.Tolerance(5e-3, 5e-3),
                                 GREEDY)
    assert not check.passed and any("NaN/inf" in f for f in check.failures), check.failures
