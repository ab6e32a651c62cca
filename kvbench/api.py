"""kvbench's public Python API: load a model, hand kvbench a cache, verify it, time it. Nothing here prints.

Everything exported from `kvbench` (its __all__) is public and follows semantic versioning: see the README's
"Python API". The modules behind it (kvbench.cache, kvbench.verify, ...) are internal and may change.
"""

from __future__ import annotations

import inspect
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import pandas as pd
import torch

from kvbench import plugins
from kvbench import strategies as registry
from kvbench.config import load_config
from kvbench.errors import KVBenchError
from kvbench.generate import Rollback
from kvbench.precision import DEFAULT_TOLERANCE, DTYPES, dtype_name
from kvbench.strategies import FAMILY_WORDS, Strategy, window_of
from kvbench.verify import StrategyCheck, Tolerance, random_prompt
from kvbench.verify import kv_evaluate as _kv_evaluate
from kvbench.weights import build_model

# What a strategy may be given as: a registered name, a plugin spec ("pkg.mod:Class", "file.py:Class"), a
# KVCache subclass (a plugin class), or a Strategy.
StrategyLike = Union[str, type, Strategy]


def load_model(config: str | Path = "tiny", device: str | torch.device = "cpu", dtype: str = "float32",
               engine: str = "kvbench"):
    """A ready-to-run model in eval mode: `config` a shipped config's name (default, tiny, llama, ...), a
    YAML file, or a transformers checkpoint directory (GPT-2, Llama, Qwen2, Mistral); `dtype` float32,
    bfloat16 or float16. Its `.config` is the validated model config. `engine="transformers"`: a checkpoint
    directory of any causal LM, run by transformers' own code (strategies naive and hf-*)."""
    if dtype not in DTYPES:
        raise KVBenchError(f"dtype {dtype!r} is not supported; choose from {', '.join(DTYPES)}")
    return build_model(load_config(config, engine), torch.device(device), DTYPES[dtype])


def register_strategy(cache_class: type) -> Strategy:
    """Register a KVCache subclass as a strategy (as --strategies file.py:Class does) and return it. Its
    declarations (name, exact, thresholds, visibility, ragged, bounded) are checked, and it is probed with a
    tiny forward; a problem raises KVBenchError. Registering the same class again returns its strategy."""
    existing = registry.REGISTRY.get(str(cache_class.__dict__.get("name", getattr(cache_class, "__name__", ""))))
    if existing is not None and getattr(existing.cache, "plugin_class", None) is cache_class:
        return existing
    strategy = plugins.strategy_of(cache_class, f"plugin {getattr(cache_class, '__name__', cache_class)!r}")
    plugins.register_loaded(strategy, f"class {cache_class.__module__}.{cache_class.__qualname__}", "plugin")
    return strategy


def strategy(item: StrategyLike) -> Strategy:
    """The Strategy of a name, a plugin spec, a KVCache subclass (registered now) or a Strategy."""
    if isinstance(item, Strategy):
        return item
    if inspect.isclass(item):
        return register_strategy(item)
    if plugins.is_spec(item):
        return plugins.load(item, "strategy")
    plugins.load_installed(item, "strategy")
    return registry.get(item, option="strategy")


def kv_evaluate(model, strategies: Iterable[StrategyLike], new_tokens: int = 64, batch_size: int = 1,
                prompt_len: int = 16, window: int | None = None, atol: float | None = None,
                rtol: float | None = None, seed: int = 0, prefill_chunk: int | None = None,
                rollback: int | None = None) -> list[StrategyCheck]:
    """Generate with each strategy and check every step's logits and tokens, and the cache's stored K/V,
    against naive recomputation, over several generations per cache (reuse after reset, an extra row, a
    ragged batch), exactly as `kvbench kv-evaluate` does. Returns one StrategyCheck per strategy: `.passed`,
    `.failures` (in words), `.max_abs`, `.worst_ratio`, `.pooled.mean_kl`, ... Tolerances default by dtype."""
    chosen = [strategy(s) for s in strategies]
    for s in chosen:  # transformers' caches need transformers' model, kvbench's caches kvbench's
        if model.config.family not in s.families:
            raise KVBenchError(f"strategy {s.name!r} does not run on {FAMILY_WORDS.get(model.config.family)}")
    default_atol, default_rtol = DEFAULT_TOLERANCE[dtype_name(model.dtype)]
    tol = Tolerance(default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    prompt = random_prompt(model.config, batch_size, prompt_len, seed).to(model.device)
    return _kv_evaluate(model, prompt, new_tokens, chosen, tol, window=window_of(model.config, window),
                        prefill_chunk=prefill_chunk, rollback=Rollback(rollback) if rollback else None)


@dataclass
class BenchmarkResult:
    """A benchmark's tables: `runs` (every timed run: results.csv), `summary` (medians per strategy, batch
    and length, with the floor: summary.csv); `path` the results directory, or None when none was kept.
    columns.md in a results directory explains every column."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    path: Path | None


class _Silent:
    """The sweep's reporter, saying nothing: the API never prints."""

    def preparing(self, what): ...
    def compiled(self, seconds): ...
    def planned(self, runs): ...
    def starting(self, run): ...
    def finished(self, run, row): ...


def benchmark(config: str | Path, strategies: Iterable[StrategyLike] = ("naive", "static"),
              lengths: Iterable[int] = (10, 50), repeats: int = 3, warmup: int = 1, prompt_len: int = 16,
              batch_size: int = 1, device: str = "cpu", dtype: str = "float32", window: int | None = None,
              seed: int = 0, out: str | Path | None = None, engine: str = "kvbench") -> BenchmarkResult:
    """Time each strategy's generation over `lengths` new tokens against naive and the machine's floor,
    exactly as `kvbench benchmark` does (the same runs, CSVs, meta.json and plots). With `out`, the results
    directory is kept there; without, it is written to a temporary directory and only the tables returned.
    `engine="transformers"`: `config` a checkpoint directory run by transformers' own code."""
    from kvbench.bench import session as bench
    from kvbench.bench.results import ResultsDir
    from kvbench.bench.sweep import SweepSettings

    loaded = load_config(config, engine)
    names = [strategy(s).name for s in strategies]
    settings = SweepSettings(lengths=sorted(set(lengths)), strategies=names, repeats=repeats, warmup=warmup,
                             prompt_len=prompt_len, batch_size=[batch_size], device=device, dtype=dtype, seed=seed,
                             window=window_of(loaded.model, window), engine=loaded.engine)
    with tempfile.TemporaryDirectory(prefix="kvbench-") as scratch:
        results = ResultsDir.create(Path(out) if out else Path(scratch) / "results", Path(scratch), loaded.name,
                                    device, dtype)
        with results.lock():
            run = bench.start(loaded, settings, results)
            bench.run(run, torch.device(device), _Silent())
            summary, _ = bench.finish(run, "complete")
        return BenchmarkResult(results.read_runs(), summary, results.path if out else None)

