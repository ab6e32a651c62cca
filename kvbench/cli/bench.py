"""benchmark, plot, compare and ablate: the timing commands."""

from __future__ import annotations

import contextlib
import enum
import math
import sys
import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from kvbench import plugins, verify
from kvbench.bench.ablation import VARIANTS as ABLATION_VARIANTS
from kvbench.strategies import COMPILED, NAIVE
from kvbench.strategies import names as strategy_names
from kvbench.cli.common import (
    plural,
    PLUGIN_HELP,
    DEFAULT_CONFIG,
    BatchOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    PromptLenOpt,
    PromptLensOpt,
    Rows,
    SeedOpt,
    WindowOpt,
    app,
    check_fits,
    check_length,
    check_memory,
    console,
    err_console,
    fail_cleanly,
    parse_choices,
    progress_bar,
    require_positive,
    resolve_device,
    resolve_dtype,
    resolve_window,
    rows_asked,
    strategies_for,
)
from kvbench.bench.machine import check_threads
from kvbench.bench.sweep import DEFAULT_SRC_LEN, DEFAULTS, NAIVE_RUN_BUDGET_S
from kvbench.config import LoadedConfig, check_seed, load_config
from kvbench.families import default_strategies, family_of, reads_source
from kvbench.errors import KVBenchError, KVBenchWarning
from kvbench.weights import build_model

class OutputFormat(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"
    md = "md"


FormatOpt = Annotated[OutputFormat, typer.Option(
    "--format", help="stdout as a table for people, or csv, json or md for scripts (messages then go to stderr).")]


@contextlib.contextmanager
def messages_to_stderr(fmt: OutputFormat):
    """With a machine-readable --format, stdout carries the data alone: every message goes to stderr."""
    if fmt is OutputFormat.table:
        yield
        return
    console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # back to following sys.stdout, as the console was made (no file of its own)


def print_frame(frame, fmt: OutputFormat) -> None:
    from kvbench.report import frame_as

    try:
        sys.stdout.write(frame_as(frame, fmt.value))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: as the consoles end it (141), not click's 1
        console.on_broken_pipe()


# --- benchmark ------------------------------------------------------------------------------------------------

DEFAULT_LENGTHS = ",".join(map(str, DEFAULTS.lengths))
DEFAULT_BENCH_STRATEGIES = ",".join(DEFAULTS.strategies)
LONG_RUN_S = 20.0  # announce runs estimated to take longer than this


def parse_lengths(text: str, option: str = "--lengths", example: str = "10,50,100") -> list[int]:
    lengths = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) <= 0:
            raise KVBenchError(f"{option}: {part!r} is not a positive integer; give e.g. {option} {example}")
        lengths.append(int(part))
    return sorted(set(lengths))


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class RichReporter:
    """Progress for the sweep. The bar is redrawn only between runs (auto_refresh off), so that rich's
    refresh thread never competes with a timed run for the interpreter."""

    def __init__(self, progress: Progress, repeats: int):
        self.progress, self.repeats, self.task = progress, repeats, None
        self.announced: set[tuple[str, int]] = set()

    def preparing(self, what: str) -> None:
        self.progress.console.print(f"{what}...", highlight=False)  # seconds, or minutes at a large batch

    def compiled(self, seconds: float) -> None:
        self.progress.console.print(f"{COMPILED.name}: decode step compiled in {duration(seconds)} (not in any timing)")

    def planned(self, runs) -> None:
        total = sum(r.estimate_s for r in runs)
        timed = sum(not r.is_warmup for r in runs)
        console.print(f"{timed} timed runs to do, estimated {duration(total)} in all (warm-ups included)")
        self.task = self.progress.add_task("starting", total=max(total, 1e-9))
        self.progress.refresh()

    def starting(self, run) -> None:
        point = (run.strategy, run.batch, run.new_tokens)
        if not run.is_warmup and run.estimate_s > LONG_RUN_S and point not in self.announced:
            self.announced.add(point)
            self.progress.console.print(f"{run.strategy} at batch {run.batch} x {run.new_tokens} tokens: about "
                                        f"{duration(run.estimate_s)} per run, {self.repeats} repeats")
        what = "warm-up" if run.is_warmup else f"repeat {run.repeat + 1}/{self.repeats}"
        self.progress.update(self.task, description=f"{run.strategy:>8} · batch {run.batch:>3} · "
                                                    f"{run.new_tokens:>5} tokens · {what}")
        self.progress.refresh()

    def finished(self, run, row) -> None:
        self.progress.advance(self.task, run.estimate_s)
        self.progress.refresh()


