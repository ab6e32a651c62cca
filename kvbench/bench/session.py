"""A benchmark session: start or resume a results directory, run the sweep, write summary and plots.

The caller holds the directory's lock (ResultsDir.lock) from start or resume to finish. meta.json records the
first command line and settings; each resume is appended to meta["resumes"] with when and which runs it did.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from kvbench.bench import floor
from kvbench.bench.machine import check_threads, command_line, device_name, machine_info
from kvbench.bench.results import ResultsDir
from kvbench.bench.stats import summarize
from kvbench.bench.sweep import Reporter, Sweep, SweepSettings, calibrate, plan_runs, timed_runs
from kvbench.bench.timing import PeakMemory
from kvbench.config import LoadedConfig, load_config
from kvbench.errors import KVBenchError
from kvbench.generate import for_generation
from kvbench.plots import draw_all
from kvbench.precision import DTYPES
from kvbench.weights import build_model


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


@dataclass
class Session:
    loaded: LoadedConfig
    settings: SweepSettings
    results: ResultsDir
    meta: dict
    recorded_before: frozenset = frozenset()  # runs already in results.csv when this session began

    @property
    def to_do(self) -> int:
        """Timed runs not yet recorded."""
        return len(timed_runs(self.settings) - self.results.completed())


def start(loaded: LoadedConfig, settings: SweepSettings, results: ResultsDir) -> Session:
    device = torch.device(settings.device)
    meta = {
        **machine_info(device),
        "config_name": loaded.name,
        "config_source": str(loaded.source.resolve()),
        "config": loaded.model.model_dump(),
        "weights_path": str(loaded.weights_path) if loaded.weights_path else None,
        "settings": settings.to_dict(),
        "command_line": command_line(),
        "peak_memory_method": PeakMemory(device).describe(),
        "started_at": now(),
        "ended_at": None,
        "status": "running",
    }
    results.write_meta(meta)
    results.write_columns_doc()
    return Session(loaded, settings, results, meta)


def resume(results: ResultsDir) -> Session:
    """Reopen a results directory with its recorded settings; the config must not have changed.
    Call drop_partial_lines() first: an interrupted write may have left half a row."""
    path = results.path
    meta = results.read_meta()
    try:
        settings = SweepSettings(**meta["settings"])
        loaded = load_config(Path(meta["config_source"]))
    except (KeyError, TypeError) as exc:
        raise KVBenchError(f"{results.meta_json}: cannot resume, meta.json lacks settings ({exc})") from None
    check_threads(settings.threads, resuming=results.meta_json)
    if loaded.model.model_dump() != meta["config"]:
        raise KVBenchError(f"{meta['config_source']} changed since {path} started; resuming would mix two models "
                           "(restore the config or start a new run)")
    meta.setdefault("resumes", []).append({"started_at": now(), "command_line": command_line(), "ended_at": None,
                                           "status": "running", "runs": []})
    meta.update(status="running", ended_at=None)
    results.write_meta(meta)
    return Session(loaded, settings, results, meta, frozenset(results.completed()))


def run(session: Session, device: torch.device, reporter: Reporter) -> None:
    """Everything not yet recorded, in order. Raises KeyboardInterrupt through; finish() tidies up."""
    s = session.settings
    if s.threads:
        torch.set_num_threads(s.threads)
    model = for_generation(build_model(session.loaded, device, DTYPES[s.dtype]), s.batch_size, s.src_len or 0, s.seed)
    if "machine_limits" not in session.meta:  # a resumed run keeps its first measurement: one floor per run
        step_bytes = floor.weight_bytes_per_step(model, s.batch_size)
        session.meta["machine_limits"] = floor.measure_limits(device, step_bytes, DTYPES[s.dtype]).to_dict()
        session.meta["decode_step"] = {
            "fixed_bytes": step_bytes,
            "kv_bytes_per_token": floor.kv_bytes_read(model, 1, s.batch_size),
            "floor_definition": "floor_ms = (fixed_bytes + kv_bytes_per_token x tokens attended) / best read "
                                "bandwidth; fixed bytes: the weights a decode step reads (and an encoder-"
                                "decoder's cached cross K/V); tokens attended averaged over the run's decode "
                                "steps; the same floor for every strategy at a given length",
        }
        session.results.write_meta(session.meta)
    bandwidth = session.meta["machine_limits"]["best_bandwidth_gbs"]
    sweep = Sweep(session.loaded, model, s, session.results, device, device_name(device), bandwidth)
    compile_s = sweep.compile_seconds()
    if compile_s is not None:
        session.meta.setdefault("compile_s", []).append(round(compile_s, 2))  # one entry per (re)start
        session.results.write_meta(session.meta)
        reporter.compiled(compile_s)
    costs = calibrate(model, sweep.prompt, max(s.lengths), device)
    sweep.run(plan_runs(s, costs, session.results.completed()), reporter)


def finish(session: Session, status: str) -> tuple[pd.DataFrame, list[Path]]:
    """Write summary.csv, columns.md, plots, then the final meta.json, from whatever runs finished.

    Ctrl-C while writing them records the status "interrupted" before passing on: meta.json is replaced
    atomically, so it is never half-written, and `--resume` or `kvbench plot` writes the rest again.
    """
    results = session.results
    try:
        runs = results.read_runs()
        summary = summarize(runs, session.settings.strategies) if not runs.empty else pd.DataFrame()
        if not runs.empty:
            results.write_summary(summary)
        results.write_columns_doc()
        plots = draw_all(runs, summary, results.read_steps(), session.meta, results.path) if not runs.empty else []
    except KeyboardInterrupt:
        record_end(session, "interrupted")
        raise
    record_end(session, status)
    return summary, plots


def record_end(session: Session, status: str) -> None:
    """meta.json's status, end time and run count; for a resume, also which runs it recorded."""
    done = session.results.completed()
    session.meta.update(status=status, ended_at=now(), runs_recorded=len(done))
    if session.meta.get("resumes"):
        new = sorted(done - session.recorded_before, key=lambda key: (key[1], key[2], key[0]))
        session.meta["resumes"][-1].update(ended_at=now(), status=status, runs=[list(key) for key in new])
    session.results.write_meta(session.meta)


