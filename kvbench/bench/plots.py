"""Report-ready matplotlib figures from a results directory's tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import Formatter, FuncFormatter, NullFormatter  # noqa: E402

from kvbench.bench.stats import quartiles, step_medians  # noqa: E402
from kvbench.strategies import NAIVE, names  # noqa: E402

MARKERS = "osD^vPX*hp"


def color_of(strategy: str) -> tuple:
    """A strategy's colour from matplotlib's default cycle, by registration order (plugins included), so that
    a strategy keeps its colour across plots and runs; names not registered here take one from another
    palette, fixed by the name."""
    known = names()
    if strategy not in known:  # a name from another run or a plugin not loaded: a palette of its own
        return plt.get_cmap("tab20b")(sum(map(ord, strategy)) % 20)
    return plt.get_cmap("tab10")(known.index(strategy) % 10)


def _style(strategy: str) -> dict:
    known = names()
    index = known.index(strategy) if strategy in known else sum(map(ord, strategy))
    return dict(color=color_of(strategy), marker=MARKERS[index % len(MARKERS)], label=strategy)


SUBTITLE_WIDTH = 95  # characters per subtitle line at font size 9 across a 7.5-inch figure


def wrap_at_dots(text: str, width: int = SUBTITLE_WIDTH) -> str:
    """Break a ' · '-separated subtitle into lines of at most `width` characters, between items."""
    lines: list[str] = []
    for item in text.split(" · "):
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return "\n".join(lines)


def _batches(meta: dict) -> list[int]:
    batch = meta["settings"]["batch_size"]
    return sorted(batch) if isinstance(batch, list) else [batch]  # an int in directories before the batch axis


def _subtitle(meta: dict, what: str = "median of {repeats}") -> str:
    s = meta["settings"]
    batches = _batches(meta)
    batch = f"batch {batches[0]}" if len(batches) == 1 else "batches " + ", ".join(map(str, batches))
    prompt = f"prompts {'/'.join(map(str, s['prompt_lens']))}" if s.get("prompt_lens") else f"prompt {s['prompt_len']}"
    if s.get("new_tokens_per_row"):
        prompt += f" · rows stop after {'/'.join(map(str, s['new_tokens_per_row']))} tokens"
    repeats = what.format(repeats=s["repeats"])
    if s["repeats"] == 1:  # not "median of 1 runs"
        repeats = repeats.replace("median of 1 runs", "one run").replace("median of 1", "one run")
    return wrap_at_dots(f"{meta['config_name']} · {meta.get('device_name', s['device'])} · {s['dtype']} · {batch}"
                        f" · {prompt} · " + repeats)


BATCH_LINES = ["-", "--", ":", "-."]  # one line style per batch size, in increasing order


def _series(frame: pd.DataFrame, meta: dict):
    """(style, points) per strategy x batch: the strategy's colour and marker, a line style per batch, and a
    label naming the batch when the run has several."""
    batches = _batches(meta)
    frame = frame if "batch_size" in frame else frame.assign(batch_size=batches[0])
    for (strategy, batch), points in frame.groupby(["strategy", "batch_size"], sort=False):
        style = _style(strategy)
        index = batches.index(batch) if batch in batches else 0
        if len(batches) > 1:
            style.update(label=f"{strategy} ×{batch}", ls=BATCH_LINES[index % len(BATCH_LINES)])
        yield style, points


def _floor_line(meta: dict, batch: int, several: bool) -> str:
    """Dashed for one batch; with several, each batch's floor in its batch's line style, as its strategies."""
    batches = _batches(meta)
    return BATCH_LINES[batches.index(batch) % len(BATCH_LINES)] if several and batch in batches else "--"


PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
# 2, 5, 20, 50, 0.002, 0.005, ...: the leading digit of the value in scientific notation (of 0.002 too)
SOME_MINOR = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.1e}"[0] in "25" else "")
SHORT_LOG_AXIS = 10.0  # a log axis whose top is under 10x its bottom labels every minor tick


class MinorLogLabels(Formatter):
    """A log axis's minor ticks: 2 and 5 of each decade, or all of them on an axis spanning less than a decade,
    where 2 and 5 can leave a single label (an axis from 5.4 to 30 ms showed only 10 and 20)."""

    def __call__(self, value, pos=None):
        low, high = sorted(self.axis.get_view_interval()) if self.axis is not None else (1.0, 1e9)
        return f"{value:g}" if low > 0 and high / low < SHORT_LOG_AXIS else SOME_MINOR(value, pos)


def _plain_log(ax, which: str) -> None:
    """A log-scale x or y axis labelled 10, 20, 50 rather than 10^1, 2x10^1 (formatters set after the scale,
    which resets them)."""
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(PLAIN)
    axis.set_minor_formatter(MinorLogLabels())


def _figure(width: float, height: float, ncols: int = 1):
    """Constrained layout: titles, labels and a legend placed outside the axes all get room."""
    return plt.subplots(1, ncols, figsize=(width, height), layout="constrained")


def _legend_below(fig, handles=None, labels=None) -> None:
    """Under the axes, never over the data."""
    if handles is None:
        handles, labels = fig.axes[0].get_legend_handles_labels()
    # long handles: a batch's dashed or dotted line must be told from the solid one beside its marker
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False,
               handlelength=4)


def _finish(fig, ax, title: str, meta: dict, what: str = "median of {repeats}"):
    ax.set_title(f"{title}\n{_subtitle(meta, what)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(fig)
    return fig


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _tokens_axis(ax, lengths) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sorted(lengths))
    ax.xaxis.set_major_formatter(PLAIN)
    ax.xaxis.set_minor_formatter(NullFormatter())  # the lengths run are the labels; 2x10^1 beside 16 was noise
    ax.set_xlabel("new tokens generated")


def latency_figure(runs: pd.DataFrame, meta: dict):
    fig, ax = _figure(7.5, 5.2)
    q = quartiles(runs, "total_s")
    for style, points in _series(q, meta):
        err = [points["median"] - points["q25"], points["q75"] - points["median"]]
        ax.errorbar(points["new_tokens"], points["median"], yerr=err, capsize=3, **style)
    _tokens_axis(ax, runs["new_tokens"].unique())
    _plain_log(ax, "y")
    ax.set_ylabel("total generation time (s)")
    return _finish(fig, ax, "Generation latency: prefill + decode", meta,
                   "median of {repeats} runs, bars: interquartile range")


def speedup_figure(summary: pd.DataFrame, meta: dict):
    fig, ax = _figure(7.5, 5.2)
    measured = summary[(summary["strategy"] != NAIVE.name) & summary["speedup_vs_naive"].notna()]
    for style, points in _series(measured, meta):  # only where naive was measured at the same point
        ax.plot(points["new_tokens"], points["speedup_vs_naive"], **style)
    ax.axhline(1.0, color="gray", lw=1, ls="--", label=NAIVE.name)
    lengths = sorted(measured["new_tokens"].unique())  # only where naive ran: no empty decades
    _tokens_axis(ax, lengths)
    ax.set_xlim(lengths[0] / 1.5, lengths[-1] * 1.5)
    ax.set_ylabel("speed-up over naive (median total time ratio)")
    unmeasured = sorted(set(summary["new_tokens"]) - set(lengths))
    what = "median of {repeats}" + (f" · naive not run at {', '.join(map(str, unmeasured))} tokens (--naive-max)"
                                    if unmeasured else "")
    return _finish(fig, ax, "What the KV cache buys", meta, what)


def per_token_figure(steps: pd.DataFrame, meta: dict, floor: pd.DataFrame | None = None):
    longest = int(steps["new_tokens"].max())
    fig, ax = _figure(7.5, 5.2)
    for style, points in _series(step_medians(steps, longest), meta):
        ax.plot(points["position"], points["step_ms"], lw=1, color=style["color"], label=style["label"],
                ls=style.get("ls", "-"))
    if floor is not None and not floor.empty:
        several = floor["batch_size"].nunique() > 1
        for batch, line in floor.groupby("batch_size"):
            ax.plot(line["position"], line["floor_ms"], color="black", ls=_floor_line(meta, batch, several), lw=1,
                    label="floor (roofline)" + (f" ×{batch}" if several else ""))
    _plain_log(ax, "y")
    ax.set_xlabel("token position (prompt + generated)")
    ax.set_ylabel("decode step time (ms, median over repeats)")
    return _finish(fig, ax, f"Per-token latency while generating {longest} tokens", meta,
                   "median of {repeats} runs per position · floor: max(bytes / bandwidth, FLOPs / matmul throughput)")


def crossover_figure(summary: pd.DataFrame, meta: dict):
    """Per-token time against the bytes of K/V a step attends over the bytes of weights it reads, across
    lengths and batches: flat while the weights dominate, rising once the cache does."""
    points = summary[summary["kv_over_weights"].notna() & summary["per_token_ms_median"].notna()
                     & (summary["strategy"] != NAIVE.name)]
    fig, ax = _figure(7.5, 5.4)
    for style, line in _series(points, meta):
        line = line.sort_values("kv_over_weights")
        ax.plot(line["kv_over_weights"], line["per_token_ms_median"], **style)
    floors = points.drop_duplicates(["batch_size", "new_tokens"]).sort_values("kv_over_weights")
    several = floors["batch_size"].nunique() > 1
    for batch, line in floors.groupby("batch_size"):
        ax.plot(line["kv_over_weights"], line["floor_ms"], color="black", ls=_floor_line(meta, batch, several),
                lw=1, marker="x", ms=5, label="floor" + (f" ×{batch}" if several else ""))
    ax.axvline(1.0, color="gray", lw=1, ls=":")
    ax.text(1.0, 0.98, " cache = weights", transform=ax.get_xaxis_transform(), fontsize=8, va="top", color="gray")
    _plain_log(ax, "x")
    _plain_log(ax, "y")
    ax.set_xlabel("K/V bytes attended per step / weight bytes per step (full precision)")
    ax.set_ylabel("decode step time (ms, median; a token per sequence)")
    title = "Where the cache decides: at 1 the K/V a step attends weighs as much as the weights it reads"
    return _finish(fig, ax, title, meta, "lines: new token counts of one batch · median of {repeats}")


def _memory_measure(summary: pd.DataFrame, meta: dict) -> tuple[pd.Series, str]:
    """What the run itself added, where recorded (directories before mem_growth_bytes hold only the peak)."""
    where = "GPU allocator" if meta["settings"]["device"].startswith("cuda") else "process RSS"
    growth = summary.get("mem_growth_bytes_median")
    if growth is not None and growth.notna().any():
        return growth, f"Memory the run added over its start ({where})"
    return summary["peak_mem_bytes_median"], f"Peak memory during the run ({where}; growth not recorded)"


def has_allocation(summary: pd.DataFrame) -> bool:
    """Whether the summary holds allocated / live bytes (directories before them do not; naive alone holds none)."""
    return "kv_allocated_bytes" in summary and bool((summary["kv_allocated_bytes"].fillna(0) > 0).any())


def waste_panel(ax, summary: pd.DataFrame) -> None:
    """At the largest batch and length: each cache's allocation (light bar) against its live bytes (solid),
    labelled with the waste. Where a static cache's preallocation against a paged cache's blocks shows."""
    point = summary[(summary["batch_size"] == summary["batch_size"].max())]
    point = point[(point["new_tokens"] == point["new_tokens"].max()) & (point["kv_allocated_bytes"] > 0)]
    for i, row in enumerate(point.itertuples()):
        color = color_of(row.strategy)
        ax.bar(i, row.kv_allocated_bytes / 2**20, color=color, alpha=0.3)
        ax.bar(i, row.kv_live_bytes / 2**20, color=color)
        ax.annotate(f"{100 * row.kv_waste:.0f}% waste", (i, row.kv_allocated_bytes / 2**20), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(point)), point["strategy"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.margins(y=0.15)  # room for the labels above the tallest bar
    ax.set_title(f"Allocated (light) vs live (solid) at batch {point['batch_size'].max()} x "
                 f"{point['new_tokens'].max()} tokens", fontsize=9)


def memory_figure(summary: pd.DataFrame, meta: dict):
    summary = summary[summary["repeats"] > 0]  # points skipped past --naive-max hold no numbers
    waste = has_allocation(summary)
    fig, axes = _figure(16 if waste else 11, 5.0, ncols=3 if waste else 2)
    left, right = axes[:2]
    if waste:
        waste_panel(axes[2], summary)
    measure, what = _memory_measure(summary, meta)
    for style, points in _series(summary, meta):
        if points["strategy"].iloc[0] != NAIVE.name:  # naive holds no cache: nothing to draw on a log axis
            left.plot(points["new_tokens"], points["kv_cache_bytes"] / 2**20, ms=7, **{**style, "ls": "none"})
            # a dash at each length: a run of one length has no line to draw
            left.plot(points["new_tokens"], points["kv_cache_formula_bytes"] / 2**20, color=style["color"], lw=1,
                      ls=style.get("ls", "-"), alpha=0.6, marker="_", ms=16, mew=1.5)
        right.plot(points["new_tokens"], measure[points.index] / 2**20, **style)
    for ax in (left, right):
        _tokens_axis(ax, summary["new_tokens"].unique())
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("KV cache at the end of the run (MiB)")
    _plain_log(left, "y")
    left.set_title("KV cache: allocated (markers) vs its formula (thin lines and dashes, see README)", fontsize=9)
    right.set_ylabel("MiB")
    # from zero, and at least 1 MiB tall: page-sized (4 KiB) noise must not fill the panel
    right.set_ylim(0, max(1.0, 1.1 * float(measure.max()) / 2**20))
    right.set_title(what, fontsize=9)
    fig.suptitle(f"Memory\n{_subtitle(meta, 'median of {repeats} runs')}", fontsize=9)
    _legend_below(fig, *right.get_legend_handles_labels())
    return fig


def floor_line(steps: pd.DataFrame, meta: dict) -> pd.DataFrame | None:
    """The floor per batch and position: the token at position p attends p + 1 keys (from meta's measurements);
    memory or compute, whichever is slower. Directories from before the roofline have a bytes-only floor."""
    if "decode_step" not in meta or "machine_limits" not in meta or steps.empty:
        return None
    step = meta["decode_step"]
    positions = pd.Series(sorted(steps["position"].unique()))
    if "by_batch" not in step:  # one batch, bytes only; results written before the rename say weight_bytes
        fixed = step.get("fixed_bytes", step.get("weight_bytes"))
        bandwidth = meta["machine_limits"]["best_bandwidth_gbs"]
        floor_ms = 1000 * (fixed + step["kv_bytes_per_token"] * (positions + 1)) / (bandwidth * 1e9)
        return pd.DataFrame({"batch_size": _batches(meta)[0], "position": positions, "floor_ms": floor_ms})
    from kvbench.bench.floor import MachineLimits

    limits = MachineLimits.from_dict(meta["machine_limits"])
    frames = []
    for batch, counts in step["by_batch"].items():
        tokens = positions + 1
        floors = [limits.floor(counts["fixed_bytes"] + counts["kv_bytes_per_token"] * t,
                               counts["fixed_flops"] + counts["flops_per_token"] * t, int(batch))[0] for t in tokens]
        frames.append(pd.DataFrame({"batch_size": int(batch), "position": positions, "floor_ms": floors}))
    return pd.concat(frames, ignore_index=True)


def draw_all(runs: pd.DataFrame, summary: pd.DataFrame, steps: pd.DataFrame, meta: dict, out: Path) -> list[Path]:
    """Every plot for a results directory; returns the files written."""
    if runs.empty:
        return []
    written = [save(latency_figure(runs, meta), out / "latency.png"),
               save(memory_figure(summary, meta), out / "memory.png")]
    if summary.loc[summary["strategy"] != NAIVE.name, "speedup_vs_naive"].notna().any():  # naive alone: nothing
        written.append(save(speedup_figure(summary, meta), out / "speedup.png"))
    if not steps.empty:
        floor = floor_line(steps[steps["new_tokens"] == steps["new_tokens"].max()], meta)
        written.append(save(per_token_figure(steps, meta, floor), out / "per_token.png"))
    if "kv_over_weights" in summary and summary["kv_over_weights"].notna().any():
        written.append(save(crossover_figure(summary, meta), out / "crossover.png"))
    return written
