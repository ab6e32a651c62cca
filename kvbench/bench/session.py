"""A benchmark session: start or resume a results directory, run the sweep, write summary and plots."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch

from kvbench.bench import floor
from kvbench.bench.machine import command_line, device_name, machine_info
from kvbench.bench.results import ResultsDir
from kvbench.bench.stats import summarize
from kvbench.bench.sweep import Reporter, Sweep, SweepSettings, calibrate, plan_runs
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


def start(loaded: LoadedConfig, settings: SweepSettings, out: Path | None, base: Path) -> Session:
    device = torch.device(settings.device)
    results = ResultsDir.create(out, base, loaded.name, settings.device, settings.dtype)
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
    return Session(loaded, settings, results, meta)


def resume(path: Path) -> Session:
    """Reopen a results directory with its recorded settings; the config must not have changed."""
    results = ResultsDir.open(path)
    meta = results.read_meta()
    try:
        settings = SweepSettings(**meta["settings"])
        loaded = load_config(Path(meta["config_source"]))
    except (KeyError, TypeError) as exc:
        raise KVBenchError(f"{results.meta_json}: cannot resume, meta.json lacks settings ({exc})") from None
    if loaded.model.model_dump() != meta["config"]:
        raise KVBenchError(f"{meta['config_source']} changed since {path} started; resuming would mix two models "
                           "(restore the config or start a new run)")
    meta.setdefault("resumed_at", []).append(now())
    meta.update(status="running", ended_at=None, command_line=command_line())
    results.write_meta(meta)
    return Session(loaded, settings, results, meta)


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
    """Write summary.csv, plots and the final meta.json from whatever runs finished."""
    results = session.results
    runs = results.read_runs()
    summary = summarize(runs, session.settings.strategies) if not runs.empty else pd.DataFrame()
    if not runs.empty:
        results.write_summary(summary)
    plots = draw_all(runs, summary, results.read_steps(), session.meta, results.path) if not runs.empty else []
    session.meta.update(status=status, ended_at=now(), runs_recorded=len(runs))
    results.write_meta(session.meta)
    return summary, plots


def redraw(path: Path) -> tuple[pd.DataFrame, list[Path]]:
    results = ResultsDir.open(path)
    meta = results.read_meta()
    runs = results.read_runs()
    if runs.empty:
        raise KVBenchError(f"{results.runs_csv} holds no finished runs; nothing to plot")
    summary = summarize(runs, meta.get("settings", {}).get("strategies"))
    results.write_summary(summary)
    return summary, draw_all(runs, summary, results.read_steps(), meta, path)


def compare(path_a: Path, path_b: Path) -> tuple[pd.DataFrame, dict, dict]:
    """Per strategy and length, medians of B divided by medians of A (below 1: B is faster)."""
    frames, metas = [], []
    for path in (path_a, path_b):
        results = ResultsDir.open(path)
        metas.append(results.read_meta())
        frames.append(summarize(results.read_runs()).set_index(["strategy", "new_tokens"]))
    a, b = (frame[["total_s_median", "per_token_ms_median"]] for frame in frames)
    joined = a.merge(b, left_index=True, right_index=True, suffixes=("_a", "_b"))
    if joined.empty:
        raise KVBenchError(f"{path_a} and {path_b} share no (strategy, length) point to compare")
    joined["total_ratio"] = joined["total_s_median_b"] / joined["total_s_median_a"]
    joined["per_token_ratio"] = joined["per_token_ms_median_b"] / joined["per_token_ms_median_a"]
    return joined.reset_index(), metas[0], metas[1]
