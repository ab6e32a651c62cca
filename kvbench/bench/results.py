"""A results directory: results.csv (one row per timed run), steps.csv, summary.csv, meta.json, plots.

Rows are appended and flushed (and fsynced) as each run finishes, so an interrupted sweep leaves a valid CSV
holding every finished run, and --resume can continue from it.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.errors import KVBenchError

RUN_COLUMNS = [
    "config", "strategy", "device", "device_name", "dtype", "threads", "batch_size", "prompt_len", "new_tokens",
    "repeat", "total_s", "prefill_s", "decode_s", "per_token_ms", "tokens_per_s", "kv_cache_bytes",
    "kv_cache_formula_bytes", "peak_mem_bytes", "floor_ms", "bandwidth_gbs", "gflops_per_token", "achieved_gflops",
    "finished_at",
]
STEP_COLUMNS = ["strategy", "new_tokens", "repeat", "step", "position", "step_ms"]
RunKey = tuple[str, int, int]  # (strategy, new_tokens, repeat)


def _append_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())  # a finished run survives even a killed process


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # never leave a half-written meta.json


class ResultsDir:
    def __init__(self, path: Path):
        self.path = path
        self.runs_csv = path / "results.csv"
        self.steps_csv = path / "steps.csv"
        self.summary_csv = path / "summary.csv"
        self.meta_json = path / "meta.json"

    @classmethod
    def create(cls, out: Path | None, base: Path, config_name: str, device: str, dtype: str = "float32") -> ResultsDir:
        """A new directory: `out` if given (it must not hold results), else
        base/<date-time>-<config>-<device>[-<dtype> unless float32], with -2, -3... if that exists."""
        if out is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            name = f"{stamp}-{config_name}-{device.replace(':', '')}" + ("" if dtype == "float32" else f"-{dtype}")
            out, suffix = base / name, 1
            while out.exists():
                suffix += 1
                out = base / f"{name}-{suffix}"
        elif (out / "results.csv").exists() or (out / "meta.json").exists():
            raise KVBenchError(f"--out {out} already holds results; choose another directory or --resume {out}")
        out.mkdir(parents=True, exist_ok=True)
        return cls(out)

    @classmethod
    def open(cls, path: Path) -> ResultsDir:
        results = cls(path)
        if not results.meta_json.is_file():
            raise KVBenchError(f"{path} is not a kvbench results directory (no meta.json)")
        return results

    def append_run(self, row: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        _append_csv(self.steps_csv, STEP_COLUMNS, steps)  # steps first: a run row implies its steps exist
        _append_csv(self.runs_csv, RUN_COLUMNS, [row])

    def read_runs(self) -> pd.DataFrame:
        if not self.runs_csv.exists():
            return pd.DataFrame(columns=RUN_COLUMNS)
        try:
            runs = pd.read_csv(self.runs_csv)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise KVBenchError(f"{self.runs_csv} is not a readable CSV ({exc})") from None
        missing = [c for c in RUN_COLUMNS if c not in runs.columns]
        if missing:
            raise KVBenchError(f"{self.runs_csv} lacks column(s) {', '.join(missing)}; was it written by kvbench?")
        return runs

    def read_steps(self) -> pd.DataFrame:
        if not self.steps_csv.exists():
            return pd.DataFrame(columns=STEP_COLUMNS)
        steps = pd.read_csv(self.steps_csv)
        # keep only steps of runs that finished (a run interrupted after its steps were written is dropped)
        # and a run repeated after such an interruption keeps only its last steps
        key = ["strategy", "new_tokens", "repeat"]
        done = self.read_runs()[key].drop_duplicates()
        steps = steps.drop_duplicates(subset=[*key, "step"], keep="last")
        return steps.merge(done, on=key, how="inner")

    def completed(self) -> set[RunKey]:
        runs = self.read_runs()
        return {(str(s), int(n), int(r)) for s, n, r in zip(runs["strategy"], runs["new_tokens"], runs["repeat"], strict=True)}

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.meta_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KVBenchError(f"{self.meta_json} is not readable JSON ({exc})") from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        _write_json(self.meta_json, meta)

    def write_summary(self, summary: pd.DataFrame) -> None:
        summary.to_csv(self.summary_csv, index=False)
