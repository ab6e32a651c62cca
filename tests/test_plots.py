"""Figures people can read: every text inside the figure, legends off the data, titles apart, a colour bar."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from kvbench import visualize
from kvbench.bench import plots
from kvbench.bench.stats import summarize

STRATEGIES = ["naive", "static", "dynamic", "sliding", "quantized", "static+compile"]
LENGTHS = [10, 50, 100, 500, 1000]
META = {"config_name": "default", "device_name": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz",
        "settings": {"device": "cpu", "dtype": "bfloat16", "batch_size": 16, "prompt_len": 128, "repeats": 3}}


def runs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for (i, strategy), length, repeat in itertools.product(enumerate(STRATEGIES), LENGTHS, range(3)):
        total = length * (0.07 if strategy == "naive" else 0.008) * (1 + 0.05 * rng.random())
        rows.append(dict(strategy=strategy, new_tokens=length, repeat=repeat, total_s=total, prefill_s=0.01,
                         decode_s=total - 0.01, per_token_ms=1000 * total / length, tokens_per_s=length / total,
                         kv_cache_bytes=0 if strategy == "naive" else 12288 * (16 + length) * (1 + i % 2),
                         kv_cache_formula_bytes=0 if strategy == "naive" else 12288 * (16 + length),
                         peak_mem_bytes=700e6 + length * 1e5, mem_growth_bytes=length * 1e4 * (i + 1),
                         floor_ms=7.0, bandwidth_gbs=30.0, gflops_per_token=0.4, achieved_gflops=50.0))
    return pd.DataFrame(rows)


def steps() -> pd.DataFrame:
    return pd.DataFrame([dict(strategy=s, new_tokens=1000, repeat=0, step=i, position=16 + i, step_ms=7.0 + i / 100)
                         for s in STRATEGIES for i in range(1, 1000)])


def figures() -> dict:
    r = runs()
    summary = summarize(r, STRATEGIES)
    return {"latency": plots.latency_figure(r, META), "speedup": plots.speedup_figure(summary, META),
            "per_token": plots.per_token_figure(steps(), META), "memory": plots.memory_figure(summary, META)}


def boxes(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


def assert_readable(fig) -> None:
    """Everything drawn lies inside the figure (nothing cut at an edge); no legend over an axes (data) area."""
    fig.canvas.draw()
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, of what is drawn: out-of-view ticks excluded
    inside = fig.bbox_inches
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= inside.x1 + 0.01 and drawn.y1 <= inside.y1 + 0.01, \
        f"something is cut at the figure's edge: drawn {drawn}, figure {inside}"
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends, "no legend"
    for legend, ax in itertools.product(legends, fig.axes):
        assert not legend.get_window_extent().overlaps(ax.bbox), "a legend covers an axes' data"


@pytest.mark.parametrize("name", ["latency", "speedup", "per_token", "memory"])
def test_benchmark_figures_are_readable(name):
    fig = figures()[name]
    try:
        assert_readable(fig)
    finally:
        plt.close("all")


def test_memory_panel_measures_what_the_run_added_from_zero():
    fig = figures()["memory"]
    right = fig.axes[1]
    assert right.get_ylim()[0] == 0 and "added over its start" in right.get_title()
    plt.close("all")


def test_attention_figure_has_a_colour_bar_and_titles_apart_for_many_heads():
    maps = [torch.softmax(torch.randn(12, 20, 20), -1) for _ in range(2)]  # 2 layers x 12 heads, as default.yaml
    fig = visualize.attention_figure(maps, [f"t{i}" for i in range(20)], "default: attention")
    try:
        fig.canvas.draw()
        colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        assert len(colorbars) == 1 and "attention weight" in colorbars[0].get_ylabel()
        panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible() and ax.axison]
        assert len(panels) == 24
        titles = boxes(fig, [ax.title for ax in panels])
        for a, b in itertools.combinations(titles, 2):
            assert not a.overlaps(b), "two panel titles collide"
        for title, ax in itertools.product(titles, panels):
            assert not title.overlaps(ax.bbox), "a panel title covers a panel"
        assert all(t.get_fontsize() >= 8 for t in (ax.title for ax in panels))
        width, height = fig.get_size_inches()
        assert width < 20 and height < 20  # wrapped into rows, not one 24-panel strip
    finally:
        plt.close("all")


def test_cache_growth_legend_is_off_the_data():
    growth = pd.DataFrame([dict(strategy=s, step=i, position=16 + i, allocated=1000 * (16 + i), filled=100 * i)
                           for s in ("static", "dynamic", "sliding", "quantized") for i in range(200)])
    fig = visualize.cache_growth_figure(growth, "demo: KV cache over 200 decode steps (window 64)")
    try:
        assert_readable(fig)
    finally:
        plt.close("all")


def test_a_strategys_markers_and_lines_share_one_colour():
    """static+self-only had no colour of its own: its markers and its dashed formula line took two different
    colours from matplotlib's cycle. A name kvbench does not know gets a fixed colour too."""
    from matplotlib.colors import to_hex

    summary = summarize(runs().replace({"strategy": {"dynamic": "static+self-only", "sliding": "plugin-cache"}}))
    fig = plots.memory_figure(summary, META)
    try:
        colours = [to_hex(line.get_color()) for line in fig.axes[0].get_lines()]  # markers, then formula line
        assert len(colours) == 10 and colours[::2] == colours[1::2], colours
        assert len(set(colours[::2])) == 5  # and every strategy its own
    finally:
        plt.close("all")


