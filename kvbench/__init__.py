"""kvbench: prove a transformer's KV cache exact, and measure what it buys.

The public Python API is what __all__ lists (see the README's "Python API"); every other module is internal.
Names are imported on first use (PEP 562), so that `import kvbench` (and the `kvbench` command's start) does
not load torch before the command can answer Ctrl-C.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_HOMES = {  # public name -> the module that defines it
    "load_model": "kvbench.api", "kv_evaluate": "kvbench.api", "benchmark": "kvbench.api",
    "BenchmarkResult": "kvbench.api", "register_strategy": "kvbench.api", "strategy": "kvbench.api",
    "KVCache": "kvbench.cache", "Mask": "kvbench.cache", "columns_mask": "kvbench.cache",
    "KVBenchError": "kvbench.errors", "Thresholds": "kvbench.precision", "CacheShape": "kvbench.strategies",
    "Strategy": "kvbench.strategies", "StrategyCheck": "kvbench.verify",
}

__all__ = ["__version__", *_HOMES]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'kvbench' has no attribute {name!r}")
