"""sweep: many benchmark points from one spec, each its own process, here or on a Ray cluster."""

from __future__ import annotations

import enum
import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from kvbench.bench.runners import Outcome, RayRunner, run_local, write_tree
from kvbench.bench.spec import Point, expand, load_spec
from kvbench.bench.sweep_dir import SweepDir, merge, new_record, now, plot_points, record_outcome
from kvbench.bench.sweep import DEFAULT_SRC_LEN, DEFAULTS
from kvbench.cli.bench import DEFAULT_LENGTHS, duration, new_settings
from kvbench.cli.common import app, console, err_console, fail_cleanly, plural
from kvbench.config import _read_yaml, load_config
from kvbench.errors import KVBenchError, KVBenchWarning

# What a point costs besides its timed and warm-up runs, measured here for the tiny config (2 cores, CPU):
# starting Python and torch, building the model, measuring the floor, writing plots: about 6-7 s.
POINT_OVERHEAD_S = 6.0


class Runner(str, enum.Enum):
    local = "local"
    ray = "ray"


def point_settings(point: Point):
    """The point's settings exactly as `kvbench benchmark` would check them (a bad point is refused before
    anything runs). Options the spec leaves out take benchmark's defaults."""
    o = point.options
    loaded = load_config(point.config)
    lengths = ",".join(map(str, o["lengths"])) if "lengths" in o else DEFAULT_LENGTHS
    strategies = ",".join(o["strategies"]) if "strategies" in o else None
    d = DEFAULTS
    with warnings.catch_warnings():  # a spec's one window serves a matrix of strategies, windowed or not:
        warnings.simplefilter("ignore", KVBenchWarning)  # benchmark's "--window has no effect" is not for it
        settings = new_settings(loaded, o.get("device", "auto"), lengths, strategies, o.get("repeats", d.repeats),
                                o.get("warmup", d.warmup), o.get("prompt_len", d.prompt_len),
                                str(o.get("batch_size", d.batch_size[0])), o.get("threads"),
                                o.get("dtype", d.dtype), o.get("seed", d.seed), o.get("compile", False),
                                o.get("window"), o.get("src_len", DEFAULT_SRC_LEN))
    return loaded, settings


def runs_here(point: Point) -> bool:
    """Can this machine check (and estimate) the point? A CUDA point sent to a Ray cluster may not."""
    return not str(point.options.get("device", "")).startswith("cuda") or torch.cuda.is_available()


def estimate_seconds(point: Point) -> float:
    """The benchmark's own estimate (a few timed steps of this point's model), plus the per-point overhead."""
    from kvbench.bench.sweep import calibrate, plan_runs
    from kvbench.generate import for_generation
    from kvbench.precision import DTYPES
    from kvbench.verify import random_prompt
    from kvbench.weights import build_model

    loaded, s = point_settings(point)
    device = torch.device(s.device)
    batch = max(s.batches)  # a point has one batch size (the spec's batch_size is an int)
    model = for_generation(build_model(loaded, device, DTYPES[s.dtype]), batch, s.src_len or 0, s.seed)
    prompt = random_prompt(loaded.model, batch, s.prompt_len, s.seed).to(device)
    costs = calibrate(model, prompt, max(s.lengths), device, s.strategies, window=s.window)
    return POINT_OVERHEAD_S + sum(run.estimate_s for run in plan_runs(s, costs, set()))


