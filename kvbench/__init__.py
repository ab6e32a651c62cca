"""kvbench: prove a transformer's KV cache exact, and measure what it buys.

The public Python API is what __all__ lists (see the README's "Python API"); every other module is internal.
"""

__version__ = "0.1.0"

from kvbench.api import BenchmarkResult, benchmark, kv_evaluate, load_model, register_strategy, strategy  # noqa: E402
from kvbench.cache import KVCache, Mask, columns_mask  # noqa: E402
from kvbench.errors import KVBenchError  # noqa: E402
from kvbench.precision import Thresholds  # noqa: E402
from kvbench.strategies import CacheShape, Strategy  # noqa: E402
from kvbench.verify import StrategyCheck  # noqa: E402

__all__ = [
    "__version__", "load_model", "kv_evaluate", "benchmark", "BenchmarkResult", "StrategyCheck",
    "KVCache", "Mask", "columns_mask", "CacheShape", "Strategy", "Thresholds", "register_strategy", "strategy",
    "KVBenchError",
]
