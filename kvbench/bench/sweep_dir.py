"""A sweep directory: points/<id>/ (each a normal results directory), logs/<id>.log, sweep.json, and the
merged results.csv / summary.csv with each point's settings as columns, plus plots across points.

sweep.json is rewritten (atomically) after every point, so that an interrupted sweep keeps an honest record;
--resume reads the spec back from it and runs only the points whose directory is not complete.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.bench.results import SWEEP_JSON, ResultsDir, make_out_dir
from kvbench.bench.runners import Outcome, point_state
from kvbench.bench.spec import Point, expand, validate_spec
from kvbench.errors import KVBenchError



def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


class SweepDir:
    def __init__(self, path: Path):
        self.path = path
        self.points_dir = path / "points"
        self.logs_dir = path / "logs"
        self.sweep_json = path / SWEEP_JSON

    @classmethod
    def create(cls, out: Path | None, spec_path: Path) -> SweepDir:
        if out is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            out = Path("results") / f"sweep-{stamp}-{spec_path.stem}"
        make_out_dir(out, "a sweep")
        return cls(out)

    @classmethod
    def open(cls, path: Path) -> SweepDir:
        sweep = cls(path)
        if not sweep.sweep_json.is_file():
            raise KVBenchError(f"{path} is not a kvbench sweep directory (no {SWEEP_JSON})")
        return sweep

    def lock(self):
        """The results directories' lock, on the sweep directory: one sweep process writes it at a time."""
        return ResultsDir(self.path).lock()

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.sweep_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KVBenchError(f"{self.sweep_json} is not readable JSON ({exc})") from None

    def write(self, record: dict[str, Any]) -> None:
        tmp = self.sweep_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, self.sweep_json)  # never half-written

    def points_of(self, record: dict[str, Any]) -> list[Point]:
        """The points of the recorded spec (configs resolved against the spec's directory, as at the start)."""
        spec = validate_spec(record["spec"], str(self.sweep_json))
        return expand(spec, Path(record["spec_dir"]))

    def reconcile(self, record: dict[str, Any]) -> None:
        """Points recorded as not complete whose directory says complete (a sweep before this check recorded a
        Ctrl-C that landed after the point finished as an interruption) are recorded complete."""
        for point_id, entry in record["points"].items():
            if entry.get("status") != "complete" and point_state(self.points_dir / point_id) == "complete":
                entry.update(status="complete", error=None)

    def to_do(self, points: list[Point]) -> list[Point]:
        """Points whose directory is not complete: never started, failed, or interrupted (continued)."""
        return [p for p in points if point_state(self.points_dir / p.id) != "complete"]


def new_record(raw: dict, spec_path: Path, points: list[Point], runner: str) -> dict[str, Any]:
    return {
        "spec": raw,
        "spec_source": str(spec_path.resolve()),
        "spec_dir": str(spec_path.resolve().parent),
        "runner": runner,
        "host": socket.gethostname(),
        "started_at": now(),
        "ended_at": None,
        "status": "running",
        "points": {p.id: {"axes": p.axes, "config": p.config, "options": p.options, "status": "pending"}
                   for p in points},
        "runs": [],
    }


def record_outcome(record: dict[str, Any], outcome: Outcome) -> None:
    entry = record["points"][outcome.point_id]
    entry.update(outcome.record(), ended_at=now())
    entry.setdefault("attempts", 0)
    entry["attempts"] += 1


# --- merging ------------------------------------------------------------------------------------------------------

def _with_axes(frame: pd.DataFrame, point_id: str, axes: dict[str, Any]) -> pd.DataFrame:
    """A point's rows with `point` first and each axis as a column, unless the rows already have that column
    (results.csv's own dtype or batch_size is what actually ran)."""
    added = {"point": point_id}
    for key, value in axes.items():
        if key not in frame.columns:
            added[key] = ",".join(map(str, value)) if isinstance(value, list) else value
    return pd.concat([pd.DataFrame({k: [v] * len(frame) for k, v in added.items()}, index=frame.index), frame],
                     axis=1)


def merge(sweep: SweepDir, record: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every complete or partial point's results.csv and summary.csv, stacked, in point order."""
    runs, summaries = [], []
    for point_id, entry in record["points"].items():
        directory = sweep.points_dir / point_id
        if point_state(directory) is None:
            continue
        results = ResultsDir(directory)
        point_runs = results.read_runs()
        if point_runs.empty:
            continue
        runs.append(_with_axes(point_runs, point_id, entry["axes"]))
        if results.summary_csv.is_file():
            summaries.append(_with_axes(pd.read_csv(results.summary_csv), point_id, entry["axes"]))
    merged_runs = pd.concat(runs, ignore_index=True) if runs else pd.DataFrame()
    merged_summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    if not merged_runs.empty:
        merged_runs.to_csv(sweep.path / "results.csv", index=False)
    if not merged_summary.empty:
        merged_summary.to_csv(sweep.path / "summary.csv", index=False)
    return merged_runs, merged_summary


# --- plots across points --------------------------------------------------------------------------------------------

def plot_points(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Per point, at its longest length: decode step time by strategy, and that time over the floor."""
    if summary.empty:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvbench.bench.plots import color_of

    longest = summary[summary["new_tokens"] == summary.groupby("point")["new_tokens"].transform("max")]
    written = []
    for column, name, label in (("per_token_ms_median", "points_per_token.png", "decode step time (ms, median)"),
                                ("per_token_over_floor", "points_over_floor.png", "decode step time / floor")):
        table = longest.pivot_table(index="point", columns="strategy", values=column, sort=False)
        if table.dropna(how="all").empty:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(table) + 2), 4.5), layout="constrained")
        table.plot.bar(ax=ax, color=[color_of(s) for s in table.columns], width=0.8)
        ax.set_ylabel(label)
        ax.set_xlabel("")
        ax.set_title(f"{label}, each point at its longest length", fontsize=11)
        if column == "per_token_over_floor":
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.legend(title="strategy", fontsize=8)
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    return written
