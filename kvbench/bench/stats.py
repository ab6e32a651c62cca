"""Statistics over repeated runs: medians, interquartile ranges, speed-ups. Each a short pandas expression."""

from __future__ import annotations

import pandas as pd

from kvbench.strategies import NAIVE

NOISY_IQR_RATIO = 0.10  # IQR/median above this: the machine was too noisy to trust the point alone
POINT = ["strategy", "new_tokens"]


def iqr(values: pd.Series) -> float:
    return float(values.quantile(0.75) - values.quantile(0.25))


def summarize(runs: pd.DataFrame, strategy_order: list[str] | None = None) -> pd.DataFrame:
    """One row per strategy x length: median and IQR of total and per-token time, speed-up against naive."""
    grouped = runs.groupby(POINT, sort=False)
    summary = grouped.agg(
        repeats=("total_s", "size"),
        total_s_median=("total_s", "median"),
        total_s_iqr=("total_s", iqr),
        prefill_s_median=("prefill_s", "median"),
        per_token_ms_median=("per_token_ms", "median"),
        per_token_ms_iqr=("per_token_ms", iqr),
        tokens_per_s_median=("tokens_per_s", "median"),
        kv_cache_bytes=("kv_cache_bytes", "max"),
        kv_cache_formula_bytes=("kv_cache_formula_bytes", "max"),
        peak_mem_bytes_median=("peak_mem_bytes", "median"),
        mem_growth_bytes_median=("mem_growth_bytes", "median"),
        floor_ms=("floor_ms", "median"),
        bandwidth_gbs_median=("bandwidth_gbs", "median"),
        gflops_per_token=("gflops_per_token", "median"),
        achieved_gflops_median=("achieved_gflops", "median"),
    ).reset_index()
    summary["per_token_over_floor"] = summary["per_token_ms_median"] / summary["floor_ms"]
    naive = summary[summary["strategy"] == NAIVE.name].set_index("new_tokens")["total_s_median"]
    summary["speedup_vs_naive"] = summary["new_tokens"].map(naive) / summary["total_s_median"]
    summary["noisy"] = (summary["total_s_iqr"] / summary["total_s_median"] > NOISY_IQR_RATIO) | (
        summary["per_token_ms_iqr"] / summary["per_token_ms_median"] > NOISY_IQR_RATIO)
    order = {name: i for i, name in enumerate(strategy_order or summary["strategy"].unique())}
    summary = summary.sort_values(["strategy", "new_tokens"], key=lambda col: col.map(order) if col.name == "strategy"
                                  else col)
    return summary.reset_index(drop=True)


def step_medians(steps: pd.DataFrame, new_tokens: int) -> pd.DataFrame:
    """Median time per decode step over repeats, by strategy and token position, for one length."""
    chosen = steps[steps["new_tokens"] == new_tokens]
    return chosen.groupby(["strategy", "position"], sort=False)["step_ms"].median().reset_index()


def quartiles(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Median, 25th and 75th percentile of a column per strategy and length (for error bars)."""
    grouped = runs.groupby(POINT, sort=False)[column]
    return pd.DataFrame({
        "median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
    }).reset_index()
