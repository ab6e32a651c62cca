"""The benchmark command: result files, statistics, resume and interruption."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import time

import torch

from conftest import CONFIGS, write_yaml
from kvbench.bench import sweep as sweep_module
from kvbench.bench.results import RUN_COLUMNS, ResultsDir
from kvbench.bench.session import compare
from kvbench.bench.stats import summarize
from kvbench.bench.sweep import CostModel, StepLine, SweepSettings, plan_runs
from kvbench.bench.timing import StepClock
from kvbench.cli import app
from kvbench.config import load_config
from kvbench.weights import build_model

TINY = str(CONFIGS / "tiny.yaml")
SMALL_SWEEP = ["--config", TINY, "--lengths", "3,6", "--strategies", "naive,static", "--repeats", "2",
               "--device", "cpu"]


def bench(runner, out, *extra):
    return runner.invoke(app, ["benchmark", *SMALL_SWEEP, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("bench") / "run"
    result = bench(CliRunner(), out)
    assert result.exit_code == 0, result.output
    return out, result


def test_results_csv_schema_and_row_count(finished_run):
    out, _ = finished_run
    runs = pd.read_csv(out / "results.csv")
    assert list(runs.columns) == RUN_COLUMNS
    assert len(runs) == 2 * 2 * 2  # lengths x strategies x repeats
    assert sorted(runs.groupby(["strategy", "new_tokens", "repeat"]).size()) == [1] * 8
    np.testing.assert_allclose(runs["total_s"], runs["prefill_s"] + runs["decode_s"])
    np.testing.assert_allclose(runs["per_token_ms"], 1000 * runs["decode_s"] / (runs["new_tokens"] - 1))
    np.testing.assert_allclose(runs["tokens_per_s"], runs["batch_size"] * runs["new_tokens"] / runs["total_s"])


def test_kv_cache_bytes_match_the_formula(finished_run):
    runs = pd.read_csv(finished_run[0] / "results.csv")
    naive, static = runs[runs["strategy"] == "naive"], runs[runs["strategy"] == "static"]
    assert (naive["kv_cache_bytes"] == 0).all()
    # tiny: 2 layers, 4 heads x 16, float32; the cache ends holding prompt 16 + new tokens - 1
    expected = 2 * 2 * 4 * 16 * (16 + static["new_tokens"] - 1) * 1 * 4
    assert (static["kv_cache_bytes"] == expected).all()
    assert (static["kv_cache_formula_bytes"] == expected).all()


def test_summary_meta_steps_and_plots_written(finished_run):
    out, result = finished_run
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and {"total_s_median", "total_s_iqr", "speedup_vs_naive"} <= set(summary.columns)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["runs_recorded"] == 8
    for key in ("kvbench_version", "torch_version", "python_version", "cpu_model", "torch_threads", "git_commit",
                "config", "settings", "command_line", "started_at", "ended_at"):
        assert key in meta, key
    assert set(meta["huge_pages"]) == {"torch_allocator", "system_policy", "process_bytes"}
    assert meta["config"]["d_model"] == 64 and meta["settings"]["lengths"] == [3, 6]
    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 2 * 2 * (2 + 5)  # repeats x strategies x decode steps of both lengths
    for name in ("latency.png", "speedup.png", "per_token.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "speedup" in result.output


def test_the_steps_before_the_runs_are_said(finished_run):
    """The floor's probes and the time estimate take seconds (minutes at a large batch): said, not silent."""
    _, result = finished_run
    assert "measuring the machine's limits" in result.stderr and "estimating the run's time" in result.stderr


def test_output_directory_is_never_overwritten(runner, finished_run):
    result = bench(runner, finished_run[0])
    assert result.exit_code == 2 and "already holds results" in result.output, result.output


def test_neither_command_writes_into_the_others_directory(runner, finished_run, tmp_path):
    """A sweep given a benchmark's directory once replaced its results.csv and summary.csv; a benchmark given a
    sweep's is refused too, without suggesting a --resume that cannot work there."""
    out = finished_run[0]
    before = {name: (out / name).read_bytes() for name in ("results.csv", "summary.csv", "meta.json")}
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"configs: [{TINY}]\nlengths: [3]\nrepeats: 1\ndevice: cpu\n")
    result = runner.invoke(app, ["sweep", str(spec), "--out", str(out)])
    assert result.exit_code == 2 and f"--out {out} already holds results (results.csv)" in result.output, result.output
    assert "--resume" not in result.output
    assert {name: (out / name).read_bytes() for name in before} == before
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name in ("sweep.json", "results.csv", "summary.csv"):  # a finished sweep merges its points' at its top
        (sweep / name).write_text("{}")
    result = bench(runner, sweep)
    assert result.exit_code == 2 and "already holds a sweep (sweep.json)" in result.output, result.output
    assert "--resume" not in result.output


def interrupt_after(monkeypatch, n_calls: int):
    real = sweep_module.Sweep.execute
    calls = {"n": 0}

    def execute(self, run):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise KeyboardInterrupt
        return real(self, run)

    monkeypatch.setattr(sweep_module.Sweep, "execute", execute)


