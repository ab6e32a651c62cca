"""The floating-point types kvbench runs in, and the logit tolerances that suit each.

Tolerances are |actual - expected| <= atol + rtol * |expected|, elementwise (as torch.allclose). The
low-precision defaults were set from measured errors against the float64 reference and between cached and
naive runs (docs/perf.md): bfloat16 keeps 8 significant bits, so a logit of 2.7 is resolved to ~0.016.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_TOLERANCE = {  # (atol, rtol)
    "float32": (1e-4, 1e-4),
    "bfloat16": (5e-2, 2e-2),
    "float16": (5e-3, 5e-3),
}

# The int8 cache is not exact. It passes kv-evaluate when the mean KL(naive || quantized) of the next-token
# distributions (nats per step) stays under the first number and the top-1 agreement over the second.
# Measured with correct int8 in float32: KL 3e-7..1.3e-6 on configs/default.yaml (random weights), 1.8e-5 on
# the trained configs/demo.yaml (sharper distributions feel rounding more), top-1 100% on both. Bugs measured
# on default.yaml: scales stored 25% too large give KL 3.5e-3 and top-1 96%; 2x too small, KL 3e-2.
# bfloat16's own rounding already gives an exact cache KL ~4e-6 and top-1 99.9%, hence its looser bounds.
QUANTIZED_THRESHOLDS = {  # (max mean KL, min top-1 agreement)
    "float32": (1e-3, 0.97),
    "bfloat16": (2e-3, 0.95),
    "float16": (1e-3, 0.97),
}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