def redraw(results: ResultsDir) -> tuple[pd.DataFrame, list[Path]]:
    path = results.path
    meta = results.read_meta()
    runs = results.read_runs()
    if runs.empty:
        raise KVBenchError(f"{results.runs_csv} holds no finished runs; nothing to plot")
    summary = summarize(runs, meta.get("settings", {}).get("strategies"))
    results.write_summary(summary)
    results.write_columns_doc()
    return summary, draw_all(runs, summary, results.read_steps(), meta, path)


COMPARED_SETTINGS = ("dtype", "batch_size", "prompt_len", "device", "threads", "src_len")


@dataclass
class Comparison:
    joined: pd.DataFrame  # per shared (strategy, new_tokens): medians of A and B and their ratios
    meta_a: dict
    meta_b: dict
    only_a: list[tuple[str, int]]  # points measured in A only
    only_b: list[tuple[str, int]]
    differences: list[str]  # what differs between the two runs besides the code: the ratios mix these in


def differences(meta_a: dict, meta_b: dict) -> list[str]:
    found = []
    if meta_a.get("config") != meta_b.get("config"):
        found.append(f"config: {meta_a.get('config_name')} vs {meta_b.get('config_name')}"
                     + (" (same name, different values)" if meta_a.get("config_name") == meta_b.get("config_name")
                        else ""))
    if meta_a.get("device_name") != meta_b.get("device_name"):
        found.append(f"device: {meta_a.get('device_name')} vs {meta_b.get('device_name')}")
    a, b = meta_a.get("settings", {}), meta_b.get("settings", {})
    found += [f"{key}: {a.get(key)} vs {b.get(key)}" for key in COMPARED_SETTINGS if a.get(key) != b.get(key)]
    return found


def compare(path_a: Path, path_b: Path) -> Comparison:
    """Per strategy and length, medians of B divided by medians of A (below 1: B is faster)."""
    frames, metas = [], []
    for path in (path_a, path_b):
        results = ResultsDir.open(path)
        metas.append(results.read_meta())
        runs = results.read_runs()
        if runs.empty:
            raise KVBenchError(f"{results.runs_csv} holds no finished runs; nothing to compare")
        frames.append(summarize(runs).set_index(["strategy", "new_tokens"]))
    a, b = (frame[["total_s_median", "per_token_ms_median"]] for frame in frames)
    joined = a.merge(b, left_index=True, right_index=True, suffixes=("_a", "_b"))
    only_a, only_b = sorted(set(a.index) - set(b.index)), sorted(set(b.index) - set(a.index))
    if joined.empty:
        raise KVBenchError(f"{path_a} and {path_b} share no (strategy, length) point: A has {_points(a.index)}, "
                           f"B has {_points(b.index)}")
    joined["total_ratio"] = joined["total_s_median_b"] / joined["total_s_median_a"]
    joined["per_token_ratio"] = joined["per_token_ms_median_b"] / joined["per_token_ms_median_a"]
    return Comparison(joined.reset_index(), metas[0], metas[1], only_a, only_b, differences(*metas))


def _points(index) -> str:
    return ", ".join(f"{s}@{n}" for s, n in sorted(index))
