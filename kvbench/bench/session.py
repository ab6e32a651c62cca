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

from kvbench import plugins
from kvbench import strategies as registry
from kvbench.bench import floor
from kvbench.bench.machine import check_threads, command_line, device_name, machine_info
from kvbench.bench.results import ResultsDir
from kvbench.bench.paths import code_paths
from kvbench.kernels import packed_from_rows
from kvbench.model import kernel_choices, pack_from_rows
from kvbench.pages import huge_pages
from kvbench.bench.stats import POINT, summarize
from kvbench.bench.sweep import (DEFAULTS, NAIVE_RUN_BUDGET_S, Reporter, Sweep, SweepSettings, calibrate, plan_runs,
                                 skipped_points, timed_runs)
from kvbench.bench.timing import PeakMemory
from kvbench.config import LoadedConfig, load_config
from kvbench.errors import KVBenchError
from kvbench.generate import for_generation
from kvbench.bench.plots import draw_all
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
    def naive_max(self) -> int | None:
        """The --naive-max given, else the one the cost estimate chose (recorded once the estimate is made)."""
        return self.settings.naive_max or self.meta.get("naive_max")

    @property
    def to_do(self) -> int:
        """Timed runs not yet recorded."""
        return len(timed_runs(self.settings, self.naive_max) - self.results.completed())


