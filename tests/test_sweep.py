"""kvbench sweep: the spec's validation, points, and real sweeps (local runner, Ctrl-C, --resume, Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kvbench.bench.spec import expand, load_spec
from kvbench.cli import app

TINY_RUN = {"strategies": ["naive", "static"], "lengths": [3, 5], "repeats": 1, "warmup": 0, "device": "cpu"}


def write_spec(directory: Path, text: str | None = None, **spec) -> Path:
    path = directory / "spec.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False))
    return path


# --- the spec ---------------------------------------------------------------------------------------------------

def test_configs_cross_the_matrix_minus_excluded(tmp_path):
    spec = write_spec(tmp_path, configs=["tiny", "single-head"], matrix={"dtype": ["float32", "bfloat16"],
                      "batch_size": [1, 2]}, exclude=[{"config": "single-head", "dtype": "bfloat16"}], **TINY_RUN)
    points = expand(load_spec(spec), tmp_path)
    assert len(points) == 2 * 2 * 2 - 2
    assert len({p.id for p in points}) == len(points)
    assert not any(p.axes == {"config": "single-head", "dtype": "bfloat16", "batch_size": b} for b in (1, 2) for p in points)
    first = points[0]
    assert first.axes == {"config": "tiny", "dtype": "float32", "batch_size": 1}
    args = first.benchmark_args()
    assert args[:2] == ["--config", "tiny"]
    assert args[args.index("--lengths") + 1] == "3,5" and args[args.index("--batch-size") + 1] == "1"
    assert [p.id for p in expand(load_spec(spec), tmp_path)] == [p.id for p in points]  # stable: --resume finds them


def test_config_paths_are_relative_to_the_spec(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "small.yaml").write_text((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text())
    spec = write_spec(tmp_path, configs=["models/small.yaml"], **TINY_RUN)
    [point] = expand(load_spec(spec), tmp_path)
    assert point.config == str(tmp_path / "models" / "small.yaml")


@pytest.mark.parametrize("spec, needle", [
    (dict(configs=["tiny"], repeat=3), "unknown key 'repeat'; did you mean 'repeats'?"),
    (dict(configs=["tiny"], repeats="3"), "repeats: Input should be a valid integer"),
    (dict(configs=["tiny"], repeats=0), "repeats: Input should be greater than 0"),
    (dict(repeats=1), "missing required key 'configs'"),
    (dict(confgs=["tiny"]), "unknown key 'confgs'; did you mean 'configs'?"),  # the typo, not only "missing"
    (dict(configs=["tiny"], dtype="float64"), "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    (dict(configs=["tiny"], strategies=["static", "pagd"]), "unknown strategy 'pagd'"),
    (dict(configs=["tiny"], matrix={"dtypes": ["float32"]}), "matrix.dtypes is not a benchmark option; did you mean 'dtype'?"),
    (dict(configs=["tiny"], dtype="float32", matrix={"dtype": ["float32"]}), "dtype is set both at the top level and in matrix"),
    (dict(configs=["tiny"], matrix={"batch_size": [1, -2]}), "matrix.batch_size[1] batch_size: Input should be greater than 0"),
    (dict(configs=["tiny"], matrix={"dtype": []}), "matrix.dtype is empty"),
    (dict(configs=["tiny"], matrix={"dtype": ["float32"]}, exclude=[{"batch_size": 1}]), "exclude[0].batch_size is not an axis"),
    (dict(configs=["tiny"], matrix={"dtype": ["float32"]}, exclude=[{"dtype": "float16"}]), "it would skip nothing"),
    (dict(configs=["tiny"], exclude=[{"config": "tiny"}]), "exclude skips every point"),
    (dict(configs=["no-such.yaml"]), "no-such.yaml' not found"),
])
def test_bad_specs_are_one_line_naming_the_key(runner, tmp_path, spec, needle):
    path = write_spec(tmp_path, **spec)
    result = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("text, needle", [
    ("configs: [tiny]\nrepeats: 1\nrepeats: 2\n", "key 'repeats' is given twice (lines 2 and 3)"),
    ("configs: !!python/object/apply:os.system ['echo hacked']\n", "not valid YAML"),
    ("", "the file is empty; give a YAML mapping of keys (see examples/sweep.yaml)"),
    ("configs: [tinyy]\n", "configs[0]: config 'tinyy' not found"),
    ("- tiny\n", "expected a mapping of sweep keys"),
])
def test_spec_yaml_is_read_safely(runner, tmp_path, text, needle):
    result = runner.invoke(app, ["sweep", str(write_spec(tmp_path, text)), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "hacked" not in result.output


def test_a_point_benchmark_would_refuse_is_refused_before_anything_runs(runner, tmp_path):
    spec = write_spec(tmp_path, configs=["tiny"], matrix={"lengths": [[5], [2000]]}, **{
        k: v for k, v in TINY_RUN.items() if k != "lengths"})
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "do not fit max_seq_len 1280" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_points_on_a_machine_without_cuda_are_refused_before_anything_runs(runner, tmp_path):
    """They once ran, each failing, and the sweep ended with exit 1; a Ray cluster with GPUs may run them."""
    spec = write_spec(tmp_path, configs=["tiny"], matrix={"device": ["cpu", "cuda"]}, **{
        k: v for k, v in TINY_RUN.items() if k != "device"})
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "1 point (" in result.output and "ask for device cuda, and this machine has no CUDA: run them with " \
        "--runner ray" in result.output
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_points_and_an_estimate(runner, tmp_path):
    spec = write_spec(tmp_path, configs=["tiny"], matrix={"dtype": ["float32", "bfloat16"]}, **TINY_RUN)
    result = runner.invoke(app, ["sweep", str(spec), "--dry-run", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "000-tiny-dtype=float32" in result.output and "001-tiny-dtype=bfloat16" in result.output
    assert "2 points, estimated" in result.output
    assert not (tmp_path / "out").exists()


def test_ray_runner_without_ray_says_how_to_install_it(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    spec = write_spec(tmp_path, configs=["tiny"], **TINY_RUN)
    result = runner.invoke(app, ["sweep", str(spec), "--runner", "ray"])
    assert result.exit_code == 2, result.output
    assert "pip install 'kvbench[ray]'" in result.output


# --- real sweeps --------------------------------------------------------------------------------------------------

def run_sweep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kvbench", "sweep", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def point_ids(directory: Path) -> list[str]:
    return sorted(json.loads((directory / "sweep.json").read_text())["points"])


@pytest.mark.slow
def test_a_failing_point_is_recorded_the_sweep_goes_on_and_resume_runs_only_it(tmp_path):
    broken = tmp_path / "broken.yaml"  # valid config whose weights file is missing: it fails when the point runs
    broken.write_text((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text() + "weights: w.safetensors\n")
    spec = write_spec(tmp_path, configs=["broken.yaml", "tiny"], **TINY_RUN)
    first = run_sweep(str(spec), "--out", "out", cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    out = tmp_path / "out"
    record = json.loads((out / "sweep.json").read_text())
    failed, done = (record["points"][pid] for pid in point_ids(out))
    assert failed["status"] == "failed" and "w.safetensors" in failed["error"]
    assert done["status"] == "complete"
    merged = pd.read_csv(out / "results.csv")
    assert set(merged["point"]) == {"001-tiny"} and len(merged) == 2 * 2  # strategies x lengths, 1 repeat
    assert {"point", "config", "strategy", "new_tokens"} <= set(merged.columns)
    assert (out / "summary.csv").is_file() and (out / "points_per_token.png").is_file()

    kept = (out / "points" / "001-tiny" / "results.csv").stat().st_mtime_ns
    subprocess.run([sys.executable, "-m", "kvbench", "init-weights", str(tmp_path / "w.safetensors"), "--config",
                    str(broken)], check=True, capture_output=True)
    again = run_sweep("--resume", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 points, 1 to run" in again.stdout
    assert (out / "points" / "001-tiny" / "results.csv").stat().st_mtime_ns == kept  # never re-run
    assert len(pd.read_csv(out / "results.csv")) == 2 * 2 * 2
    record = json.loads((out / "sweep.json").read_text())
    assert record["status"] == "complete" and record["points"]["000-broken"]["attempts"] == 2


@pytest.mark.slow
def test_ctrl_c_keeps_finished_points_and_resume_completes(tmp_path):
    spec = write_spec(tmp_path, configs=["tiny"], matrix={"seed": [0, 1, 2]},
                      **{**TINY_RUN, "lengths": [400], "repeats": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "kvbench", "sweep", str(spec), "--out", "out"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while not (out / "points").is_dir() or len(list((out / "points").glob("*/results.csv"))) < 2:
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the sweep
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "kvbench sweep --resume" in stderr
    record = json.loads((out / "sweep.json").read_text())
    statuses = [record["points"][pid]["status"] for pid in point_ids(out)]
    assert statuses[0] == "complete" and statuses[1] == "interrupted", statuses
    assert record["status"] == "interrupted"
    finished_before = len(pd.read_csv(out / "points" / point_ids(out)[1] / "results.csv"))

    again = run_sweep("--resume", "out", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "3 points, 2 to run" in again.stdout
    second = out / "points" / point_ids(out)[1]
    runs = pd.read_csv(second / "results.csv")
    assert len(runs) == 2 * 2 and not runs.duplicated(["strategy", "new_tokens", "repeat"]).any()
    assert finished_before >= 1  # continued, not started over: its first runs are still there
    assert len(pd.read_csv(out / "results.csv")) == 3 * 2 * 2


SAME_ROWS = ["point", "config", "strategy", "dtype", "batch_size", "new_tokens", "repeat"]


@pytest.mark.slow
def test_ray_runner_gives_the_local_runners_results(runner, tmp_path):
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    spec = write_spec(tmp_path, configs=["tiny"], matrix={"dtype": ["float32", "bfloat16"]}, **TINY_RUN)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = runner.invoke(app, ["sweep", str(spec), "--runner", "ray", "--out", str(tmp_path / "ray")])
    finally:
        ray.shutdown()
    assert on_ray.exit_code == 0, on_ray.output
    local = run_sweep(str(spec), "--out", "local", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    a, b = (pd.read_csv(tmp_path / d / "results.csv") for d in ("local", "ray"))
    assert len(a) == 2 * 2 * 2
    pd.testing.assert_frame_equal(a[SAME_ROWS], b[SAME_ROWS])
    assert list(a.columns) == list(b.columns)
    record = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    assert record["runner"] == "ray" and all(p["status"] == "complete" for p in record["points"].values())
    for pid in record["points"]:  # each point came back whole, as a normal results directory
        assert (tmp_path / "ray" / "points" / pid / "meta.json").is_file()
        assert (tmp_path / "ray" / "logs" / f"{pid}.log").is_file()


@pytest.mark.slow
def test_joining_ray_keeps_the_processs_own_sigterm_handler():
    """ray.init installs a handler that exits at once (SystemExit 15): the sweep would skip telling its points
    to stop and recording the interruption. The CLI's handler (SIGTERM as Ctrl-C) is put back."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from kvbench.bench.runners import RayRunner

    def ours(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, ours)
    ray_runner = RayRunner("local")
    try:
        ray_runner.connect()
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        ray_runner.shutdown()
        signal.signal(signal.SIGTERM, before)


