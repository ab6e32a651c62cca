"""One self-contained report (HTML with inline images and styles, or Markdown) for results directories, sweep
directories, or several runs compared. Builds text; the CLI writes it.

For each run: its environment (meta.json), its summary with the floor and what bounds each point, every plot.
For a sweep: its record (sweep.json: points, status, errors) and merged summary, then each point as a run.
For several runs: ratios of medians of each against the first, marked where the repeats differ beyond noise.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

import kvbench
from kvbench.bench.results import ResultsDir
from kvbench.bench.significance import mark_differences, method_name
from kvbench.bench.stats import summarize
from kvbench.errors import KVBenchError

SUMMARY_COLUMNS = {  # summary.csv column -> heading, format
    "strategy": ("strategy", "{}"), "new_tokens": ("tokens", "{:.0f}"), "repeats": ("repeats", "{:.0f}"),
    "total_s_median": ("total s", "{:.4f}"), "per_token_ms_median": ("ms/step", "{:.3f}"),
    "per_token_ms_iqr": ("IQR", "{:.3f}"), "floor_ms": ("floor ms", "{:.3f}"),
    "per_token_over_floor": ("×floor", "{:.2f}"), "bound": ("bound", "{}"),
    "speedup_vs_naive": ("speedup", "{:.2f}"), "noisy": ("noisy", "{}"),
}
ENVIRONMENT_KEYS = ("config_name", "device_name", "cpu_count", "torch_threads", "torch_version", "kvbench_version",
                    "python_version", "platform", "git_commit", "git_dirty", "status", "started_at", "ended_at",
                    "command_line")


@dataclass
class Section:
    """A heading, then blocks: ("p", text), ("table", DataFrame), ("image", path)."""

    title: str
    level: int = 2
    blocks: list[tuple[str, object]] = field(default_factory=list)


# --- reading runs -------------------------------------------------------------------------------------------------

def bound_of(summary: pd.DataFrame, meta: dict) -> pd.Series:
    """Per point, what limits its decode step by the roofline: memory when reading the step's bytes at the
    measured bandwidth (floor_ms) takes longer than its arithmetic at the measured matmul rate, else compute.
    A summary that says so itself (a `bound` column) is taken as it is."""
    if "bound" in summary.columns:
        return summary["bound"]
    gflops = meta.get("machine_limits", {}).get("matmul_gflops")
    if not gflops or "gflops_per_token" not in summary.columns:
        return pd.Series(["unknown"] * len(summary), index=summary.index)
    compute_ms = 1000 * summary["gflops_per_token"] / gflops
    return pd.Series(["memory" if f >= c else "compute" if c == c else "-" for f, c in
                      zip(summary["floor_ms"], compute_ms, strict=True)], index=summary.index)


def read_run(path: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    results = ResultsDir.open(path)
    meta, runs = results.read_meta(), results.read_runs()
    summary = summarize(runs, meta.get("settings", {}).get("strategies")) if not runs.empty else pd.DataFrame()
    if not summary.empty:
        summary["bound"] = bound_of(summary, meta)
    return meta, runs, summary


def shown(value) -> str:
    """A cell for people: unset (None, NaN) as '—', floats to 4 significant digits, the rest as it is."""
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):  # byte counts read back as floats (a column with a gap) stay whole numbers
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def environment(meta: dict) -> pd.DataFrame:
    rows = [(key, meta[key]) for key in ENVIRONMENT_KEYS if key in meta]
    rows += [(f"settings.{k}", shown(v)) for k, v in meta.get("settings", {}).items()]
    limits = meta.get("machine_limits", {})
    if limits:
        rows += [("read bandwidth GB/s (best probe)", limits.get("best_bandwidth_gbs")),
                 ("matmul GFLOP/s", limits.get("matmul_gflops"))]
    if "decode_step" in meta:
        rows.append(("floor", meta["decode_step"].get("floor_definition")))
    return pd.DataFrame(rows, columns=["", "value"]).astype(str)


def summary_view(summary: pd.DataFrame) -> pd.DataFrame:
    shown = [c for c in SUMMARY_COLUMNS if c in summary.columns]
    view = pd.DataFrame({SUMMARY_COLUMNS[c][0]: [_fmt(SUMMARY_COLUMNS[c][1], v) for v in summary[c]] for c in shown})
    return view


def _fmt(pattern: str, value) -> str:
    if isinstance(value, float) and value != value:
        return shown(value)
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def verdicts(path: Path) -> pd.DataFrame | None:
    """kv-evaluate verdicts a run recorded beside its results (kv-evaluate.json: a list of {strategy,
    passed, ...}), if any."""
    file = path / "kv-evaluate.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
        return pd.DataFrame(data if isinstance(data, list) else data.get("checks", [])).astype(str)
    except (OSError, ValueError) as exc:
        raise KVBenchError(f"{file} is not readable JSON ({exc})") from None


def run_sections(path: Path, title: str, level: int = 2) -> list[Section]:
    meta, runs, summary = read_run(path)
    section = Section(title, level)
    section.blocks.append(("table", environment(meta)))
    if summary.empty:
        section.blocks.append(("p", "No finished runs recorded."))
    else:
        section.blocks.append(("p", "Medians over repeats. floor: the least time a decode step can take, reading "
                                    "the bytes it must at the measured bandwidth; ×floor: measured / floor; bound: "
                                    "what the roofline says limits the step (memory or compute)."))
        section.blocks.append(("table", summary_view(summary)))
    checks = verdicts(path)
    if checks is not None:
        section.blocks.append(("p", "kv-evaluate verdicts recorded with this run:"))
        section.blocks.append(("table", checks))
    section.blocks += [("image", png) for png in sorted(path.glob("*.png"))]
    return [section]


def sweep_sections(path: Path) -> list[Section]:
    record = json.loads((path / "sweep.json").read_text())
    head = Section(f"Sweep {path}")
    head.blocks.append(("table", pd.DataFrame(
        [("spec", record.get("spec_source")), ("runner", record.get("runner")), ("host", record.get("host")),
         ("status", record.get("status")), ("started_at", record.get("started_at")),
         ("ended_at", record.get("ended_at"))], columns=["", "value"]).astype(str)))
    points = pd.DataFrame([{"point": pid, "status": e.get("status"), "host": e.get("host", ""),
                            "seconds": e.get("seconds", ""), "error": e.get("error") or ""}
                           for pid, e in record.get("points", {}).items()]).astype(str)
    head.blocks.append(("table", points))
    if (path / "summary.csv").is_file():
        merged = pd.read_csv(path / "summary.csv")
        # the point and what varies across points (its axes, as the record names them): not every column
        # outside the table's own (kv_waste, skipped... are results, not settings)
        varied = dict.fromkeys(k for entry in record.get("points", {}).values() for k in entry.get("axes", {}))
        axes = [c for c in ("point", *varied) if c in merged.columns and c not in SUMMARY_COLUMNS]
        view = pd.concat([merged[axes].map(shown), summary_view(merged)], axis=1)
        head.blocks.append(("p", "Every point's summary, merged (settings of the point first)."))
        head.blocks.append(("table", view))
    head.blocks += [("image", png) for png in sorted(path.glob("*.png"))]
    sections = [head]
    for pid in record.get("points", {}):
        point_dir = path / "points" / pid
        if (point_dir / "meta.json").is_file():
            sections += run_sections(point_dir, f"Point {pid}", level=3)
    return sections


# --- comparing runs ---------------------------------------------------------------------------------------------

def comparison_section(paths: list[Path]) -> Section:
    """Each run against the first: ratios of medians, marked (*) where the repeats differ beyond noise."""
    section = Section("Comparison against the first run")
    section.blocks.append(("p", f"B / A: ratio of medians (below 1: B is faster). * marks a difference beyond "
                                f"the runs' noise: {method_name()}. With 3 repeats a side no difference can "
                                "reach that; use --repeats 5 or more to compare."))
    base = _runs_of(paths[0])
    for path in paths[1:]:
        other = _runs_of(path)
        keys = ["point", "strategy", "new_tokens"] if "point" in base.columns and "point" in other.columns \
            else ["strategy", "new_tokens"]
        a, b = (r.groupby(keys)[["total_s", "per_token_ms"]].median() for r in (base, other))
        joined = a.merge(b, left_index=True, right_index=True, suffixes=("_a", "_b")).reset_index()
        if joined.empty:
            section.blocks.append(("p", f"{path}: no point in common with {paths[0]}."))
            continue
        joined = mark_differences(joined, base, other, keys)
        rows = {k: joined[k].astype(str) for k in keys}
        for label, column in (("total", "total_s"), ("per_token", "per_token_ms")):
            ratio = joined[f"{column}_b"] / joined[f"{column}_a"]
            rows[f"{label} B/A"] = [("-" if r != r else f"{r:.3f}") + ("*" if s else "")
                                    for r, s in zip(ratio, joined[f"{label}_significant"], strict=True)]
            rows[f"{label} p"] = ["-" if p is None or p != p else f"{p:.3f}" for p in joined[f"{label}_p"]]
        section.blocks.append(("p", f"A = {paths[0]}, B = {path}"))
        section.blocks.append(("table", pd.DataFrame(rows)))
    return section


def _runs_of(path: Path) -> pd.DataFrame:
    if (path / "sweep.json").is_file():
        merged = path / "results.csv"
        if not merged.is_file():
            raise KVBenchError(f"{path}: the sweep has no merged results.csv yet; finish it with --resume")
        return pd.read_csv(merged)
    return ResultsDir.open(path).read_runs()


def build(paths: list[Path]) -> list[Section]:
    sections = []
    for path in paths:
        if (path / "sweep.json").is_file():
            sections += sweep_sections(path)
        elif (path / "meta.json").is_file():
            results = ResultsDir.open(path)
            if results.read_runs().empty:  # as plot and compare say (a sweep's points say it in its report)
                raise KVBenchError(f"{results.runs_csv} holds no finished runs; nothing to report")
            sections += run_sections(path, f"Run {path}")
        else:
            raise KVBenchError(f"{path} is neither a results directory (meta.json) nor a sweep directory "
                               "(sweep.json)")
    if len(paths) > 1:
        sections.append(comparison_section(paths))
    return sections


# --- rendering ----------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; display: block; margin: 1em 0; border: 1px solid #eee; }
p.note { color: #555; }
table.kv td { text-align: left; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    kind = " class='kv'" if list(frame.columns)[:1] == [""] else ""  # key/value tables read left-aligned
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_data(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(sections: list[Section], title: str) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>kvbench {kvbench.__version__}, {datetime.now().isoformat(timespec='seconds')}</p>"]
    for section in sections:
        parts.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        for kind, content in section.blocks:
            if kind == "p":
                parts.append(f"<p class='note'>{html.escape(str(content))}</p>")
            elif kind == "table":
                parts.append(_html_table(content))
            else:
                parts.append(f"<img alt='{html.escape(content.name)}' src='{_image_data(content)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return shown(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) or " " for c in frame.columns) + " |",
             "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(sections: list[Section], title: str) -> str:
    """For an issue or PR: tables as Markdown; plots named by path (Markdown cannot hold them inline)."""
    parts = [f"# {title}", f"kvbench {kvbench.__version__}, {datetime.now().isoformat(timespec='seconds')}"]
    for section in sections:
        parts.append(f"{'#' * section.level} {section.title}")
        for kind, content in section.blocks:
            parts.append(markdown_table(content) if kind == "table" else
                         str(content) if kind == "p" else f"plot: `{content}`")
    return "\n\n".join(parts) + "\n"


def frame_as(frame: pd.DataFrame, fmt: str) -> str:
    """A table for scripts (csv, json: records) or for pasting (md)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=1) + "\n"
    return markdown_table(frame) + "\n"