def _number(value: float, fmt: str) -> str:
    return "-" if value != value else format(value, fmt)  # NaN (e.g. per-token time of a 1-token run)


def summary_table(summary) -> Table:
    """Fits 80 columns with every strategy's name; the title says what each column is. A point that was not
    run (naive past --naive-max) is a row that says so, never a missing row."""
    table = Table(title="medians over repeats; B: batch; prefill: ms of the prompt's forward; ms/step: one decode "
                        "step, a new token for each of the B sequences (IQR: its interquartile range); floor: ms "
                        "a decode step needs at least (m: "
                        "memory-bound, c: compute-bound); tok/s: tokens generated / total s; speedup over naive at "
                        "the same point", box=box.SIMPLE_HEAD, padding=(0, 0))
    for column in ("strategy", "B", "tokens", "total s", "prefill", "ms/step", "IQR", "floor", "×floor", "tok/s",
                   "speedup"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for row in summary.itertuples():
        if getattr(row, "skipped", ""):
            table.add_row(row.strategy, str(row.batch_size), str(row.new_tokens), "skipped", style="dim")
            continue
        speedup = math.nan if row.strategy == NAIVE.name else row.speedup_vs_naive
        bound = {"memory": "m", "compute": "c"}.get(getattr(row, "bound", ""), "")
        table.add_row(row.strategy, str(row.batch_size), str(row.new_tokens), _number(row.total_s_median, ".3f"),
                      _number(1000 * row.prefill_s_median, ".1f"), _number(row.per_token_ms_median, ".2f"),
                      _number(row.per_token_ms_iqr if row.repeats > 1 else math.nan, ".2f"),  # one run: no spread
                      _number(row.floor_ms, ".2f") + bound,
                      _number(row.per_token_over_floor, ".2f"), _number(row.tokens_per_s_median, ".0f"),
                      _number(speedup, ".1f") + ("x" if speedup == speedup else ""))
    return table


def memory_table(summary) -> Table | None:
    """Each cache's allocation against the bytes its sequences' tokens need (None for a directory written before
    these columns, or with no cache in it)."""
    if "kv_allocated_bytes" not in summary or not (summary["kv_allocated_bytes"].fillna(0) > 0).any():
        return None
    table = Table(title="KV cache memory at the end of each point: allocated for the batch's sequences, live: "
                        "holding their own tokens; waste = (allocated - live) / allocated", box=box.SIMPLE_HEAD,
                  padding=(0, 1))
    for column in ("strategy", "B", "tokens", "allocated MiB", "live MiB", "waste"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for row in summary[summary["kv_allocated_bytes"].fillna(0) > 0].itertuples():
        table.add_row(row.strategy, str(row.batch_size), str(row.new_tokens),
                      _number(row.kv_allocated_bytes / 2**20, ".2f"), _number(row.kv_live_bytes / 2**20, ".2f"),
                      _number(100 * row.kv_waste, ".1f") + "%")
    return table


def paths_table(paths: dict) -> Table:
    """Which code path each strategy ran (meta.json's code_paths)."""
    table = Table(title="code paths", box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("strategy", "attention", "Linear", "step"):
        table.add_column(column)
    for strategy, path in paths.items():
        table.add_row(strategy, path["attention"], path["linear"], path["step"])
    return table


def report_finish(summary, plots: list[Path], results_path: Path, paths: dict | None = None) -> None:
    if summary.empty:
        return  # nothing finished: the interruption's message says where the settings are kept
    console.print(summary_table(summary))
    memory = memory_table(summary)
    if memory is not None:
        console.print(memory)
    skipped = summary[summary["skipped"].fillna("") != ""] if "skipped" in summary else summary.iloc[:0]
    for note in skipped["skipped"].unique():
        points = skipped[skipped["skipped"] == note]
        console.print(escape(f"{len(points)} point(s) {note} (marked in summary.csv; no speed-up there)"),
                      highlight=False)
    if paths:
        console.print(paths_table(paths))
    for row in summary[summary["noisy"].fillna(False).astype(bool)].itertuples():
        err_console.print(f"[yellow]warning:[/] {row.strategy} at batch {row.batch_size} x {row.new_tokens} tokens: "
                          "IQR above 10% of the "
                          "median; the machine was noisy, consider more --repeats", highlight=False)
    console.print(f"results in {escape(str(results_path))}" + (f" ({', '.join(p.name for p in plots)})" if plots else ""))


def new_settings(loaded: LoadedConfig, device: str, lengths: str, strategies: str | None, repeats: int,
                 warmup: int, prompt_len: int, batch_size: str, threads: int | None, dtype: str, seed: int,
                 compile: bool, window: int | None, src_len: int, naive_max: int | None = None,
                 rows: Rows = Rows()):
    """Sweep settings from the options, every value checked. `rows`: --prompt-lens / --new-tokens-per-row,
    which set the batch (one point: the largest per-row count, when given)."""
    from kvbench.bench.sweep import SweepSettings

    if rows.batch is not None:
        batch_size = str(rows.batch)
        prompt_len = max(rows.prompt_lens) if rows.prompt_lens else prompt_len
        lengths = str(max(rows.new_tokens)) if rows.new_tokens else lengths

    for option, value in (("--repeats", repeats), ("--prompt-len", prompt_len), ("--src-len", src_len),
                          ("--threads", threads), ("--naive-max", naive_max)):
        if value is not None:
            require_positive(option, value)
    if warmup < 0:
        raise KVBenchError(f"--warmup must be 0 or more (got {warmup})")
    check_threads(threads)
    torch_dtype = resolve_dtype(dtype)
    check_seed("--seed", seed)
    chosen = strategies_for(loaded, strategies, DEFAULT_BENCH_STRATEGIES, compile,
                            family_default=family_of(loaded.model).bench_strategies)
    if naive_max is not None and NAIVE.name not in chosen:
        warnings.warn(f"--naive-max {naive_max} has no effect: naive is not among the strategies", KVBenchWarning)
    settings = SweepSettings(
        lengths=parse_lengths(lengths),
        strategies=chosen,
        engine=loaded.engine,
        repeats=repeats, warmup=warmup, prompt_len=prompt_len,
        batch_size=parse_lengths(batch_size, "--batch-size", "1,4,16"),
        device=str(resolve_device(device)), dtype=dtype, threads=threads, seed=seed,
        window=resolve_window(loaded, window, chosen), src_len=src_len if reads_source(loaded.model) else None, naive_max=naive_max,
        prompt_lens=rows.prompt_lens, new_tokens_per_row=rows.new_tokens)
    check_length(loaded, settings.prompt_len + max(settings.lengths) - 1, settings.strategies,
                 "--prompt-len + longest --lengths - 1")
    if settings.src_len:
        check_fits(loaded, settings.src_len, "--src-len")
    check_memory(loaded, settings.device, torch_dtype, settings.strategies, max(settings.batches),
                 settings.prompt_len + max(settings.lengths) - 1, settings.window, "--lengths, --prompt-len")
    return settings


def options_given(ctx: typer.Context, but: str) -> list[str]:
    """The options typed on the command line, other than `but`."""
    return [f"--{name.replace('_', '-')}" for name in ctx.params
            if name != but and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]


def open_for_resume(ctx: typer.Context, path: Path, strategies: str | None):
    """--resume takes no other option but --strategies naming plugins: kvbench never imports code named in a
    results directory, so the plugins a run used are loaded again only when typed again."""
    from kvbench.bench.results import ResultsDir

    given = [option for option in options_given(ctx, but="resume") if option != "--strategies"]
    if given:
        raise KVBenchError(f"--resume continues with the recorded settings; drop {', '.join(given)}")
    if strategies is not None:
        plugins.strategy_names(strategies)  # registers them; the recorded settings still say what runs
    return ResultsDir.open(path)


def resume_session(results):
    """Reopen under the lock: a partial last row is dropped first (said on stderr), never appended to."""
    from kvbench.bench import session as bench

    for note in results.drop_partial_lines():
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    run = bench.resume(results)
    resolve_device(run.settings.device)
    console.print(escape(f"resuming {results.path}: {len(run.recorded_before)} runs already recorded, "
                         f"{run.to_do} to do"), highlight=False)
    return run


def run_and_finish(run) -> None:
    """Sweep, then write summary, plots and meta. Ctrl-C at any point leaves a directory that --resume
    completes, and says so."""
    from kvbench.bench import session as bench

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err_console,
                        auto_refresh=False, transient=True)
    status = "complete"
    try:
        if run.to_do:
            with progress:
                bench.run(run, torch.device(run.settings.device), RichReporter(progress, run.settings.repeats))
    except KeyboardInterrupt:
        status = "interrupted"
    finished = len(run.results.completed())
    kept = f"{plural(finished, 'finished run')} kept in {run.results.runs_csv}" if finished else \
        f"no run had finished; the settings are kept in {run.results.path}"
    hint = f"{kept}; continue with: kvbench benchmark --resume {run.results.path}"
    try:
        summary, plots = bench.finish(run, status)
    except KeyboardInterrupt:
        err_console.print(f"interrupted while writing the summary and plots: {escape(hint)}", highlight=False)
        raise typer.Exit(130) from None
    report_finish(summary, plots, run.results.path, run.meta.get("code_paths"))
    if status == "interrupted":
        err_console.print(f"interrupted: {escape(hint)}", highlight=False)
        raise typer.Exit(130)


@app.command()
@fail_cleanly
def benchmark(
    ctx: typer.Context,
    config: ConfigOpt = DEFAULT_CONFIG,
    device: DeviceOpt = "auto",
    lengths: Annotated[str, typer.Option(metavar="N,N,...", help="New tokens per point.")] = DEFAULT_LENGTHS,
    strategies: Annotated[str | None, typer.Option(
        metavar="NAME,...", help=f"Comma-separated, from: {', '.join(strategy_names('decoder'))}. {PLUGIN_HELP}",
        show_default=f"{DEFAULT_BENCH_STRATEGIES}; {default_strategies('bench')}")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per point.")] = DEFAULTS.repeats,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per strategy and length.")] = DEFAULTS.warmup,
    prompt_len: Annotated[int, typer.Option(help="Prompt length in tokens.")] = DEFAULTS.prompt_len,
    batch_size: Annotated[str, typer.Option(metavar="B,B,...", help="Sequences per batch: a second sweep axis, "
                                            "e.g. 1,4,16.")] = "1",
    prompt_lens: PromptLensOpt = None,
    new_tokens_per_row: Annotated[str | None, typer.Option(
        metavar="N,N,...", help="Rows that stop at different steps: new tokens per row (sets the batch size; "
                                "replaces --lengths with their largest); a finished row stops growing its cache.")
    ] = None,
    naive_max: Annotated[int | None, typer.Option(
        metavar="N", help="Skip naive (marked so in the table and summary.csv) at lengths above N new tokens.",
        show_default=f"the longest length whose naive run is estimated at most {NAIVE_RUN_BUDGET_S:.0f} s")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch, at most the cores available.",
                                                show_default="torch's own choice")] = None,
    dtype: DtypeOpt = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random prompt.")] = 0,
    engine: EngineOpt = "kvbench",
    compile: CompileOpt = False,
    window: WindowOpt = None,
    src_len: Annotated[int, typer.Option(help="Source length (encoder-decoder configs).")] = DEFAULT_SRC_LEN,
    out: Annotated[Path | None, typer.Option(help="Results directory (created).",
                                             show_default="results/<date-time>-<config>-<device>")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run in this directory, with its "
                                                "recorded settings.")] = None,
    format: FormatOpt = OutputFormat.table,
) -> None:
    """Time cached against naive generation over sequence lengths; write CSVs and plots."""
    with messages_to_stderr(format):
        path = run_benchmark(ctx, config, device, lengths, strategies, repeats, warmup, prompt_len, batch_size,
                             threads, dtype, seed, compile, window, src_len, out, resume, naive_max, engine,
                             prompt_lens, new_tokens_per_row)
    if format is not OutputFormat.table:
        import pandas as pd

        print_frame(pd.read_csv(path / "summary.csv"), format)


