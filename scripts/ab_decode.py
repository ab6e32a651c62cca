"""Time the default model's static decode with the kvbench found at a path: for A/B runs of two checkouts.

    python scripts/ab_decode.py /path/to/checkout-a; python scripts/ab_decode.py /path/to/checkout-b

Prints the median ms per decode step of 3 generations of 300 tokens (16-token prompt), one per repeat.
Alternate the two checkouts in one session: only ratios measured side by side mean anything.
"""

import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402

from kvbench.config import load_config  # noqa: E402
from kvbench.generate import generation_steps, new_cache  # noqa: E402
from kvbench.weights import build_model  # noqa: E402

torch.set_num_threads(2)
model = build_model(load_config("default"))
prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
cache = new_cache(model, "static", 1, 16 + 300)
medians = []
for _ in range(3):
    steps, last = [], None
    for step in generation_steps(model, prompt, 300, cache):
        now = time.perf_counter()
        if last is not None and step.index > 1:
            steps.append(now - last)
        last = now
    medians.append(statistics.median(steps) * 1000)
print(sys.argv[1], " ".join(f"{m:.2f}" for m in medians))
