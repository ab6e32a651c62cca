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