def test_ci_installs_the_ray_extra_with_the_readmes_test_command():
    repo = Path(__file__).resolve().parent.parent
    readme, ci = (repo / "README.md").read_text(), (repo / ".ci" / "run").read_text()
    command = next(line for line in readme.splitlines() if line.endswith("python -m pytest -q"))
    assert "[test,ray]" in command and command in ci.splitlines()


def test_a_point_that_recorded_itself_complete_is_complete_whatever_its_exit(tmp_path, monkeypatch):
    """A Ctrl-C landing after the point wrote meta.json complete (while it printed its table) ended it with 130,
    and the sweep recorded it interrupted for good: --resume skips a complete directory and never fixed it."""
    from kvbench.bench import runners
    from kvbench.bench.spec import Point

    out = tmp_path / "points" / "000-tiny"
    writes_then_130 = ("import json, pathlib, sys; p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True); "
                       "(p / 'meta.json').write_text(json.dumps({'status': 'complete'})); sys.exit(130)")
    monkeypatch.setattr(runners, "benchmark_command", lambda point, where: [sys.executable, "-c", writes_then_130,
                                                                            str(where)])
    outcome = runners.run_point(Point("000-tiny", "tiny", {}, {}), out, tmp_path / "000.log")
    assert (outcome.returncode, outcome.status, outcome.error) == (130, "complete", None)


def test_resume_of_a_record_without_points_is_one_line(runner, tmp_path):
    (tmp_path / "sweep.json").write_text("{}")
    result = runner.invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "cannot resume, it lacks the spec" in result.output, result.output


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_resume_trusts_the_points_directories(tmp_path):
    """A point an older sweep recorded interrupted, though its directory says complete (a Ctrl-C landing while
    it printed its table), is recorded complete; and CUDA points already complete (run on a Ray cluster with
    GPUs) do not refuse a resume on a machine without CUDA: nothing is left to run."""
    spec = write_spec(tmp_path, configs=["tiny"], **{**TINY_RUN, "lengths": [3]})
    assert run_sweep(str(spec), "--out", "out", cwd=tmp_path).returncode == 0
    record = json.loads((tmp_path / "out" / "sweep.json").read_text())
    record["points"]["000-tiny"].update(status="interrupted", error="results in out/points/000-tiny")
    record["spec"]["device"] = "cuda"  # as if it had run on GPUs
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(record))
    again = run_sweep("--resume", "out", cwd=tmp_path)
    assert again.returncode == 0 and "1 point, 0 to run" in again.stdout, again.stderr
    entry = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]["000-tiny"]
    assert entry["status"] == "complete" and entry["error"] is None