def start(loaded: LoadedConfig, settings: SweepSettings, results: ResultsDir) -> Session:
    device = torch.device(settings.device)
    meta = {
        **machine_info(device),
        "config_name": loaded.name,
        "config_source": str(loaded.source.resolve()),
        "config": loaded.model.model_dump(),
        "weights_path": str(loaded.weights_path) if loaded.weights_path else None,
        "settings": settings.to_dict(),
        "plugins": {name: plugins.SOURCES[name] for name in settings.strategies if name in plugins.SOURCES},
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
        loaded = load_config(Path(meta["config_source"]), settings.engine)
    except (KeyError, TypeError) as exc:
        raise KVBenchError(f"{results.meta_json}: cannot resume, meta.json lacks settings ({exc})") from None
    check_threads(settings.threads, resuming=results.meta_json)
    check_strategies_loaded(settings.strategies, meta, results.meta_json)
    if loaded.model.model_dump() != meta["config"]:
        raise KVBenchError(f"{meta['config_source']} changed since {path} started; resuming would mix two models "
                           "(restore the config or start a new run)")
    meta.setdefault("resumes", []).append({"started_at": now(), "command_line": command_line(), "ended_at": None,
                                           "status": "running", "runs": []})
    meta.update(status="running", ended_at=None)
    results.write_meta(meta)
    return Session(loaded, settings, results, meta, frozenset(results.completed()))


def check_strategies_loaded(names: list[str], meta: dict, meta_json: Path) -> None:
    """Every recorded strategy must be registered now. A plugin's is not: kvbench never imports code named in
    a results directory, so the user types its spec again (meta.json records it, as text, to say which)."""
    missing = [name for name in names if name not in registry.REGISTRY]
    if missing:
        sources = meta.get("plugins", {})
        specs = ",".join(sources.get(name, name) for name in missing)
        raise KVBenchError(f"{meta_json}: strategies {', '.join(missing)} are plugins, which kvbench never imports "
                           f"from a results directory; load them again: --resume {meta_json.parent} --strategies {specs}")


def run(session: Session, device: torch.device, reporter: Reporter) -> None:
    """Everything not yet recorded, in order. Raises KeyboardInterrupt through; finish() tidies up."""
    s = session.settings
    if s.threads:
        torch.set_num_threads(s.threads)
    model = build_model(session.loaded, device, DTYPES[s.dtype])
    if "machine_limits" not in session.meta:  # a resumed run keeps its first measurement: one floor per run
        reporter.preparing("measuring the machine's limits (the floor's probes)")
        record_limits(session, device, model)
    else:
        decode_as_first_process(session.meta, model)
    # per process (a resume may run with another setting), once the weights are allocated: what they got
    (session.meta["resumes"][-1] if session.meta.get("resumes") else session.meta)["huge_pages"] = huge_pages()
    session.results.write_meta(session.meta)
    limits = floor.MachineLimits.from_dict(session.meta["machine_limits"])
    sweep = Sweep(session.loaded, model, s, session.results, device, device_name(device), limits)
    smallest = sweep.model_and_prompt(min(s.batches))  # kept here: the sweep holds one batch's inputs at a time
    reporter.preparing("estimating the run's time (a few timed steps of each strategy)")
    costs = calibrate(*smallest, max(s.lengths), device, s.strategies, sweep.model_and_prompt(max(s.batches)),
                      s.window)
    if session.naive_max is None:
        session.meta.update(naive_max=costs.naive_max(s), naive_max_source=(
            f"estimate: the longest length whose naive run at batch {max(s.batches)} takes at most "
            f"{NAIVE_RUN_BUDGET_S:.0f} s"))
        session.results.write_meta(session.meta)

    def compiled(batch: int, seconds: float) -> None:
        session.meta.setdefault("compile_s", []).append(round(seconds, 2))  # one entry per batch and (re)start
        session.results.write_meta(session.meta)

    sweep.run(plan_runs(s, costs, session.results.completed(), session.naive_max), reporter, compiled)


def record_limits(session: Session, device: torch.device, model) -> None:
    """Measure the machine (every probe recorded), and write what each batch's decode step reads and
    computes, and which code path each strategy runs, into meta.json."""
    s = session.settings
    by_batch = {}
    for batch in s.batches:
        bound = for_generation(model, batch, s.src_len or 0, s.seed)
        by_batch[batch] = {
            "fixed_bytes": floor.weight_bytes_per_step(bound, batch),
            "kv_bytes_per_token": floor.kv_bytes_read(bound, 1, batch),
            "fixed_flops": floor.cached_step_flops(bound, 0, batch),
            "flops_per_token": floor.cached_step_flops(bound, 1, batch) - floor.cached_step_flops(bound, 0, batch),
        }
    longest = s.prompt_len + max(s.lengths)
    step_bytes = [step["fixed_bytes"] + step["kv_bytes_per_token"] * tokens for step in by_batch.values()
                  for tokens in (s.prompt_len, longest)]
    session.meta["machine_limits"] = floor.measure_limits(device, step_bytes, DTYPES[s.dtype], s.batches).to_dict()
    session.meta["decode_step"] = {
        "by_batch": by_batch,
        "floor_definition": "floor_ms = max(bytes / bandwidth, flops / matmul throughput); bytes = fixed_bytes + "
                            "kv_bytes_per_token x tokens attended (full-precision K/V), bandwidth the best probe "
                            "over the buffer size nearest those bytes; flops = fixed_flops + flops_per_token x "
                            "tokens attended, throughput measured with rows = batch in the run's dtype; tokens "
                            "attended averaged over the run's decode steps; the same floor for every strategy",
    }
    small = for_generation(model, min(s.batches), s.src_len or 0, s.seed)
    session.meta["code_paths"] = code_paths(small, s.strategies, s.batches, longest)
    session.meta["packed_from_rows"] = packed_from_rows(model)
    session.results.write_meta(session.meta)


def decode_as_first_process(meta: dict, model) -> None:
    """A resumed run decodes as its first process did, and as meta.json's code paths say: its Linears switch
    to oneDNN's packed matmul at the recorded row count, not at one this process would measure anew."""
    rows = meta.get("packed_from_rows")
    if rows is not None and {kernel for kernel, _ in kernel_choices(model)} == {"onednn"}:
        pack_from_rows(model, rows)


def finish(session: Session, status: str) -> tuple[pd.DataFrame, list[Path]]:
    """Write summary.csv, columns.md, plots, then the final meta.json, from whatever runs finished.

    Ctrl-C while writing them records the status "interrupted" before passing on: meta.json is replaced
    atomically, so it is never half-written, and `--resume` or `kvbench plot` writes the rest again.
    """
    results = session.results
    try:
        runs = results.read_runs()
        summary = summarize_session(runs, session.meta) if not runs.empty else pd.DataFrame()
        if not runs.empty:
            results.write_summary(summary)
        results.write_columns_doc()
        plots = draw_all(runs, summary, results.read_steps(), session.meta, results.path) if not runs.empty else []
    except KeyboardInterrupt:
        record_end(session, "interrupted")
        raise
    record_end(session, status)
    return summary, plots


def summarize_session(runs: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """The summary with the naive points past --naive-max marked as skipped."""
    settings = SweepSettings(**meta["settings"]) if "settings" in meta else None
    naive_max = meta.get("settings", {}).get("naive_max") or meta.get("naive_max")
    if settings is None:
        return summarize(runs)
    estimated = settings.naive_max is None
    note = f"skipped: past --naive-max {naive_max}" + (" (estimated: a longer naive run would exceed its budget)"
                                                       if estimated else "")
    return summarize(runs, settings.strategies, skipped_points(settings, naive_max), note)


def record_end(session: Session, status: str) -> None:
    """meta.json's status, end time and run count; for a resume, also which runs it recorded."""
    done = session.results.completed()
    session.meta.update(status=status, ended_at=now(), runs_recorded=len(done))
    if session.meta.get("resumes"):
        new = sorted(done - session.recorded_before, key=lambda key: (key[1], key[2], key[3], key[0]))
        session.meta["resumes"][-1].update(ended_at=now(), status=status, runs=[list(key) for key in new])
    session.results.write_meta(session.meta)


def redraw(results: ResultsDir) -> tuple[pd.DataFrame, list[Path]]:
    path = results.path
    meta = results.read_meta()
    runs = results.read_runs()
    if runs.empty:
        raise KVBenchError(f"{results.runs_csv} holds no finished runs; nothing to plot")
    summary = summarize_session(runs, meta)
    results.write_summary(summary)
    results.write_columns_doc()
    return summary, draw_all(runs, summary, results.read_steps(), meta, path)


SETTING_DEFAULTS = {"engine": DEFAULTS.engine}  # runs recorded before engine was a setting ran kvbench's
# Settings that change every point's numbers; batch size is not one: it is part of each point's key, so runs
# at other batches show as points only one run has, never as ratios mixing two batches
COMPARED_SETTINGS = ("engine", "dtype", "prompt_len", "device", "threads", "src_len")


@dataclass
class Comparison:
    joined: pd.DataFrame  # per shared (strategy, batch_size, new_tokens): medians of A and B and their ratios
    meta_a: dict
    meta_b: dict
    only_a: list[tuple[str, int, int]]  # points measured in A only
    only_b: list[tuple[str, int, int]]
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
    a, b = ({**SETTING_DEFAULTS, **settings} for settings in (a, b))  # runs recorded before a setting existed
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
        frames.append(summarize(runs).set_index(POINT))
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
    return ", ".join(f"{s}@{n}" + (f"x{b}" if b != 1 else "") for s, b, n in sorted(index))
