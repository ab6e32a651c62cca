"""Issue 11's before/after: the default config's static decode, in two source trees, alternating in one run.

    python scripts/restructure_ab.py BEFORE_TREE AFTER_TREE [--tokens N] [--rounds R] [--config YAML]

Each round runs every (tree, kernel) arm in its own subprocess with that tree first on sys.path, so both
trees are timed under the same machine load. Prints ms per decode token (median over rounds) and whether
each arm's greedy tokens and logits equal the first arm's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ARM = r"""
import json, sys, time, torch
from kvbench.config import load_config
from kvbench.weights import build_model
from kvbench.generate import generate
kernel, tokens, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = build_model(load_config(config), "cpu")
if kernel != "default":
    model.use_kernel(kernel)
prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
generate(model, prompt, 20, "static")  # warm-up
start = time.perf_counter()
out = generate(model, prompt, tokens, "static", keep_logits=True)
seconds = time.perf_counter() - start
print(json.dumps({"ms_per_token": 1e3 * seconds / tokens, "tokens": out.tokens[0].tolist(),
                  "logits_sum": float(out.logits.double().abs().sum())}))
"""


def run_arm(tree: str, kernel: str, tokens: int, config: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, "-c", ARM, kernel, str(tokens), config], cwd=tree, env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="configs/default.yaml", help="relative to each tree")
    args = parser.parse_args()
    arms = [("before", args.before, "default"), ("after, x @ W as before", args.after, "matmul"),
            ("after, its default kernel", args.after, "default")]
    results = {label: [] for label, _, _ in arms}
    for _ in range(args.rounds):
        for label, tree, kernel in arms:
            results[label].append(run_arm(tree, kernel, args.tokens, args.config))
    first = results[arms[0][0]][0]
    for label, runs in results.items():
        times = sorted(r["ms_per_token"] for r in runs)
        ms = statistics.median(times)
        same = all(r["tokens"] == first["tokens"] for r in runs)
        drift = max(abs(r["logits_sum"] - first["logits_sum"]) / first["logits_sum"] for r in runs)
        print(f"{label:28s} {ms:7.3f} ms/token (range {times[0]:.3f}-{times[-1]:.3f})  tokens same as before: {same}  |logits| sum rel. diff {drift:.1e}")


if __name__ == "__main__":
    main()
