"""Statistics over repeated runs: medians, interquartile ranges, speed-ups. Each a short pandas expression."""

from __future__ import annotations

import pandas as pd

from kvbench.strategies import NAIVE

NOISY_IQR_RATIO = 0.10  # IQR/median above this: the machine was too noisy to trust the point alone
POINT = ["strategy", "batch_size", "new_tokens"]
SIZE = ["batch_size", "new_tokens"]  # a point of the sweep, every strategy alike


def iqr(values: pd.Series) -> float:
    return float(values.quantile(0.75) - values.quantile(0.25))


def with_batch(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy that has a batch_size column (tables built before batch was an axis held batch 1)."""
    return frame.copy() if "batch_size" in frame else frame.assign(batch_size=1)


def summarize(runs: pd.DataFrame, strategy_order: list[str] | None = None,
              skipped: list[tuple[str, int, int]] = (), skip_note: str = "") -> pd.DataFrame:
    """One row per strategy x batch x length: median and IQR of total and per-token time, speed-up against
    naive where naive was measured at the same point. `skipped` points (strategy, batch, new_tokens) were
    not run: each gets a row with `skipped` saying why and no numbers, so that nothing vanishes silently."""
    runs = with_batch(runs)
    for column in ("weight_bytes", "kv_bytes", "kv_allocated_bytes", "kv_live_bytes"):  # written before these existed
        if column not in runs:
            runs[column] = float("nan")
    if "bound" not in runs:
        runs["bound"] = ""
    runs["bound"] = runs["bound"].astype(object).fillna("")
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
        kv_allocated_bytes=("kv_allocated_bytes", "max"),
        kv_live_bytes=("kv_live_bytes", "max"),
        peak_mem_bytes_median=("peak_mem_bytes", "median"),
        mem_growth_bytes_median=("mem_growth_bytes", "median"),
        weight_bytes=("weight_bytes", "median"),
        kv_bytes=("kv_bytes", "median"),
        floor_ms=("floor_ms", "median"),
        bound=("bound", "first"),
        bandwidth_gbs_median=("bandwidth_gbs", "median"),
        gflops_per_token=("gflops_per_token", "median"),
        achieved_gflops_median=("achieved_gflops", "median"),
    ).reset_index()
    summary["kv_waste"] = 1 - summary["kv_live_bytes"] / summary["kv_allocated_bytes"].where(
        summary["kv_allocated_bytes"] > 0)  # naive allocates nothing: no waste to speak of (NaN)
    summary["per_token_over_floor"] = summary["per_token_ms_median"] / summary["floor_ms"]
    summary["kv_over_weights"] = summary["kv_bytes"] / summary["weight_bytes"]
    naive = summary[summary["strategy"] == NAIVE.name].set_index(SIZE)["total_s_median"]
    at_naive = pd.MultiIndex.from_frame(summary[SIZE]).map(lambda point: naive.get(point, float("nan")))
    summary["speedup_vs_naive"] = at_naive.to_numpy(dtype=float) / summary["total_s_median"]
    summary["noisy"] = (summary["total_s_iqr"] / summary["total_s_median"] > NOISY_IQR_RATIO) | (
        summary["per_token_ms_iqr"] / summary["per_token_ms_median"] > NOISY_IQR_RATIO)
    summary["skipped"] = ""
    marked = pd.DataFrame([dict(strategy=s, batch_size=b, new_tokens=n, repeats=0, skipped=skip_note or "skipped")
                           for s, b, n in skipped])
    summary = pd.concat([summary, marked], ignore_index=True) if not marked.empty else summary
    order = {name: i for i, name in enumerate(strategy_order or summary["strategy"].unique())}
    summary = summary.sort_values(["strategy", "batch_size", "new_tokens"],
                                  key=lambda col: col.map(order) if col.name == "strategy" else col)
    return summary.reset_index(drop=True)


def step_medians(steps: pd.DataFrame, new_tokens: int) -> pd.DataFrame:
    """Median time per decode step over repeats, by strategy, batch and token position, for one length."""
    chosen = with_batch(steps[steps["new_tokens"] == new_tokens])
    return chosen.groupby(["strategy", "batch_size", "position"], sort=False)["step_ms"].median().reset_index()


def quartiles(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Median, 25th and 75th percentile of a column per strategy and length (for error bars)."""
    grouped = with_batch(runs).groupby(POINT, sort=False)[column]
    return pd.DataFrame({
        "median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75),
    }).reset_index()
