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

# The int8 cache is not exact. It passes kv-evaluate when the mean KL(naive || quantized) per step (nats)
# stays under the first number and the top-1 agreement over the second. Measured with correct int8 on
# configs/default.yaml (the most sensitive shipped model): KL 2.6e-7..8.3e-7 in float32, 7.7e-6 in bfloat16
# (whose own rounding already gives an exact cache KL 3.6e-6), top-1 100%. A 10% error in the stored scales
# gives KL 6e-4 and top-1 98.5%; a 4x error, KL 5e-2 and top-1 16%.
QUANTIZED_THRESHOLDS = {  # (max mean KL, min top-1 agreement)
    "float32": (1e-5, 0.98),
    "bfloat16": (1e-4, 0.95),
    "float16": (1e-5, 0.98),
}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