def invoke_as_typed(runner, monkeypatch, args):
    """Run the CLI with sys.argv as a shell would set it: meta.json records the command line from there."""
    monkeypatch.setattr("sys.argv", ["/usr/bin/kvbench", *args])
    return runner.invoke(app, args)


def test_interrupted_run_keeps_finished_runs_and_resume_completes(runner, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 5)  # 2 warm-ups + 3 timed runs of the first length
    result = invoke_as_typed(runner, monkeypatch, ["benchmark", *SMALL_SWEEP, "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "--resume" in result.output and f"3 finished runs kept in {out / 'results.csv'}" in result.output
    kept = pd.read_csv(out / "results.csv")
    assert len(kept) == 3
    assert json.loads((out / "meta.json").read_text())["status"] == "interrupted"

    monkeypatch.undo()
    resumed = invoke_as_typed(runner, monkeypatch, ["benchmark", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    runs = pd.read_csv(out / "results.csv")
    assert len(runs) == 8 and runs.groupby(["strategy", "new_tokens", "repeat"]).size().max() == 1
    pd.testing.assert_frame_equal(runs.iloc[:3], kept)  # nothing recorded was redone
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete"
    # the record of what ran keeps the first command line; the resume is appended with the runs it did
    assert meta["command_line"] == " ".join(["kvbench", "benchmark", *SMALL_SWEEP, "--out", str(out)])
    [again] = meta["resumes"]
    assert again["command_line"] == f"kvbench benchmark --resume {out}"
    assert again["status"] == "complete" and again["started_at"] <= again["ended_at"]
    assert set(again["huge_pages"]) == {"torch_allocator", "system_policy", "process_bytes"}  # this process's
    key = ["strategy", "batch_size", "new_tokens", "repeat"]
    done_now = set(runs[key].itertuples(index=False, name=None)) - set(kept[key].itertuples(index=False, name=None))
    assert {tuple(run) for run in again["runs"]} == done_now and len(done_now) == 5


def test_resume_of_a_finished_run_runs_nothing(runner, finished_run):
    before = pd.read_csv(finished_run[0] / "results.csv")
    result = runner.invoke(app, ["benchmark", "--resume", str(finished_run[0])])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(finished_run[0] / "results.csv"), before)


def test_resume_refuses_new_settings(runner, finished_run):
    result = runner.invoke(app, ["benchmark", "--resume", str(finished_run[0]), "--repeats", "5"])
    assert result.exit_code == 2 and "drop --repeats" in result.output, result.output


def test_resume_of_a_non_results_directory(runner, tmp_path):
    result = runner.invoke(app, ["benchmark", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "no meta.json" in result.output, result.output


@pytest.mark.parametrize("command", [["benchmark", "--resume"], ["plot"]])
def test_a_results_path_that_does_not_exist_is_called_so(runner, tmp_path, command):
    result = runner.invoke(app, [*command, str(tmp_path / "typo")])
    assert result.exit_code == 2 and "typo does not exist" in result.output, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(runner, tmp_path):
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--device", "cuda", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "--device cuda: CUDA is not available" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, needle", [
    (["--lengths", "10,0"], "'0' is not a positive integer"),
    (["--lengths", "ten"], "'ten' is not a positive integer"),
    (["--lengths", "2000"], "do not fit max_seq_len 1280"),
    (["--strategies", "naive,pagd"], "unknown strategy 'pagd'"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--dtype", "int8"], "--dtype 'int8' is not supported"),
])
def test_bad_benchmark_options(runner, tmp_path, args, needle):
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output


# --- statistics, plan and clocks, against hand-computed values ------------------------------------------------

def hand_runs() -> pd.DataFrame:
    rows = []
    for strategy, totals in (("naive", [4.0, 1.0, 3.0, 2.0]), ("static", [1.0, 1.0, 1.0, 1.3])):
        for repeat, total in enumerate(totals):
            rows.append(dict(strategy=strategy, new_tokens=11, repeat=repeat, total_s=total, prefill_s=0.0,
                             decode_s=total, per_token_ms=100 * total, tokens_per_s=11 / total, kv_cache_bytes=0,
                             kv_cache_formula_bytes=0, peak_mem_bytes=1, mem_growth_bytes=0, weight_bytes=100,
                             kv_bytes=25, floor_ms=50.0, bound="memory", bandwidth_gbs=1.0,
                             gflops_per_token=1.0, achieved_gflops=1.0))
    return pd.DataFrame(rows)


def test_summary_statistics_by_hand():
    summary = summarize(hand_runs()).set_index("strategy")
    # naive totals 1,2,3,4: median 2.5; quartiles (linear) 1.75 and 3.25, IQR 1.5
    assert summary.loc["naive", "total_s_median"] == 2.5
    assert summary.loc["naive", "total_s_iqr"] == pytest.approx(1.5)
    # static totals 1,1,1,1.3: median 1.0; quartiles 1.0 and 1.075
    assert summary.loc["static", "total_s_median"] == 1.0
    assert summary.loc["static", "total_s_iqr"] == pytest.approx(0.075)
    assert summary.loc["static", "speedup_vs_naive"] == pytest.approx(2.5)
    assert summary.loc["naive", "per_token_over_floor"] == pytest.approx(250 / 50)  # per-token median 250 ms
    assert summary.loc["naive", "noisy"] and not summary.loc["static", "noisy"]  # 1.5/2.5 > 10% > 0.075/1.0


def test_cost_model_by_hand():
    # naive: 10 ms + 1 ms per token; static: 5 ms at 6 tokens attended, 0.1 ms more per token
    costs = CostModel(np.array([0.01, 0.001, 0.0]), {("static", 1): StepLine(6, 0.005, 0.0001)})
    assert costs.run_s("naive", 4, 3) == pytest.approx(0.014 + 0.015 + 0.016)
    # steps attend 5 and 6 tokens: both at the line's start (never below it)
    assert costs.run_s("static", 4, 3) == pytest.approx(0.014 + 2 * 0.005)
    # steps attend 5 .. 103 tokens: 99 steps at their mean, 54 tokens: 5 ms + 48 x 0.1 ms
    assert costs.run_s("static", 4, 100) == pytest.approx(0.014 + 99 * (0.005 + 48 * 0.0001))


def test_cost_model_interpolates_between_calibrated_batches():
    costs = CostModel(np.array([0.0, 0.01, 0.0]), {("static", 1): StepLine(10, 0.010, 0.0),
                                              ("static", 16): StepLine(10, 0.025, 0.00001),
                                              ("dynamic", 1): StepLine(10, 0.012, 0.0)})
    assert costs.decode_step_s("static", 1, 1010) == pytest.approx(0.010)
    assert costs.decode_step_s("static", 16, 1010) == pytest.approx(0.035)
    assert costs.decode_step_s("static", 6, 1010) == pytest.approx(0.010 + (5 / 15) * 0.025)
    assert costs.decode_step_s("static", 64, 1010) == pytest.approx(0.035)  # not extrapolated past the largest
    assert costs.decode_step_s("dynamic", 16, 1010) == pytest.approx(0.012)  # one batch: as measured


def test_naive_fit_recovers_rows_and_attention_terms():
    truth = np.array([0.008, 2e-5, 3e-8])  # 8 ms of weights, 20 us a row, 30 ns per batch x length^2
    forwards = [(1, 16), (1, 515), (1, 1015), (16, 16), (16, 272)]
    measured = [(b, n, float(sweep_module.naive_terms(b, n) @ truth)) for b, n in forwards]
    np.testing.assert_allclose(sweep_module._fit_naive(measured), truth, rtol=1e-6)
    # one length only (a sweep of one short length): a constant, the time measured
    assert list(sweep_module._fit_naive([(1, 16, 0.01)])) == pytest.approx([0.01, 0.0, 0.0])


def test_naive_fit_never_has_a_negative_term():
    """Forwards of a tiny model, as timed in CI: flat within noise, so an unconstrained fit took a negative
    attention term and predicted 400 rows faster than 10 (0.31 against 0.40 ms)."""
    measured = [(1, 8, 4.0e-4), (1, 27, 4.3e-4), (1, 47, 4.1e-4), (4, 8, 4.2e-4), (4, 28, 4.0e-4)]
    coef = sweep_module._fit_naive(measured)
    assert (coef >= 0).all() and coef.any()
    costs = CostModel(coef, {})
    assert costs.naive_step_s(100, 4) >= costs.naive_step_s(47, 1) >= costs.naive_step_s(10, 1) > 0


def test_calibrate_times_every_cached_strategy_at_both_batches():
    from kvbench.bench.sweep import calibrate
    from kvbench.config import load_config
    from kvbench.verify import random_prompt
    from kvbench.weights import build_model

    loaded = load_config(TINY)
    model = build_model(loaded, torch.device("cpu"), torch.float32)
    small, large = (random_prompt(loaded.model, b, 8, 0) for b in (1, 4))
    costs = calibrate(model, small, 40, torch.device("cpu"), ["naive", "static", "dynamic"], (model, large))
    assert set(costs.steps) == {("static", 1), ("static", 4), ("dynamic", 1), ("dynamic", 4)}
    line = costs.steps["static", 4]
    assert line.visible == 12 and line.seconds > 0 and line.cap == math.inf
    assert costs.naive_step_s(100, 4) >= costs.naive_step_s(10, 1) > 0


def test_a_windowed_step_is_flat_past_its_window():
    line = StepLine(20, 0.010, 0.0001, cap=64)
    assert line.at(20) == pytest.approx(0.010)
    assert line.at(64) == line.at(5000) == pytest.approx(0.010 + 44 * 0.0001)


def test_calibration_caps_a_windowed_strategy_at_its_window(monkeypatch):
    """The sliding cache's line stops at its window; its second context is timed inside it."""
    from kvbench.bench.sweep import calibrate
    from kvbench.config import load_config
    from kvbench.verify import random_prompt
    from kvbench.weights import build_model

    contexts = []
    real = sweep_module._cached_step_s
    monkeypatch.setattr(sweep_module, "_cached_step_s", lambda model, prompt, *rest: contexts.append(
        prompt.shape[1]) or real(model, prompt, *rest))
    loaded = load_config(TINY)
    model = build_model(loaded, torch.device("cpu"), torch.float32)
    costs = calibrate(model, random_prompt(loaded.model, 1, 8, 0), 400, torch.device("cpu"), ["sliding"], window=40)
    assert costs.steps["sliding", 1].cap == 40 and contexts == [8, 36]  # 8 + (40 - 8 - 4) tokens


def test_naive_calibration_never_passes_the_last_position():
    """A sweep that ends at the config's last position: its naive forwards stop there (they once ran 3 past)."""
    from kvbench.config import load_config
    from kvbench.weights import build_model

    loaded = load_config(TINY)
    model = build_model(loaded, torch.device("cpu"), torch.float32)
    last = loaded.model.max_seq_len
    assert sweep_module._naive_step_s(model, 1, last, torch.device("cpu")) > 0


@pytest.mark.parametrize("prompt_len, length", [(20, 5), (23, 2), (24, 1)])
def test_a_long_prompt_and_few_tokens_end_at_the_last_position(runner, tmp_path, prompt_len, length):
    """The estimate's cached steps stay within the sweep's positions: they once decoded 8 tokens past the prompt
    whatever --lengths was, a traceback past max_seq_len for a sweep that fits (tiny: --prompt-len 1275
    --lengths 5). 5, 2 and 1 tokens: several decode steps timed, one, none."""
    config = str(write_yaml(tmp_path, max_seq_len=24))
    result = runner.invoke(app, ["benchmark", "--config", config, "--prompt-len", str(prompt_len), "--lengths",
                                 str(length), "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output


def test_a_cached_only_sweep_times_no_long_naive_forward(monkeypatch):
    """Naive is not run: only the prompt's forward (the prefill) is timed, at each batch end, never a forward
    of the longest length (at batch 64 x 8000 tokens that alone would take minutes)."""
    from kvbench.bench.sweep import calibrate
    from kvbench.config import load_config
    from kvbench.verify import random_prompt
    from kvbench.weights import build_model

    timed = []
    monkeypatch.setattr(sweep_module, "_naive_step_s", lambda m, batch, seq_len, device: timed.append(
        (batch, seq_len)) or 0.001 * batch)
    loaded = load_config(TINY)
    model = build_model(loaded, torch.device("cpu"), torch.float32)
    small, large = (random_prompt(loaded.model, b, 8, 0) for b in (1, 4))
    calibrate(model, small, 60, torch.device("cpu"), ["static"], (model, large))
    assert timed == [(1, 8), (4, 8)]
    calibrate(model, small, 60, torch.device("cpu"), ["naive", "static"], (model, large))
    assert timed[2:] == [(1, 8), (1, 37), (1, 67), (4, 8), (4, 38)]


def test_plan_interleaves_strategies_and_skips_recorded_runs():
    settings = SweepSettings(lengths=[5, 200], strategies=["naive", "static"], repeats=2, warmup=1)
    costs = CostModel(np.array([0.0, 0.01, 0.0]), {("static", 1): StepLine(18, 0.01)})
    runs = plan_runs(settings, costs, done={("naive", 1, 5, 0), ("static", 1, 5, 0), ("naive", 1, 5, 1),
                                            ("static", 1, 5, 1), ("naive", 1, 200, 0)})
    assert [(r.strategy, r.new_tokens, r.repeat) for r in runs] == [
        ("naive", 200, -1), ("static", 200, -1), ("static", 200, 0), ("naive", 200, 1), ("static", 200, 1)]
    assert runs[0].tokens == 100  # warm-ups are capped, into the point's own cache


def test_step_clock_gives_one_duration_per_interval():
    clock = StepClock(torch.device("cpu"))
    clock.mark()
    for pause in (0.0, 0.02, 0.0):
        time.sleep(pause)
        clock.mark()
    durations = clock.durations()
    assert len(durations) == 3 and durations[1] >= 0.02 > max(durations[0], durations[2])


def test_peak_memory_sees_a_large_allocation():
    """In a fresh process, so that no freed-but-resident memory of earlier tests can hide the allocation."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from kvbench.bench.timing import PeakMemory\n"
        "meter = PeakMemory(torch.device('cpu'))\n"
        "assert meter.exact, 'no per-run RSS reset on this platform'\n"
        "meter.start(); base = meter.peak_bytes()\n"
        "block = torch.ones(64 * 2**20 // 4); del block\n"  # 64 MiB touched, then freed: the peak remembers
        "peak = meter.peak_bytes(); print(peak - base, meter.growth_bytes(peak))\n"
        "meter.start(); print(meter.growth_bytes(meter.peak_bytes()))\n"  # a new run starts from what is resident
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if "no per-run RSS reset" in done.stderr:
        pytest.skip("no per-run RSS reset on this platform")
    assert done.returncode == 0, done.stderr
    first, again = done.stdout.splitlines()
    by_hand, growth = map(int, first.split())
    assert by_hand >= 60 * 2**20 and growth == by_hand
    assert abs(int(again)) < 8 * 2**20


def test_compare_gives_ratios_of_medians(runner, tmp_path):
    write_results(tmp_path / "a")
    write_results(tmp_path / "b", scale=0.5)
    joined = compare(tmp_path / "a", tmp_path / "b").joined
    assert list(joined["total_ratio"]) == [0.5, 0.5] and list(joined["per_token_ratio"]) == [0.5, 0.5]
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert " 0.50 " in result.output and "warning" not in result.output  # same settings: nothing to warn about


def test_plot_redraws(runner, finished_run):
    out = finished_run[0]
    (out / "latency.png").unlink()
    result = runner.invoke(app, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "latency.png").exists()


def test_compiled_strategy_is_timed_and_its_compile_time_recorded(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--lengths", "3,5", "--strategies", "static",
                                 "--compile", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "results.csv")
    assert sorted(set(runs["strategy"])) == ["static", "static+compile"]
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["compile_s"]) == 1 and meta["compile_s"][0] > 0
    # one buffer sized for the longest length serves every length: fixed shapes, one compilation
    compiled = runs[runs["strategy"] == "static+compile"]
    assert compiled["kv_cache_bytes"].nunique() == 1


def test_every_strategy_side_by_side(runner, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--lengths", "4,12", "--strategies",
                                 "naive,static,dynamic,sliding,quantized", "--window", "8", "--repeats", "1",
                                 "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "results.csv").set_index(["strategy", "new_tokens"])
    assert len(runs) == 10
    token_bytes = 2 * 2 * 64 * 4  # K and V, 2 layers, d_model 64, float32
    assert runs.loc[("sliding", 12), "kv_cache_bytes"] == 8 * token_bytes  # bounded by the window
    assert runs.loc[("static", 12), "kv_cache_bytes"] == (16 + 11) * token_bytes
    assert runs.loc[("quantized", 12), "kv_cache_bytes"] == (16 + 11) * 2 * 2 * 4 * (16 + 4)  # int8 + scales
    assert (runs["kv_cache_bytes"] == runs["kv_cache_formula_bytes"]).all()
    assert json.loads((out / "meta.json").read_text())["settings"]["window"] == 8


# --- results directories: what a resume, a Ctrl-C, a second process or a damaged file leave ------------------

def copy_of(finished_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run[0], out)
    return out


def no_work_allowed(monkeypatch):
    """Any model building or sweeping fails the test: resuming a complete directory must do none."""
    from kvbench.bench import session

    def forbidden(*args, **kwargs):
        raise AssertionError("work was done")

    monkeypatch.setattr(session, "run", forbidden)
    monkeypatch.setattr(session, "build_model", forbidden)


def test_resume_of_a_complete_directory_says_nothing_to_do_before_any_work(runner, finished_run, tmp_path,
                                                                           monkeypatch):
    out = copy_of(finished_run, tmp_path)
    no_work_allowed(monkeypatch)
    result = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output and "timed runs to do" not in result.output


def test_ctrl_c_while_writing_plots_leaves_a_directory_resume_completes(runner, tmp_path, monkeypatch):
    from kvbench.bench import session

    out = tmp_path / "run"

    def interrupted_plots(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "draw_all", interrupted_plots)
    result = bench(runner, out)
    assert result.exit_code == 130, result.output
    assert f"kvbench benchmark --resume {out}" in result.output
    assert json.loads((out / "meta.json").read_text())["status"] == "interrupted"
    assert not (out / "latency.png").exists()

    monkeypatch.undo()
    no_work_allowed(monkeypatch)
    resumed = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert resumed.exit_code == 0 and "nothing to do" in resumed.output, resumed.output
    assert (out / "latency.png").exists() and (out / "summary.csv").exists()
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"


def test_ctrl_c_before_any_run_finished_does_not_claim_kept_runs(runner, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 1)  # during the first warm-up
    result = bench(runner, out)
    assert result.exit_code == 130, result.output
    assert "no run had finished" in result.output and "finished runs kept" not in result.output, result.output
    assert "results in" not in result.stdout  # no results to point to: stderr says where the settings are


def test_a_second_ctrl_c_while_writing_after_the_first_still_says_how_to_resume(runner, tmp_path, monkeypatch):
    from kvbench.bench import session

    out = tmp_path / "run"
    interrupt_after(monkeypatch, 3)

    def interrupted_summary(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session.ResultsDir, "write_summary", interrupted_summary)
    result = bench(runner, out)
    assert result.exit_code == 130 and "--resume" in result.output, result.output
    assert json.loads((out / "meta.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_real_ctrl_c_stops_a_benchmark_keeping_its_runs(tmp_path, signal_name):
    """A real SIGINT to a real process, as a terminal sends it; SIGTERM, as a job scheduler, `timeout` or `kill`
    send it, stops the run the same way."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    # SIGINT's default disposition restored in the child: a parent started in the background ignores it, and
    # Python raises KeyboardInterrupt only where SIGINT was not ignored when it started. One thread: the
    # machine may be busy, and torch's spinning threads then slow to a crawl.
    child = subprocess.Popen([sys.executable, "-m", "kvbench", "benchmark", "--config", TINY, "--lengths", "50",
                              "--strategies", "naive", "--repeats", "5000", "--warmup", "0", "--threads", "1",
                              "--device", "cpu", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not ((out / "results.csv").exists() and len((out / "results.csv").read_text().splitlines()) > 2):
            assert child.poll() is None and time.monotonic() < deadline, "no run finished within a minute"
            time.sleep(0.2)
        child.send_signal(getattr(signal, signal_name))
        stdout, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, stderr
    assert f"kvbench benchmark --resume {out}" in stderr and "Traceback" not in stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["runs_recorded"] == len(pd.read_csv(out / "results.csv")) >= 2


def hold_lock(path):
    """Another process holding a results directory, as a running benchmark does."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                              "from kvbench.bench.results import ResultsDir\n"
                              f"with ResultsDir(Path({str(path)!r})).lock():\n"
                              "    print('held', flush=True); time.sleep(60)\n"],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.mark.slow
def test_a_directory_another_process_writes_is_refused_naming_it(runner, finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    before = (out / "results.csv").read_bytes()
    holder = hold_lock(out)
    try:
        for args in (["benchmark", "--resume", str(out)], ["plot", str(out)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, result.output
            assert f"pid {holder.pid}" in result.output and "being written by another kvbench process" in \
                result.output
    finally:
        holder.kill()
        holder.wait()
    assert (out / "results.csv").read_bytes() == before
    assert runner.invoke(app, ["benchmark", "--resume", str(out)]).exit_code == 0  # free again once it ends


@pytest.mark.parametrize("damage", ["mid-line", "fewer fields"])
def test_resume_drops_an_unfinished_last_row_and_never_appends_onto_it(runner, finished_run, tmp_path, damage):
    out = copy_of(finished_run, tmp_path)
    csv_path = out / "results.csv"
    text = csv_path.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    cut = last[: len(last) // 2]
    csv_path.write_text(text[: len(text) - len(last) - 1] + (cut if damage == "mid-line" else cut + "\n"))
    result = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "dropped an unfinished last line" in result.stderr
    runs = pd.read_csv(csv_path)  # parses: no row was glued onto the half one
    assert len(runs) == 8 and runs.groupby(["strategy", "new_tokens", "repeat"]).size().max() == 1
    assert runs["total_s"].notna().all()


def test_readers_ignore_an_unfinished_last_row_saying_so_and_leave_the_file(runner, finished_run, tmp_path):
    """plot and compare once kept a half-written row: its strategy showed '-' for ms/step beside a speed-up."""
    out = copy_of(finished_run, tmp_path)
    csv_path = out / "results.csv"
    text = csv_path.read_text()
    damaged = text[:-len(text.rstrip("\n").rsplit("\n", 1)[1]) // 2 - 1]  # the last row cut in half
    csv_path.write_text(damaged)
    for args in (["plot", str(out)], ["compare", str(finished_run[0]), str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.stderr.count("ignored an unfinished last line") == 1 and "--resume drops it" in result.stderr
    assert csv_path.read_text() == damaged  # only a resume repairs it
    assert pd.read_csv(out / "summary.csv")["per_token_ms_median"].notna().all()


def test_resume_with_a_non_numeric_cell_is_one_clear_line(runner, finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path)
    runs = pd.read_csv(out / "results.csv")
    runs["total_s"] = runs["total_s"].astype(object)
    runs.loc[2, "total_s"] = "fast"
    runs.to_csv(out / "results.csv", index=False)
    result = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (f"error: {out / 'results.csv'}, line 4: column total_s "
                                                      "holds 'fast', not a number; correct or delete that row")


def test_too_many_threads_are_refused_also_when_resuming(runner, finished_run, tmp_path):
    from kvbench.bench.machine import available_cores

    cores = available_cores()
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--threads", "100000", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert f"--threads 100000 exceeds the {cores} cores" in result.output and not (tmp_path / "x").exists()
    out = copy_of(finished_run, tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    meta["settings"]["threads"] = 100000
    (out / "meta.json").write_text(json.dumps(meta))
    resumed = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert resumed.exit_code == 2 and "records --threads 100000" in resumed.output, resumed.output


def test_out_naming_an_existing_file_is_refused(runner, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--out", str(target)])
    assert result.exit_code == 2 and "is a file" in result.output and "Traceback" not in result.output
    assert target.read_text() == "keep me"


def test_columns_md_explains_every_column(finished_run):
    out = finished_run[0]
    doc = (out / "columns.md").read_text()
    for name in ("results.csv", "steps.csv", "summary.csv"):
        section = doc.split(f"## {name}")[1].split("## ")[0]
        for column in pd.read_csv(out / name).columns:
            assert f"| `{column}` |" in section, (name, column)


def test_benchmark_table_shows_prefill_and_tokens_per_second(finished_run):
    header = next(line for line in finished_run[1].output.splitlines() if "strategy" in line and "tokens" in line)
    assert "prefill" in header and "tok/s" in header and "speedup" in header


def write_results(directory, scale=1.0, drop=None, **settings):
    """A results directory holding hand_runs(), its times scaled, optionally without one strategy."""
    results = ResultsDir.create(directory, directory.parent, "x", "cpu")
    runs = hand_runs()
    runs[["total_s", "per_token_ms"]] *= scale
    runs = runs[runs["strategy"] != drop]
    runs.assign(config="x", device="cpu", device_name="cpu", dtype="float32", threads=1, batch_size=1,
                prompt_len=1, finished_at="").reindex(columns=RUN_COLUMNS).to_csv(results.runs_csv, index=False)
    results.write_meta({"config_name": "x", "config": {"d_model": 8}, "device_name": "cpu",
                        "settings": {"dtype": "float32", "batch_size": 1, **settings}})
    return results


def test_compare_warns_what_differs_and_lists_unshared_points(runner, tmp_path, monkeypatch):
    from kvbench.cli.common import console

    monkeypatch.setattr(console, "width", 80)  # an 80-column terminal (piped, tables take their natural width)
    write_results(tmp_path / "a")
    write_results(tmp_path / "b", scale=0.5, drop="naive", dtype="bfloat16", batch_size=4)
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "warning: A and B differ in dtype: float32 vs bfloat16" in result.stderr
    assert "batch_size" not in result.stderr  # a point's key: other batches are unshared points, never mixed
    assert "only in A, not compared: naive at 11" in result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout


def test_compare_with_a_bad_cell_says_what_is_wrong(runner, tmp_path):
    write_results(tmp_path / "a")
    bad = write_results(tmp_path / "b")
    text = bad.runs_csv.read_text().splitlines()
    text[1] = text[1].replace(",11,", ",eleven,", 1)
    bad.runs_csv.write_text("\n".join(text) + "\n")
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "line 2: column new_tokens holds 'eleven', not a number" in result.output
    assert "share no point" not in result.output


def test_ctrl_c_while_redrawing_says_to_run_plot_again(runner, finished_run, tmp_path, monkeypatch):
    from kvbench.bench import session

    out = copy_of(finished_run, tmp_path)

    def interrupted_plots(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "draw_all", interrupted_plots)
    result = runner.invoke(app, ["plot", str(out)])
    assert result.exit_code == 130 and f"run kvbench plot {out} again" in result.output, result.output


# --- batch as a sweep axis, naive skipped past --naive-max ---------------------------------------------------

@pytest.fixture(scope="module")
def batch_sweep(tmp_path_factory):
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("batches") / "run"
    result = CliRunner().invoke(app, ["benchmark", "--config", TINY, "--lengths", "3,6", "--batch-size", "2,1",
                                      "--naive-max", "3", "--strategies", "naive,static,quantized", "--repeats", "1",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


def test_batch_is_a_sweep_axis_in_every_file(batch_sweep):
    out, _ = batch_sweep
    runs = pd.read_csv(out / "results.csv")
    # naive at 6 tokens is past --naive-max 3: not run at either batch
    assert sorted(runs[["strategy", "batch_size", "new_tokens"]].itertuples(index=False, name=None)) == sorted(
        [("naive", b, 3) for b in (1, 2)] + [(s, b, n) for s in ("static", "quantized") for b in (1, 2) for n in (3, 6)])
    static = runs[runs["strategy"] == "static"].set_index(["batch_size", "new_tokens"])
    assert static.loc[(2, 6), "kv_cache_bytes"] == 2 * static.loc[(1, 6), "kv_cache_bytes"]  # the cache holds B rows
    assert static.loc[(2, 6), "kv_bytes"] == 2 * static.loc[(1, 6), "kv_bytes"]
    np.testing.assert_allclose(runs["tokens_per_s"], runs["batch_size"] * runs["new_tokens"] / runs["total_s"])
    steps = pd.read_csv(out / "steps.csv")
    assert set(steps["batch_size"]) == {1, 2}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["batch_size"] == [2, 1] or meta["settings"]["batch_size"] == [1, 2]
    assert set(meta["decode_step"]["by_batch"]) == {"1", "2"}


def test_skipped_naive_points_are_marked_never_dropped(batch_sweep):
    out, result = batch_sweep
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    skipped = summary[summary["skipped"] != ""]
    assert sorted(skipped[["strategy", "batch_size", "new_tokens"]].itertuples(index=False, name=None)) == [
        ("naive", 1, 6), ("naive", 2, 6)]
    assert (skipped["skipped"] == "skipped: past --naive-max 3").all() and (skipped["repeats"] == 0).all()
    speedups = summary[summary["strategy"] == "static"].set_index(["batch_size", "new_tokens"])["speedup_vs_naive"]
    assert speedups.loc[(1, 3)] != "" and speedups.loc[(1, 6)] == ""  # only where naive was measured
    table = [line.split() for line in result.output.splitlines()]
    assert ["naive", "2", "6", "skipped"] in table and "2 point(s) skipped: past --naive-max 3" in result.output


def test_crossover_plot_and_code_paths(batch_sweep):
    out, result = batch_sweep
    assert (out / "crossover.png").read_bytes()[:4] == b"\x89PNG"
    paths = json.loads((out / "meta.json").read_text())["code_paths"]
    assert set(paths) == {"naive", "static", "quantized"}
    assert paths["static"]["attention"].startswith("SDPA") and paths["static"]["step"] == "eager"
    assert paths["quantized"]["attention"] != paths["static"]["attention"]  # attends over its own int8 storage
    assert "code paths" in result.output


def test_meta_records_where_linears_switch_to_packing_and_a_resume_decodes_so(batch_sweep):
    from kvbench import kernels
    from kvbench.bench.session import decode_as_first_process
    from kvbench.model import kernel_choices

    meta = json.loads((batch_sweep[0] / "meta.json").read_text())
    model = build_model(load_config(TINY), "cpu")  # the same process measured this shape once: same answer
    first = kernels.packed_from_rows(model)
    assert meta["packed_from_rows"] == first
    decode_as_first_process({}, model)  # a results directory from before the field: left as measured
    assert kernels.packed_from_rows(model) == first
    if {kernel for kernel, _ in kernel_choices(model)} == {"onednn"}:
        decode_as_first_process({**meta, "packed_from_rows": 8}, model)  # a first process that measured 8
        assert kernel_choices(model) == {("onednn", 8)}


def test_floor_rows_say_which_limit_binds(batch_sweep):
    runs = pd.read_csv(batch_sweep[0] / "results.csv")
    assert set(runs["bound"]) <= {"memory", "compute"}
    meta = json.loads((batch_sweep[0] / "meta.json").read_text())
    from kvbench.bench.floor import MachineLimits

    limits = MachineLimits.from_dict(meta["machine_limits"])
    for row in runs.itertuples():
        counts = meta["decode_step"]["by_batch"][str(row.batch_size)]
        visible = row.kv_bytes / counts["kv_bytes_per_token"]
        expected = limits.floor(row.weight_bytes + row.kv_bytes, counts["fixed_flops"] + counts["flops_per_token"]
                                * visible, row.batch_size)
        assert row.floor_ms == pytest.approx(expected[0]) and row.bound == expected[1]


def test_an_old_directory_with_an_int_batch_size_resumes_and_plots(runner, finished_run, tmp_path):
    """Directories written before batch was an axis: meta.json says batch_size 1, steps.csv has no batch column,
    results.csv lacks the floor's new columns. Resume completes them; plot redraws them."""
    out = copy_of(finished_run, tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    meta["settings"]["batch_size"] = 1
    meta["settings"].pop("naive_max")
    (out / "meta.json").write_text(json.dumps(meta))
    steps = pd.read_csv(out / "steps.csv").drop(columns="batch_size")
    runs = pd.read_csv(out / "results.csv").drop(columns=["weight_bytes", "kv_bytes", "bound"])
    runs.iloc[:-1].to_csv(out / "results.csv", index=False)  # the last run is redone by the resume
    steps.to_csv(out / "steps.csv", index=False)
    result = runner.invoke(app, ["benchmark", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out / "results.csv")) == len(runs)
    assert runner.invoke(app, ["plot", str(out)]).exit_code == 0


@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "1,0"], "--batch-size: '0' is not a positive integer"),
    (["--batch-size", "four"], "--batch-size: 'four' is not a positive integer"),
    (["--naive-max", "0"], "--naive-max must be a positive integer"),
])
def test_bad_batch_options(runner, tmp_path, args, needle):
    result = runner.invoke(app, ["benchmark", "--config", TINY, "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_default_naive_max_comes_from_the_estimate():
    settings = SweepSettings(lengths=[10, 100, 1000], strategies=["naive", "static"], batch_size=[1, 4])
    costs = CostModel(np.array([0.0, 0.001, 0.0]), {("static", 1): StepLine(18, 0.01)})  # naive: 1 ms a row
    # at batch 4 a naive run of n tokens takes ~4 ms x sum(16 + i) = 2 ms x n^2: 100 tokens ~26 s, 1000 ~2100 s
    assert costs.naive_max(settings, budget_s=60) == 100
    assert {(s, b, n) for s, b, n in sweep_module.skipped_points(settings, 100)} == {("naive", 1, 1000),
                                                                                    ("naive", 4, 1000)}


def test_without_out_a_new_directory_is_named_by_time_config_and_device(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run in the same second gets its own directory, never the first's
        result = runner.invoke(app, ["benchmark", "--config", TINY, "--lengths", "3", "--strategies", "static",
                                     "--repeats", "1", "--warmup", "0", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    made = sorted((tmp_path / "results").iterdir())
    assert len(made) == 2 and all(d.name.endswith(("-cpu", "-cpu-2")) for d in made), made
    assert all((d / "results.csv").is_file() and (d / "meta.json").is_file() for d in made)
