"""The floating-point types kvbench runs in, and the logit tolerances that suit each.

Tolerances are |actual - expected| <= atol + rtol * |expected|, elementwise (as torch.allclose). The
low-precision defaults were set from measured errors against the float64 reference and between cached and
naive runs (docs/perf.md): bfloat16 keeps 8 significant bits, so a logit of 2.7 is resolved to ~0.016, and
the trained demo model's logits (up to ~20) come out of sums of terms rounded at that scale: a correct
static cache differs from naive there by up to atol 0.056 (bfloat16) and 0.011 (float16) beyond rtol. What
a loose logit tolerance cannot resolve (an off-by-one at low precision), the contents check catches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TOLERANCE = {  # (atol, rtol)
    "float32": (1e-4, 1e-4),
    "bfloat16": (1.5e-1, 2e-2),
    "float16": (2e-2, 5e-3),
}

# The int8 cache is not exact. It passes kv-evaluate when the mean KL(naive || quantized) of the next-token
# distributions (nats per step) stays under the first number and the top-1 agreement over the second.
# Measured with correct int8 in float32: KL 3e-7..1.3e-6 on configs/default.yaml (random weights), 1.8e-5 on
# the trained configs/demo.yaml (sharper distributions feel rounding more), top-1 100% on both. Bugs measured
# on default.yaml: scales stored 25% too large give KL 3.5e-3 and top-1 96%; 2x too small, KL 3e-2.
# The worst single step and the longest run of top-1 disagreements are judged too, so that a local bug (one
# position lost after 512 tokens) is not diluted by a long mean. Correct int8, every shipped model and dtype,
# over kv-evaluate's four generations: worst step KL 1.6e-3 (demo, float32), 9.5e-4 (demo, float16), 3.3e-3
# (demo, bfloat16), 6e-6 or less on the random-weight models; longest disagreement streak 1.
# bfloat16's own rounding already gives an exact cache KL ~4e-6 and top-1 99.9%, hence its looser bounds.


@dataclass(frozen=True)
class Thresholds:
    """What an approximate strategy's next-token distributions must keep, on average and at the worst step."""

    max_mean_kl: float  # mean KL(naive || strategy) over every step and row, nats
    min_top1: float  # fraction of steps whose top token agrees with naive's
    max_step_kl: float  # KL of the single worst step: a local bug (one bad position) is not diluted by the mean
    max_streak: int  # most consecutive steps of a row that may disagree on the top token


# A step whose next-token distribution lies within this KL (nats) of naive's does not count toward a streak of
# top-token disagreements: the top two were a near-tie. A tenth of the smallest mean-KL allowance below.
NEAR_TIE_KL = 1e-4

QUANTIZED_THRESHOLDS = {
    "float32": Thresholds(1e-3, 0.97, 2e-2, 3),
    "bfloat16": Thresholds(2e-3, 0.95, 4e-2, 4),
    "float16": Thresholds(1e-3, 0.97, 2e-2, 3),
}

# A cache's stored K/V against those of a fresh forward over the same tokens (kv-evaluate's contents check):
# the two are computed by different kernels (one row at a time vs the whole sequence), so they differ by
# rounding, a few units in the last place of the dtype relative to each vector's largest element; an
# off-by-one or a lossy store differs by far more. Allowed: atol + rtol x max |x| over the vector's head_dim.
# Measured (correct caches, tools in docs/perf.md): float32 at most 0.33 of this allowance (demo), bfloat16
# 0.3; a float16 store in a float32 cache exceeds it ~10x, an off-by-one by 100x and more.
CONTENTS_TOLERANCE = {  # (atol, rtol)
    "float32": (1e-6, 3e-5),
    "bfloat16": (2e-2, 5e-2),
    "float16": (2e-3, 5e-3),
}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