def run_benchmark(ctx, config, device, lengths, strategies, repeats, warmup, prompt_len, batch_size, threads, dtype,
                  seed, compile, window, src_len, out, resume, naive_max, engine="kvbench", prompt_lens=None,
                  new_tokens_per_row=None) -> Path:
    """benchmark's work; returns the results directory."""
    from kvbench.bench import session as bench
    from kvbench.bench.results import ResultsDir

    if resume is not None:
        results = open_for_resume(ctx, resume, strategies)
        with results.lock():
            run = resume_session(results)
            if not run.to_do:
                console.print("nothing to do: every run is recorded; writing the summary and plots")
            run_and_finish(run)
        return results.path
    loaded = load_config(config, engine)
    settings = new_settings(loaded, device, lengths, strategies, repeats, warmup, prompt_len, batch_size,
                            threads, dtype, seed, compile, window, src_len, naive_max,
                            rows_asked(ctx, loaded, prompt_lens, new_tokens_per_row))
    results = ResultsDir.create(out, Path("results"), loaded.name, settings.device, settings.dtype)
    with results.lock():
        run = bench.start(loaded, settings, results)
        console.print(f"{loaded.name} on {settings.device} ({settings.dtype}), writing to {results.path}")
        run_and_finish(run)
    return results.path


