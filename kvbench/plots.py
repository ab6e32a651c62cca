"""Report-ready matplotlib figures from a results directory's tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from kvbench.bench.stats import quartiles, step_medians  # noqa: E402
from kvbench.strategies import NAIVE, names  # noqa: E402

MARKERS = "osD^vPX*hp"


def color_of(strategy: str) -> tuple:
    """A strategy's colour from matplotlib's default cycle, by registration order (plugins included), so that
    a strategy keeps its colour across plots and runs; names not registered here come after."""
    known = names()
    index = known.index(strategy) if strategy in known else len(known) + sum(map(ord, strategy))
    return plt.get_cmap("tab10")(index % 10)


def _style(strategy: str) -> dict:
    known = names()
    index = known.index(strategy) if strategy in known else sum(map(ord, strategy))
    return dict(color=color_of(strategy), marker=MARKERS[index % len(MARKERS)], label=strategy)


def _subtitle(meta: dict, what: str = "median of {repeats}") -> str:
    s = meta["settings"]
    return (f"{meta['config_name']} · {meta.get('device_name', s['device'])} · {s['dtype']} · batch {s['batch_size']}"
            f" · prompt {s['prompt_len']} · " + what.format(repeats=s["repeats"]))


PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _finish(fig, ax, title: str, meta: dict, path: Path, what: str = "median of {repeats}") -> Path:
    ax.set_title(f"{title}\n{_subtitle(meta, what)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _tokens_axis(ax, lengths) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sorted(lengths))
    ax.xaxis.set_major_formatter(PLAIN)
    ax.set_xlabel("new tokens generated")


def latency_plot(runs: pd.DataFrame, meta: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    q = quartiles(runs, "total_s")
    for strategy, points in q.groupby("strategy", sort=False):
        err = [points["median"] - points["q25"], points["q75"] - points["median"]]
        ax.errorbar(points["new_tokens"], points["median"], yerr=err, capsize=3, **_style(strategy))
    _tokens_axis(ax, runs["new_tokens"].unique())
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_ylabel("total generation time (s)")
    return _finish(fig, ax, "Generation latency: prefill + decode", meta, path,
                   "median of {repeats} runs, bars: interquartile range")


def speedup_plot(summary: pd.DataFrame, meta: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for strategy, points in summary[summary["strategy"] != NAIVE.name].groupby("strategy", sort=False):
        ax.plot(points["new_tokens"], points["speedup_vs_naive"], **_style(strategy))
    ax.axhline(1.0, color="gray", lw=1, ls="--", label=NAIVE.name)
    _tokens_axis(ax, summary["new_tokens"].unique())
    ax.set_ylabel("speed-up over naive (median total time ratio)")
    return _finish(fig, ax, "What the KV cache buys", meta, path)


def per_token_plot(steps: pd.DataFrame, meta: dict, path: Path, floor: pd.DataFrame | None = None) -> Path | None:
    if steps.empty:
        return None
    longest = int(steps["new_tokens"].max())
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for strategy, points in step_medians(steps, longest).groupby("strategy", sort=False):
        ax.plot(points["position"], points["step_ms"], lw=1, color=color_of(strategy), label=strategy)
    if floor is not None and not floor.empty:
        ax.plot(floor["position"], floor["floor_ms"], color="black", ls="--", lw=1, label="memory-bandwidth floor")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.set_xlabel("token position (prompt + generated)")
    ax.set_ylabel("decode step time (ms, median over repeats)")
    return _finish(fig, ax, f"Per-token latency while generating {longest} tokens", meta, path,
                   "median of {repeats} runs per position")


def memory_plot(summary: pd.DataFrame, meta: dict, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    for strategy, points in summary.groupby("strategy", sort=False):
        style = _style(strategy)
        if strategy != NAIVE.name:
            left.plot(points["new_tokens"], points["kv_cache_bytes"] / 2**20, ls="none", ms=7,
                      **{**style, "label": f"{strategy} (allocated)"})
            left.plot(points["new_tokens"], points["kv_cache_formula_bytes"] / 2**20, color=style["color"], lw=1,
                      ls="--", label=f"{strategy} (formula)")
        right.plot(points["new_tokens"], points["peak_mem_bytes_median"] / 2**20, **style)
    for ax in (left, right):
        _tokens_axis(ax, summary["new_tokens"].unique())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("KV cache at the end of the run (MiB)")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(PLAIN)
    left.set_title("KV cache: allocated (markers) vs its formula (dashed, see README)", fontsize=9)
    right.set_ylabel("peak memory during the run (MiB)")
    right.set_title(f"Peak memory ({'GPU allocator' if meta['settings']['device'].startswith('cuda') else 'process RSS'})",
                    fontsize=9)
    fig.suptitle(f"Memory\n{_subtitle(meta, 'median of {repeats} runs')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def floor_line(steps: pd.DataFrame, meta: dict) -> pd.DataFrame | None:
    """Memory floor per position: the token at position p attends p + 1 keys (from meta's measurements)."""
    if "decode_step" not in meta or "machine_limits" not in meta or steps.empty:
        return None
    step, bandwidth = meta["decode_step"], meta["machine_limits"]["best_bandwidth_gbs"]
    positions = pd.Series(sorted(steps["position"].unique()))
    fixed = step.get("fixed_bytes", step.get("weight_bytes"))  # results written before the rename say weight_bytes
    floor_ms = 1000 * (fixed + step["kv_bytes_per_token"] * (positions + 1)) / (bandwidth * 1e9)
    return pd.DataFrame({"position": positions, "floor_ms": floor_ms})


def draw_all(runs: pd.DataFrame, summary: pd.DataFrame, steps: pd.DataFrame, meta: dict, out: Path) -> list[Path]:
    """Every plot for a results directory; returns the files written."""
    if runs.empty:
        return []
    floor = floor_line(steps[steps["new_tokens"] == steps["new_tokens"].max()], meta) if not steps.empty else None
    written = [latency_plot(runs, meta, out / "latency.png"), memory_plot(summary, meta, out / "memory.png")]
    if (summary["strategy"] == NAIVE.name).any() and (summary["strategy"] != NAIVE.name).any():
        written.append(speedup_plot(summary, meta, out / "speedup.png"))
    written.append(per_token_plot(steps, meta, out / "per_token.png", floor))
    return [p for p in written if p is not None]
