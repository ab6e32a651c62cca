"""Run a sweep's points: each one `kvbench benchmark` process, here (local) or as a Ray task on a whole node.

A point runs in its own process (as optimum-benchmark isolates runs) so that allocator state, torch's threads
and compiled caches never leak from one point into the next. Runners never print: they report through the
callbacks the CLI passes (`on_start`, `on_done`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from kvbench.bench.spec import Point
from kvbench.errors import KVBenchError

RAY_INSTALL = "pip install 'kvbench[ray]'  (from a checkout: pip install -e '.[ray]')"
LOG_TAIL_LINES = 40


@dataclass
class Outcome:
    """How one point ended: complete, failed (with the error benchmark printed) or interrupted."""

    point_id: str
    status: str
    returncode: int
    seconds: float
    host: str
    error: str | None = None
    log: str = ""  # the end of benchmark's stdout and stderr
    files: dict[str, bytes] = field(default_factory=dict, repr=False)  # Ray: the results directory's files

    def record(self) -> dict:
        """What sweep.json keeps of it."""
        kept = asdict(self)
        kept.pop("files")
        kept.pop("log")
        return kept


OnStart = Callable[[Point], None]
OnDone = Callable[[Point, Outcome], None]


# --- one point --------------------------------------------------------------------------------------------------

def point_state(out: Path) -> str | None:
    """A point directory's status from its meta.json (complete, interrupted, running...), None if it holds no
    run yet. The directory is the truth: a sweep.json written before a crash may lag behind it."""
    try:
        return json.loads((out / "meta.json").read_text()).get("status", "unknown")
    except (OSError, ValueError):
        return None


def benchmark_command(point: Point, out: Path) -> list[str]:
    """Continue a point that started (benchmark's own --resume keeps its finished runs), else start it."""
    kvbench = [sys.executable, "-m", "kvbench", "benchmark"]
    if point_state(out) is not None:
        return [*kvbench, "--resume", str(out)]
    return [*kvbench, *point.benchmark_args(), "--out", str(out)]


def _error_line(log: str) -> str:
    """The line benchmark printed for its failure ('error: ...'), else the last line of the log."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "kv-evaluate failed"))]
    return (errors or lines or ["no output"])[-1].removeprefix("error: ")


def _wait_passing_ctrl_c(process: subprocess.Popen) -> int:
    """Wait for the child; on Ctrl-C, hand it one SIGINT and wait for it to save what it finished."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait()
        raise


def run_point(point: Point, out: Path, log_path: Path) -> Outcome:
    """Run (or continue) one point into `out` as its own process; its output goes to log_path.

    The child has its own session, so a terminal's Ctrl-C reaches the sweep only, which passes exactly one
    SIGINT on: the child then records an interrupted run (exit 130) that --resume continues.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    with log_path.open("a") as log:
        process = subprocess.Popen(benchmark_command(point, out), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        interrupted = False
        try:
            returncode = _wait_passing_ctrl_c(process)
        except KeyboardInterrupt:
            interrupted, returncode = True, process.returncode
    text = log_path.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
    # the directory is the truth: a Ctrl-C that lands after the point recorded itself complete (while it prints
    # its table) ends the process with 130, yet nothing of the point is left to do
    done = returncode == 0 or point_state(out) == "complete"
    status = "complete" if done else "interrupted" if interrupted or returncode == 130 else "failed"
    outcome = Outcome(point.id, status, returncode, round(time.perf_counter() - start, 2), socket.gethostname(),
                      None if status == "complete" else _error_line(tail), tail)
    if interrupted:
        raise PointInterrupted(outcome)
    return outcome


class PointInterrupted(KeyboardInterrupt):
    """Ctrl-C during a point, carrying how that point ended (its finished runs are kept in its directory)."""

    def __init__(self, outcome: Outcome):
        super().__init__()
        self.outcome = outcome


# --- local --------------------------------------------------------------------------------------------------------

def run_local(points: Iterable[Point], points_dir: Path, logs_dir: Path, on_start: OnStart, on_done: OnDone) -> None:
    """One point at a time, on this machine. Ctrl-C: the running point is told to stop, recorded, and raised."""
    for point in points:
        on_start(point)
        try:
            outcome = run_point(point, points_dir / point.id, logs_dir / f"{point.id}.log")
        except PointInterrupted as stop:
            on_done(point, stop.outcome)
            raise
        on_done(point, outcome)


# --- Ray ----------------------------------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise KVBenchError(f"--runner ray needs Ray, which is not installed; install it with: {RAY_INSTALL}") from None
    return ray


def read_tree(directory: Path) -> dict[str, bytes]:
    """Every file under a directory by relative path: how a point's results travel through Ray's object store."""
    if not directory.is_dir():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
            and not p.name.startswith(".kvbench.")}  # the lock files belong to the process that wrote them


def write_tree(files: dict[str, bytes], directory: Path) -> None:
    for name, data in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def config_bundle(config: str) -> tuple[str, dict[str, bytes]]:
    """A point's config as (where it will be under the bundle's root, the files to ship): a worker may not
    share this machine's disk. A shipped name travels as itself; a YAML file travels with the weights file it
    names (same relative layout); a checkpoint directory with its files."""
    path = Path(config)
    if not path.is_absolute():
        return config, {}
    if path.is_dir():
        return "config", {f"config/{name}": data for name, data in read_tree(path).items()}
    from kvbench.config import load_config

    files = [path]
    weights = load_config(path).weights_path
    if weights is not None and weights.is_file():
        files.append(weights)
    root = Path(os.path.commonpath([f.parent for f in files]))
    return str(path.relative_to(root)), {str(f.relative_to(root)): f.read_bytes() for f in files}


def _ray_point(point: Point, config_files: dict[str, bytes], config_name: str, started: dict[str, bytes]) -> Outcome:
    """Runs on a Ray worker: the point in a scratch directory, its files returned through the object store."""
    with tempfile.TemporaryDirectory(prefix="kvbench-point-") as scratch:
        root = Path(scratch)
        write_tree(config_files, root / "config-bundle")
        if config_files:
            point = Point(point.id, str(root / "config-bundle" / config_name), point.options, point.axes)
        out = root / point.id
        write_tree(started, out)  # an interrupted point continues from its finished runs
        try:
            outcome = run_point(point, out, root / "benchmark.log")
        except PointInterrupted as stop:
            outcome = stop.outcome
        outcome.files = read_tree(out)
        return outcome


def cluster_nodes(ray) -> list[tuple[str, float]]:
    """(node id, CPUs) of every live node that has CPUs."""
    return [(node["NodeID"], node["Resources"]["CPU"]) for node in ray.nodes()
            if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= 1]


def wants_gpu(point: Point) -> bool:
    return str(point.options.get("device", "cpu")).startswith("cuda")


class RayRunner:
    """Each point a Ray task that holds a whole node: all of its CPUs, pinned to it (a CUDA point: one GPU),
    so that no two points ever time on one machine (or one GPU) at once. Points are handed to nodes as nodes
    come free; results come back through the object store and are written here, so workers need no shared
    disk, only kvbench installed (the same version)."""

    def __init__(self, address: str):
        self.ray = import_ray()
        self.address = address
        self.started = False  # shut down only a connection this runner opened (a test may hold its own)

    def connect(self) -> None:
        """Join the cluster at the address (`auto`: the one `ray start` made here; `local`: a new one)."""
        if self.ray.is_initialized():
            return
        before = signal.getsignal(signal.SIGTERM)
        try:
            self.ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                          configure_logging=False)
            self.started = True
        except ConnectionError as exc:
            raise KVBenchError(f"--ray-address {self.address}: no Ray cluster there ({exc}); start one with "
                               "`ray start --head`, or use --runner local") from None
        # ray.init installs a SIGTERM handler that exits at once: the process's own comes back (the CLI's stops
        # the sweep as Ctrl-C does, so the running points are told to stop and the record says interrupted)
        if before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)

    def _submit(self, point: Point, started: dict[str, bytes], node: tuple[str, float] | None):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name, files = config_bundle(point.config)
        task = self.ray.remote(_ray_point)
        if node is None:  # a CUDA point: Ray gives each task its own GPU
            task = task.options(num_gpus=1, num_cpus=1, max_retries=0)
        else:
            task = task.options(num_cpus=node[1], max_retries=0,
                                scheduling_strategy=NodeAffinitySchedulingStrategy(node[0], soft=False))
        return task.remote(point, files, name, started)

    def run(self, points: list[Point], points_dir: Path, on_start: OnStart, on_done: OnDone) -> None:
        nodes = cluster_nodes(self.ray)
        if not nodes:
            raise KVBenchError("the Ray cluster has no live node with CPUs; add one with `ray start --address ...`")
        waiting = [p for p in points if not wants_gpu(p)]
        pending: dict = {}  # object ref -> (point, node or None)
        for point in (p for p in points if wants_gpu(p)):
            pending[self._submit(point, read_tree(points_dir / point.id), None)] = (point, None)
            on_start(point)
        free = list(nodes)
        try:
            while waiting or pending:
                while waiting and free:
                    point, node = waiting.pop(0), free.pop(0)
                    pending[self._submit(point, read_tree(points_dir / point.id), node)] = (point, node)
                    on_start(point)
                [ready], _ = self.ray.wait(list(pending), num_returns=1)
                point, node = pending.pop(ready)
                if node is not None:
                    free.append(node)
                on_done(point, self._collect(ready, point, points_dir))
        except KeyboardInterrupt:
            for ref in pending:
                self.ray.cancel(ref)  # not forced: the task passes SIGINT to its benchmark process
            raise

    def _collect(self, ref, point: Point, points_dir: Path) -> Outcome:
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            return Outcome(point.id, "failed", -1, 0.0, "unknown", f"Ray task failed: {str(exc).splitlines()[0]}")
        out = points_dir / point.id
        if outcome.files:
            shutil.rmtree(out, ignore_errors=True)  # replaced whole by the worker's copy, which continued it
            write_tree(outcome.files, out)
        return outcome

    def shutdown(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