def test_memory_figure_shows_allocated_against_live_with_the_waste():
    r = runs()
    cached = r["strategy"] != "naive"
    r["kv_allocated_bytes"] = r["kv_cache_bytes"]
    r["kv_live_bytes"] = (r["kv_cache_bytes"] * 0.75).where(cached, 0)  # 25% waste for every cache
    fig = plots.memory_figure(summarize(r, STRATEGIES), META)
    try:
        assert_readable(fig)
        panel = fig.axes[2]
        labels = [t.get_text() for t in panel.texts]
        assert labels == ["25% waste"] * 5, labels  # every cache at the largest point; naive has no bar
        assert [t.get_text() for t in panel.get_xticklabels()] == STRATEGIES[1:]
    finally:
        plt.close("all")


def crossover_summary() -> pd.DataFrame:
    """Two batches, times within one decade (where matplotlib labels minor ticks 2x10^1, 3x10^1 by default)."""
    rows = [dict(strategy=s, batch_size=b, new_tokens=n, kv_over_weights=0.03 * b * n / 1000,
                 per_token_ms_median=(8 if b == 1 else 19) + i + n / 200, floor_ms=7.5 if b == 1 else 10.5)
            for i, s in enumerate(["static", "quantized"]) for b in (1, 16) for n in (100, 1000)]
    return pd.DataFrame(rows)


def test_log_axes_are_labelled_in_plain_numbers():
    """10, 20, 50 on the log axes of the crossover, per-token and latency figures, never 2x10^1."""
    meta = dict(META, settings=dict(META["settings"], batch_size=[1, 16]))
    drawn = [plots.crossover_figure(crossover_summary(), meta), figures()["per_token"], figures()["latency"]]
    try:
        for fig in drawn:
            fig.canvas.draw()
            labels = [t.get_text() for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                      for t in axis.get_ticklabels(which="both") if t.get_text()]
            assert labels and not any("times" in t or "^" in t for t in labels), labels
        assert_readable(drawn[0])
    finally:
        plt.close("all")


def test_minor_log_ticks_are_labelled_at_2_and_5_below_one_too():
    """A latency axis from 0.003 to 0.03 s had one label (0.01): the leading digit of 0.002 is '0' in %g."""
    assert [plots.SOME_MINOR(v, 0) for v in (0.002, 0.003, 0.005, 20.0, 30.0, 500.0)] == \
        ["0.002", "", "0.005", "20", "", "500"]


def test_a_log_axis_under_a_decade_labels_every_minor_tick():
    """The regime run's crossover y-axis ran from 5.4 to 30 ms and read only 10 and 20."""
    fig, ax = plt.subplots()
    try:
        ax.plot([0.004, 0.5], [5.4, 30.0])
        plots._plain_log(ax, "y")
        fig.canvas.draw()
        labels = {t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()}
        assert {"6", "7", "8", "9", "10", "20"} <= labels, labels
        ax.set_ylim(0.5, 300)  # three decades: 2 and 5 only
        fig.canvas.draw()
        labels = {t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()}
        assert {"2", "5", "20", "50"} <= labels and not labels & {"3", "7", "30"}, labels
    finally:
        plt.close(fig)


def test_lengths_of_one_decade_label_only_the_lengths_run():
    """8, 16, 32 tokens: never 2x10^1 and 3x10^1 printed between (and over) them."""
    r = runs().query("new_tokens in (10, 50)")
    fig = plots.latency_figure(r, META)
    try:
        fig.canvas.draw()
        labels = [t.get_text() for t in fig.axes[0].xaxis.get_ticklabels(which="both") if t.get_text()]
        assert labels == ["10", "50"], labels
    finally:
        plt.close("all")


def test_a_naive_only_run_draws_no_speedup_figure(tmp_path):
    r = runs().query("strategy == 'naive'")
    written = plots.draw_all(r, summarize(r, ["naive"]), pd.DataFrame(), META, tmp_path)
    assert written and not (tmp_path / "speedup.png").exists()


def test_each_batch_floor_has_its_batch_line_style():
    """'floor ×1' and 'floor ×16' were both dashed: two legend entries that looked the same."""
    meta = dict(META, settings=dict(META["settings"], batch_size=[1, 16]))
    fig = plots.crossover_figure(crossover_summary(), meta)
    try:
        styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()
                  if line.get_label().startswith("floor")}
        assert set(styles) == {"floor ×1", "floor ×16"} and styles["floor ×1"] != styles["floor ×16"], styles
    finally:
        plt.close("all")


def test_speedup_axis_spans_the_lengths_naive_ran_and_names_the_rest():
    summary = summarize(runs(), STRATEGIES)
    summary.loc[summary["new_tokens"] >= 500, "speedup_vs_naive"] = float("nan")  # naive skipped there
    fig = plots.speedup_figure(summary, META)
    try:
        low, high = fig.axes[0].get_xlim()
        assert 100 < high < 500 and low < 10, (low, high)
        assert "naive not run at 500, 1000 tokens" in fig.axes[0].get_title()
    finally:
        plt.close("all")