@app.command()
@fail_cleanly
def plot(results_dir: Annotated[Path, typer.Argument(metavar="RESULTS_DIR",
                                                     help="A results directory written by benchmark.")]) -> None:
    """Redraw the plots (and summary.csv) of a results directory."""
    from kvbench.bench import session as bench
    from kvbench.bench.results import ResultsDir

    results = ResultsDir.open(results_dir)
    with results.lock():
        try:
            summary, plots = bench.redraw(results)
        except KeyboardInterrupt:
            err_console.print(f"interrupted while redrawing; run kvbench plot {escape(str(results_dir))} again",
                              highlight=False)
            raise typer.Exit(130) from None
    report_finish(summary, plots, results_dir, results.read_meta().get("code_paths"))


def compare_table(joined) -> Table:
    """At most 80 columns wide: totals in s, one decode step in ms, each with B/A."""
    table = Table(title="B / A, ratio of medians (below 1: B is faster); step: decode ms", box=box.SIMPLE_HEAD,
                  padding=(0, 0))
    for column in ("strategy", "batch", "tokens", "total A", "total B", "B/A", "step A", "step B", "B/A"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for r in joined.itertuples():
        table.add_row(r.strategy, str(r.batch_size), str(r.new_tokens), f"{r.total_s_median_a:.3f}",
                      f"{r.total_s_median_b:.3f}", f"{r.total_ratio:.2f}" + _mark(r.total_significant),
                      _number(r.per_token_ms_median_a, ".2f"), _number(r.per_token_ms_median_b, ".2f"),
                      _number(r.per_token_ratio, ".2f") + _mark(r.per_token_significant))
    return table


def _mark(significant: bool) -> str:
    return "*" if significant else " "


def with_significance(c, dir_a: Path, dir_b: Path):
    """The comparison's points with p-values and marks from both runs' repeats."""
    from kvbench.bench.results import ResultsDir
    from kvbench.bench.significance import mark_differences

    return mark_differences(c.joined, ResultsDir.open(dir_a).read_runs(), ResultsDir.open(dir_b).read_runs(),
                            keys=("strategy", "batch_size", "new_tokens"))


@app.command()
@fail_cleanly
def compare(
    dir_a: Annotated[Path, typer.Argument(metavar="DIR_A", help="Baseline results directory (A).")],
    dir_b: Annotated[Path, typer.Argument(metavar="DIR_B", help="Results directory to compare (B).")],
    format: FormatOpt = OutputFormat.table,
) -> None:
    """Per-point ratios of medians, B against A (below 1.00: B is faster); * marks a difference beyond the
    runs' noise (Mann-Whitney U on the repeats, p < 0.05: needs 4 or more repeats a side)."""
    from kvbench.bench import session as bench
    c = bench.compare(dir_a, dir_b)
    joined = with_significance(c, dir_a, dir_b)
    out = console if format is OutputFormat.table else err_console
    for label, meta in (("A", c.meta_a), ("B", c.meta_b)):
        s = meta.get("settings", {})
        out.print(escape(f"{label}: {meta.get('config_name')} on {meta.get('device_name')}, {s.get('dtype')}, "
                             f"batch {s.get('batch_size')}, commit {str(meta.get('git_commit'))[:7]}"), highlight=False)
    for difference in c.differences:
        err_console.print(f"[yellow]warning:[/] A and B differ in {escape(difference)}; the ratios mix it in",
                          highlight=False)
    for label, points in (("A", c.only_a), ("B", c.only_b)):
        if points:
            err_console.print(escape(f"only in {label}, not compared: " + ", ".join(
                f"{s} at {n}" + (f" x batch {b}" if b != 1 else "") for s, b, n in points)), highlight=False)
    if format is OutputFormat.table:
        console.print(compare_table(joined))
        console.print("* differs beyond noise (Mann-Whitney U on the repeats, p < 0.05)", highlight=False)
    else:
        print_frame(joined, format)


@app.command()
@fail_cleanly
def ablate(
    config: ConfigOpt = DEFAULT_CONFIG,
    variants: Annotated[str, typer.Option(help=f"Comma-separated: {', '.join(ABLATION_VARIANTS)}.")] =
        "kvbench,linear,matmul,mv,no-inference-mode,1-thread,dynamic",
    new_tokens: Annotated[int, typer.Option(help="Tokens per timed generation.")] = 200,
    repeats: Annotated[int, typer.Option(help="Timed repeats per variant (interleaved).")] = 5,
    prompt_len: PromptLenOpt = 16,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: SeedOpt = 0,
) -> None:
    """Time decode-step variants in one run: what each design choice of the cached path buys."""
    from kvbench.bench import ablation, floor

    loaded = load_config(config)
    names = parse_choices(variants, tuple(ablation.VARIANTS), "--variants")
    for option, value in (("--new-tokens", new_tokens), ("--repeats", repeats), ("--prompt-len", prompt_len),
                          ("--batch-size", batch_size)):
        require_positive(option, value)
    check_seed("--seed", seed)
    if new_tokens < 2:
        raise KVBenchError("--new-tokens must be at least 2: per-token time is (t(N) - t(1)) / (N - 1)")
    check_fits(loaded, prompt_len + new_tokens, "--prompt-len + --new-tokens")
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    model = build_model(loaded, dev, torch_dtype)
    prompt = verify.random_prompt(loaded.model, batch_size, prompt_len, seed).to(dev)
    built = ablation.build_variants(names, model, prompt, new_tokens)  # a variant this model cannot run: refused now
    step_bytes = floor.weight_bytes_per_step(model, batch_size)
    limits = floor.measure_limits(dev, step_bytes, torch_dtype, [batch_size])
    console.print(f"{escape(loaded.name)} on {dev} ({dtype}), {plural(torch.get_num_threads(), 'thread')}; read bandwidth "
                  f"{limits.best_gbs(step_bytes):.1f} GB/s over {limits.bandwidth[0]['buffer_bytes'] / 1e6:.0f} MB "
                  f"(best of {len(limits.bandwidth)} probes), matmul at {batch_size} rows "
                  f"{limits.throughput_gflops(batch_size):.0f} GFLOP/s")
    with progress_bar() as progress:
        task = progress.add_task("repeats", total=repeats)
        rows = ablation.run_ablation(built, new_tokens, repeats, dev, on_repeat=lambda r: progress.advance(task))
    summary = ablation.summarize_ablation(rows, model, prompt_len, new_tokens, batch_size, limits)
    table = Table(title=f"decode ms per step over {new_tokens} tokens, median of {repeats}; floor "
                        f"{summary.attrs['floor_ms']:.2f} ms ({summary.attrs['bound']}-bound)", box=box.SIMPLE_HEAD)
    for column in ("variant", "ms/step", "IQR", "×floor", f"×{names[0]}"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in summary.itertuples():
        table.add_row(r.variant, f"{r.per_token_ms:.2f}", f"{r.iqr_ms:.2f}", f"{r.x_floor:.2f}", f"{r.x_first:.2f}")
    console.print(table)
    for name in names:
        console.print(f"  {name}: {ablation.VARIANTS[name]}", highlight=False)
