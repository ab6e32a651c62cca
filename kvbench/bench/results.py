"""A results directory: results.csv (one row per timed run), steps.csv, summary.csv, meta.json, plots.

Rows are appended and flushed (and fsynced) as each run finishes, so an interrupted sweep leaves a valid CSV
holding every finished run, and --resume can continue from it. A process that writes a directory holds its
lock (.kvbench.lock) for as long as it runs, so that two processes never append to one directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from filelock import FileLock, Timeout

from kvbench.bench.columns import write_columns_doc
from kvbench.bench.machine import command_line
from kvbench.errors import KVBenchError, KVBenchWarning

RUN_COLUMNS = [
    "config", "strategy", "device", "device_name", "dtype", "threads", "batch_size", "prompt_len", "new_tokens",
    "repeat", "total_s", "prefill_s", "decode_s", "per_token_ms", "tokens_per_s", "kv_cache_bytes",
    "kv_cache_formula_bytes", "kv_allocated_bytes", "kv_live_bytes", "kv_waste", "peak_mem_bytes", "mem_growth_bytes", "weight_bytes", "kv_bytes", "floor_ms", "bound",
    "bandwidth_gbs", "gflops_per_token", "achieved_gflops", "finished_at",
]
# absent from directories written before they existed: read as NaN (or empty)
ADDED_RUN_COLUMNS = {"mem_growth_bytes", "weight_bytes", "kv_bytes", "bound", "kv_allocated_bytes", "kv_live_bytes",
                     "kv_waste"}
TEXT_RUN_COLUMNS = {"config", "strategy", "device", "device_name", "dtype", "bound", "finished_at"}
KEY_COLUMNS = ["strategy", "batch_size", "new_tokens", "repeat"]  # a run's identity: never empty
STEP_COLUMNS = ["strategy", "batch_size", "new_tokens", "repeat", "step", "position", "step_ms"]
RunKey = tuple[str, int, int, int]  # (strategy, batch_size, new_tokens, repeat)
LOCK_NAME, OWNER_NAME = ".kvbench.lock", ".kvbench.owner"


def _header(path: Path) -> list[str] | None:
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def _append_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    # an existing file keeps its own header (a directory resumed after a column was added keeps its shape)
    header = _header(path) if path.exists() and path.stat().st_size else None
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header or columns, extrasaction="ignore" if header else "raise")
        if header is None:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())  # a finished run survives even a killed process


def partial_last_line(data: bytes) -> bytes | None:
    """A last line that a killed process left unfinished (no newline at the end, or fewer fields than the
    header), or None."""
    lines = data.splitlines(keepends=True)
    if len(lines) < 2:
        return None
    last = lines[-1]
    n_fields = len(next(csv.reader([lines[0].decode("utf-8", "replace")])))
    complete = last.endswith(b"\n") and len(next(csv.reader([last.decode("utf-8", "replace")]), [])) >= n_fields
    return None if complete else last


def drop_partial_last_line(path: Path) -> str | None:
    """Cut an unfinished last line (partial_last_line), so that appending never continues it. Returns what was
    dropped, for the user, or None."""
    if not path.exists():
        return None
    data = path.read_bytes()
    last = partial_last_line(data)
    if last is None:
        return None
    with path.open("r+b") as f:
        f.truncate(len(data) - len(last))
        f.flush()
        os.fsync(f.fileno())
    return f"{path}: dropped an unfinished last line ({last[:60]!r}), left by an interrupted write"


def _as_numbers(runs: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Every column but the text ones must hold numbers: name the first cell that does not."""
    for column in runs.columns:
        if column in TEXT_RUN_COLUMNS or column not in RUN_COLUMNS:
            continue
        numbers = pd.to_numeric(runs[column], errors="coerce")
        bad = numbers.isna() & runs[column].notna()
        if bad.any():
            row = int(bad.idxmax())
            raise KVBenchError(f"{path}, line {row + 2}: column {column} holds {runs[column][row]!r}, not a number; "
                               "correct or delete that row")
        runs[column] = numbers
    for column in KEY_COLUMNS:
        if runs[column].isna().any():
            row = int(runs[column].isna().idxmax())
            raise KVBenchError(f"{path}, line {row + 2}: column {column} is empty; correct or delete that row")
    return runs


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
        make_out_dir(out, "results")
        return cls(out)

    @classmethod
    def open(cls, path: Path) -> ResultsDir:
        results = cls(path)
        if not Path(path).exists():
            raise KVBenchError(f"{path} does not exist; give a directory that kvbench benchmark wrote")
        if not results.meta_json.is_file():
            raise KVBenchError(f"{path} is not a kvbench results directory (no meta.json)")
        return results

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for this process, or refuse naming the process that holds it."""
        lock = FileLock(str(self.path / LOCK_NAME), timeout=0)
        owner = self.path / OWNER_NAME
        try:
            lock.acquire()
        except Timeout:
            raise KVBenchError(f"{self.path} is being written by another kvbench process ({self._owner(owner)}); "
                               "wait for it to finish, or stop it and --resume") from None
        try:
            owner.write_text(json.dumps({"pid": os.getpid(), "command_line": command_line(),
                                         "since": datetime.now().isoformat(timespec="seconds")}) + "\n")
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()

    @staticmethod
    def _owner(owner: Path) -> str:
        try:
            info = json.loads(owner.read_text())
            return f"pid {info['pid']}, since {info['since']}: {info['command_line']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "process unknown"

    def drop_partial_lines(self) -> list[str]:
        """Before appending to a directory an interrupted process wrote: its CSVs end on whole rows."""
        return [note for note in map(drop_partial_last_line, (self.steps_csv, self.runs_csv)) if note]

    def write_columns_doc(self) -> None:
        write_columns_doc(self.path / "columns.md")

    def append_run(self, row: dict[str, Any], steps: list[dict[str, Any]]) -> None:
        _append_csv(self.steps_csv, STEP_COLUMNS, steps)  # steps first: a run row implies its steps exist
        _append_csv(self.runs_csv, RUN_COLUMNS, [row])

    def read_runs(self) -> pd.DataFrame:
        if not self.runs_csv.exists():
            return pd.DataFrame(columns=RUN_COLUMNS)
        data = self.runs_csv.read_bytes()
        last = partial_last_line(data)
        if last is not None:  # read, not repaired: only a resume writes here (and drops it)
            warnings.warn(f"{self.runs_csv}: ignored an unfinished last line ({last[:60]!r}), left by an "
                          "interrupted write; --resume drops it", KVBenchWarning, stacklevel=2)
            data = data[:len(data) - len(last)]
        try:
            runs = pd.read_csv(io.BytesIO(data))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise KVBenchError(f"{self.runs_csv} is not a readable CSV ({exc})") from None
        missing = [c for c in RUN_COLUMNS if c not in runs.columns and c not in ADDED_RUN_COLUMNS]
        if missing:
            raise KVBenchError(f"{self.runs_csv} lacks column(s) {', '.join(missing)}; was it written by kvbench?")
        return _as_numbers(runs.reindex(columns=[*RUN_COLUMNS, *(c for c in runs if c not in RUN_COLUMNS)]),
                           self.runs_csv)

    def read_steps(self) -> pd.DataFrame:
        if not self.steps_csv.exists():
            return pd.DataFrame(columns=STEP_COLUMNS)
        steps = pd.read_csv(self.steps_csv)
        runs = self.read_runs()
        if "batch_size" not in steps.columns:  # written before batch was an axis: one batch size per directory
            steps.insert(1, "batch_size", int(runs["batch_size"].iloc[0]) if len(runs) else 1)
        # keep only steps of runs that finished (a run interrupted after its steps were written is dropped)
        # and a run repeated after such an interruption keeps only its last steps
        key = KEY_COLUMNS
        done = runs[key].drop_duplicates()
        steps = steps.drop_duplicates(subset=[*key, "step"], keep="last")
        return steps.merge(done, on=key, how="inner")

    def completed(self) -> set[RunKey]:
        runs = self.read_runs()
        return {(str(s), int(b), int(n), int(r)) for s, b, n, r in
                zip(runs["strategy"], runs["batch_size"], runs["new_tokens"], runs["repeat"], strict=True)}

    def read_meta(self) -> dict[str, Any]:
        try:
            return json.loads(self.meta_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KVBenchError(f"{self.meta_json} is not readable JSON ({exc})") from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        _write_json(self.meta_json, meta)

    def write_summary(self, summary: pd.DataFrame) -> None:
        summary.to_csv(self.summary_csv, index=False)


SWEEP_JSON = "sweep.json"
# what each kind of kvbench output leaves in its directory: --out refuses a directory holding any of them, whichever
# command writes it (a sweep once wrote over a benchmark's results.csv and summary.csv). A sweep is checked
# first: it also writes a merged results.csv and summary.csv at its top.
OUTPUT_MARKERS = {"a sweep": (SWEEP_JSON,), "results": ("results.csv", "meta.json", "summary.csv")}


def make_out_dir(out: Path, what: str) -> None:
    """Create --out for new `what` ("results" or "a sweep"), refusing a file and a directory that already holds
    kvbench output of either kind (the user resumes that one, or names another)."""
    if out.exists() and not out.is_dir():
        raise KVBenchError(f"--out {out} is a file; give a directory for {what} (it is created)")
    for kind, markers in OUTPUT_MARKERS.items():
        found = next((marker for marker in markers if (out / marker).exists()), None)
        if found:
            resume = f" or --resume {out}" if kind == what else ""
            raise KVBenchError(f"--out {out} already holds {kind} ({found}); choose another directory{resume}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVBenchError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