def points_table(points: list[Point], estimates: dict[str, float | None]) -> Table:
    table = Table(title="points (each one `kvbench benchmark` process)", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("point", no_wrap=True)
    table.add_column("estimate", justify="right", no_wrap=True)
    table.add_column("benchmark options")
    for p in points:
        estimate = estimates.get(p.id)
        table.add_row(escape(p.id), "-" if estimate is None else duration(estimate),
                      escape(" ".join(p.benchmark_args())))
    return table


def dry_run(points: list[Point]) -> None:
    estimates = {p.id: estimate_seconds(p) if runs_here(p) else None for p in points}
    console.print(points_table(points, estimates))
    known = [e for e in estimates.values() if e is not None]
    unknown = len(points) - len(known)
    console.print(f"{plural(len(points), 'point')}, estimated {duration(sum(known))} on this machine, one at a time"
                  + (f" ({unknown} CUDA points not estimated: no CUDA here)" if unknown else ""), highlight=False)


class Progress:
    """One line per point on stderr; sweep.json rewritten after each, so an interruption loses nothing."""

    def __init__(self, sweep: SweepDir, record: dict, total: int):
        self.sweep, self.record, self.total, self.done = sweep, record, total, 0

    def start(self, point: Point) -> None:
        self.record["points"][point.id].update(status="running", started_at=now())
        self.sweep.write(self.record)
        err_console.print(escape(f"[{self.done + 1}/{self.total}] {point.id}: started"), highlight=False)

    def finish(self, point: Point, outcome: Outcome) -> None:
        self.done += 1
        record_outcome(self.record, outcome)
        if outcome.log and not (self.sweep.logs_dir / f"{point.id}.log").exists():  # a Ray worker's log
            write_tree({f"{point.id}.log": outcome.log.encode()}, self.sweep.logs_dir)
        self.sweep.write(self.record)
        error = (outcome.error or "").removeprefix(f"{outcome.status}: ")  # benchmark's "interrupted: ..." line
        what = outcome.status + (f": {error}" if error else "")
        err_console.print(escape(f"[{self.done}/{self.total}] {point.id}: {what} ({duration(outcome.seconds)} "
                                 f"on {outcome.host})"), highlight=False)


def execute(sweep: SweepDir, record: dict, points: list[Point], runner: Runner, ray_address: str) -> str:
    """Run the points; returns the sweep's status. Ctrl-C stops after telling the running point(s) to stop."""
    progress = Progress(sweep, record, len(points))
    record["runs"].append({"started_at": now(), "runner": runner.value, "points": [p.id for p in points]})
    try:
        if runner is Runner.local:
            run_local(points, sweep.points_dir, sweep.logs_dir, progress.start, progress.finish)
        else:
            ray_runner = RayRunner(ray_address)
            ray_runner.connect()
            try:
                ray_runner.run(points, sweep.points_dir, progress.start, progress.finish)
            finally:
                ray_runner.shutdown()
    except KeyboardInterrupt:
        return "interrupted"
    return "complete"


def finish(sweep: SweepDir, record: dict, status: str) -> None:
    failed = [pid for pid, entry in record["points"].items() if entry.get("status") == "failed"]
    record.update(status="failed points" if status == "complete" and failed else status, ended_at=now())
    record["runs"][-1]["ended_at"] = now()
    sweep.write(record)
    runs, summary = merge(sweep, record)
    plots = plot_points(summary, sweep.path)
    states = [entry.get("status") for entry in record["points"].values()]
    counts = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    console.print(escape(f"sweep in {sweep.path}: {counts}; merged {len(runs)} runs into results.csv"
                         + (f"; plots {', '.join(p.name for p in plots)}" if plots else "")), highlight=False)
    if status == "interrupted":
        err_console.print(escape(f"interrupted: finished points kept; continue with: kvbench sweep --resume "
                                 f"{sweep.path}"), highlight=False)
        raise typer.Exit(130)
    if failed:
        err_console.print(escape(f"{len(failed)} point(s) failed ({', '.join(failed)}); their errors are in "
                                 f"{sweep.sweep_json} and {sweep.logs_dir}/; --resume runs them again"),
                          highlight=False)
        raise typer.Exit(1)


def open_resumed(resume: Path) -> tuple[SweepDir, dict, list[Point]]:
    sweep = SweepDir.open(resume)
    record = sweep.read()
    try:
        points = sweep.points_of(record)
        sweep.reconcile(record)
    except (KeyError, TypeError) as exc:
        raise KVBenchError(f"{sweep.sweep_json}: cannot resume, it lacks the spec ({exc})") from None
    return sweep, record, points


@app.command()
@fail_cleanly
def sweep(
    spec: Annotated[Path | None, typer.Argument(metavar="SPEC", help="Sweep spec (YAML): configs, shared "
                                                "benchmark options, matrix, exclude. See examples/sweep.yaml.")] = None,
    dry_run_: Annotated[bool, typer.Option("--dry-run", help="Print the points and a time estimate; run "
                                           "nothing.")] = False,
    out: Annotated[Path | None, typer.Option(help="Sweep directory (created).",
                                             show_default="results/sweep-<date-time>-<spec>")] = None,
    runner: Annotated[Runner, typer.Option(help="local: one point at a time here; ray: each point a Ray task "
                                           "holding a whole node (or one GPU).")] = Runner.local,
    ray_address: Annotated[str, typer.Option(help="Ray cluster to join (--runner ray).")] = "auto",
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted sweep in this directory: complete "
                                                "points are kept, the others run (or continue).")] = None,
) -> None:
    """Run benchmark over a matrix of configs and options; merge the points' results, plots and a record."""
    if resume is not None:
        if spec is not None or out is not None or dry_run_:
            raise KVBenchError("--resume continues the recorded spec; drop SPEC, --out and --dry-run")
        sweep_dir, record, points = open_resumed(resume)
    else:
        if spec is None:
            raise KVBenchError("give a SPEC file (see examples/sweep.yaml), or --resume DIR")
        loaded_spec = load_spec(spec)
        points = expand(loaded_spec, spec.resolve().parent)
    if runner is Runner.ray:
        RayRunner(ray_address)  # without Ray installed: say how to install it, before anything else
    for point in points:
        if runs_here(point):
            point_settings(point)  # refuse a bad point now, not hours into the sweep
    pending = points if resume is None else sweep_dir.to_do(points)  # a resume: only the points left to run
    elsewhere = [point.id for point in pending if not runs_here(point)]
    if elsewhere and runner is Runner.local and not dry_run_:
        raise KVBenchError(f"{plural(len(elsewhere), 'point')} ({', '.join(elsewhere)}) ask for device cuda, and "
                           "this machine has no CUDA: run them with --runner ray on a cluster with GPUs, or set "
                           "device: cpu in the spec")
    if dry_run_:
        dry_run(points)
        return
    if resume is None:
        sweep_dir = SweepDir.create(out, spec)
        record = new_record(_read_yaml(spec), spec, points, runner.value)
    with sweep_dir.lock():
        to_do = sweep_dir.to_do(points)
        console.print(escape(f"{plural(len(points), 'point')}, {len(to_do)} to run ({runner.value} runner), writing to "
                             f"{sweep_dir.path}"), highlight=False)
        if resume is None:
            sweep_dir.write(record)
        status = execute(sweep_dir, record, to_do, runner, ray_address) if to_do else "complete"
        finish(sweep_dir, record, status)
