"""benchmark, plot, compare and ablate: the timing commands."""

from __future__ import annotations

import math
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

from kvbench import verify
from kvbench.strategies import COMPILED, NAIVE
from kvbench.strategies import names as strategy_names
from kvbench.cli.common import (
    DEFAULT_CONFIG,
    DEFAULT_SEQ2SEQ_BENCH,
    BatchOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    PromptLenOpt,
    SeedOpt,
    WindowOpt,
    app,
    check_fits,
    check_length,
    check_memory,
    console,
    err_console,
    fail_cleanly,
    is_seq2seq,
    parse_choices,
    progress_bar,
    require_positive,
    resolve_config,
    resolve_device,
    resolve_dtype,
    resolve_window,
    strategies_for,
)
from kvbench.config import LoadedConfig, check_seed
from kvbench.errors import KVBenchError
from kvbench.weights import build_model

# --- benchmark ------------------------------------------------------------------------------------------------

DEFAULT_LENGTHS = "10,50,100,500,1000"
DEFAULT_BENCH_STRATEGIES = "naive,static"
LONG_RUN_S = 20.0  # announce runs estimated to take longer than this


def parse_lengths(text: str) -> list[int]:
    lengths = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) <= 0:
            raise KVBenchError(f"--lengths: {part!r} is not a positive integer; give e.g. --lengths 10,50,100")
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

    def compiled(self, seconds: float) -> None:
        self.progress.console.print(f"{COMPILED.name}: decode step compiled in {duration(seconds)} (not in any timing)")

    def planned(self, runs) -> None:
        total = sum(r.estimate_s for r in runs)
        timed = sum(not r.is_warmup for r in runs)
        console.print(f"{timed} timed runs to do, estimated {duration(total)} in all (warm-ups included)")
        self.task = self.progress.add_task("starting", total=max(total, 1e-9))
        self.progress.refresh()

    def starting(self, run) -> None:
        point = (run.strategy, run.new_tokens)
        if not run.is_warmup and run.estimate_s > LONG_RUN_S and point not in self.announced:
            self.announced.add(point)
            self.progress.console.print(f"{run.strategy} at {run.new_tokens} tokens: about {duration(run.estimate_s)}"
                                        f" per run, {self.repeats} repeats")
        what = "warm-up" if run.is_warmup else f"repeat {run.repeat + 1}/{self.repeats}"
        self.progress.update(self.task, description=f"{run.strategy:>8} · {run.new_tokens:>5} tokens · {what}")
        self.progress.refresh()

    def finished(self, run, row) -> None:
        self.progress.advance(self.task, run.estimate_s)
        self.progress.refresh()


def _number(value: float, fmt: str) -> str:
    return "-" if value != value else format(value, fmt)  # NaN (e.g. per-token time of a 1-token run)


def summary_table(summary) -> Table:
    table = Table(title="medians over repeats; ms/tok: decode time per token (IQR: its interquartile range); floor: "
                        "ms to read what a decode step must, at the measured bandwidth", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for column in ("strategy", "tokens", "total s", "ms/tok", "IQR", "floor", "×floor", "speedup"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for row in summary.itertuples():
        speedup = math.nan if row.strategy == NAIVE.name else row.speedup_vs_naive
        table.add_row(row.strategy, str(row.new_tokens), _number(row.total_s_median, ".3f"),
                      _number(row.per_token_ms_median, ".2f"),
                      _number(row.per_token_ms_iqr, ".2f"), _number(row.floor_ms, ".2f"),
                      _number(row.per_token_over_floor, ".2f"),
                      _number(speedup, ".1f") + ("x" if speedup == speedup else ""))
    return table


def report_finish(summary, plots: list[Path], results_path: Path) -> None:
    if not summary.empty:
        console.print(summary_table(summary))
        for row in summary[summary["noisy"]].itertuples():
            err_console.print(f"[yellow]warning:[/] {row.strategy} at {row.new_tokens} tokens: IQR above 10% of the "
                              "median; the machine was noisy, consider more --repeats", highlight=False)
    console.print(f"results in {escape(str(results_path))}" + (f" ({', '.join(p.name for p in plots)})" if plots else ""))


def new_settings(loaded: LoadedConfig, device: str, lengths: str | None, strategies: str | None, repeats: int | None,
                 warmup: int | None, prompt_len: int | None, batch_size: int | None, threads: int | None,
                 dtype: str | None, seed: int | None, compile: bool, window: int | None, src_len: int | None):
    """Sweep settings from the options given, defaults for the rest, every value checked."""
    from kvbench.bench.sweep import SweepSettings

    given = {"--repeats": repeats, "--prompt-len": prompt_len, "--batch-size": batch_size, "--threads": threads,
             "--src-len": src_len}
    for option, value in given.items():
        if value is not None:
            require_positive(option, value)
    if warmup is not None and warmup < 0:
        raise KVBenchError(f"--warmup must be 0 or more (got {warmup})")
    check_seed("--seed", seed or 0)
    settings = SweepSettings(
        lengths=parse_lengths(lengths or DEFAULT_LENGTHS),
        strategies=strategies_for(loaded, strategies, DEFAULT_BENCH_STRATEGIES, compile, DEFAULT_SEQ2SEQ_BENCH),
        repeats=3 if repeats is None else repeats, warmup=1 if warmup is None else warmup,
        prompt_len=prompt_len or 16, batch_size=batch_size or 1, device=str(resolve_device(device)),
        dtype=dtype or "float32", threads=threads, seed=seed or 0, window=resolve_window(loaded, window),
        src_len=(src_len or 16) if is_seq2seq(loaded) else None)
    torch_dtype = resolve_dtype(settings.dtype)
    check_length(loaded, settings.prompt_len + max(settings.lengths) - 1, settings.strategies,
                 "--prompt-len + longest --lengths - 1")
    if settings.src_len:
        check_fits(loaded, settings.src_len, "--src-len")
    check_memory(loaded, settings.device, torch_dtype, settings.strategies, settings.batch_size,
                 settings.prompt_len + max(settings.lengths) - 1, settings.window, "--lengths, --prompt-len")
    return settings


@app.command()
@fail_cleanly
def benchmark(
    config: ConfigOpt = DEFAULT_CONFIG,
    device: DeviceOpt = "auto",
    lengths: Annotated[str | None, typer.Option(help=f"New tokens per point [default: {DEFAULT_LENGTHS}].")] = None,
    strategies: Annotated[str | None, typer.Option(
        help=f"Comma-separated, from: {', '.join(strategy_names('decoder'))} [default: {DEFAULT_BENCH_STRATEGIES}].")] = None,
    repeats: Annotated[int | None, typer.Option(help="Timed runs per point [default: 3].")] = None,
    warmup: Annotated[int | None, typer.Option(help="Untimed warm-up runs per strategy and length [default: 1].")] = None,
    prompt_len: Annotated[int | None, typer.Option(help="Prompt length in tokens [default: 16].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per batch [default: 1].")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch [default: torch's].")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 [default: float32].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random prompt [default: 0].")] = None,
    compile: CompileOpt = False,
    window: WindowOpt = None,
    src_len: Annotated[int | None, typer.Option(help="Source length (encoder-decoder configs) [default: 16].")] = None,
    out: Annotated[Path | None, typer.Option(help="Results directory [default: results/<date-time>-<config>-<device>].")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run in this directory.")] = None,
) -> None:
    """Time cached against naive generation over sequence lengths; write CSVs and plots."""
    from kvbench.bench import session as bench

    if resume is not None:
        given = [name for name, value in (("--lengths", lengths), ("--strategies", strategies), ("--repeats", repeats),
                 ("--warmup", warmup), ("--prompt-len", prompt_len), ("--batch-size", batch_size),
                 ("--threads", threads), ("--dtype", dtype), ("--seed", seed), ("--out", out),
                 ("--compile", compile or None), ("--window", window), ("--src-len", src_len))
                 if value is not None]
        if given or config != DEFAULT_CONFIG:
            raise KVBenchError(f"--resume continues with the recorded settings; drop {', '.join(given) or '--config'}")
        run = bench.resume(resume)
        resolve_device(run.settings.device)
        console.print(f"resuming {escape(str(resume))}: {len(run.results.completed())} runs already recorded")
    else:
        loaded = resolve_config(config)
        settings = new_settings(loaded, device, lengths, strategies, repeats, warmup, prompt_len, batch_size,
                                threads, dtype, seed, compile, window, src_len)
        run = bench.start(loaded, settings, out, Path("results"))
        console.print(f"{escape(loaded.name)} on {settings.device} ({settings.dtype}), writing to "
                      f"{escape(str(run.results.path))}")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err_console,
                        auto_refresh=False, transient=True)
    try:
        with progress:
            bench.run(run, torch.device(run.settings.device), RichReporter(progress, run.settings.repeats))
    except KeyboardInterrupt:
        summary, plots = bench.finish(run, "interrupted")
        report_finish(summary, plots, run.results.path)
        err_console.print(f"interrupted: {len(run.results.completed())} finished runs kept in "
                          f"{escape(str(run.results.runs_csv))}; continue with: kvbench benchmark --resume "
                          f"{escape(str(run.results.path))}",
                          highlight=False)
        raise typer.Exit(130) from None
    summary, plots = bench.finish(run, "complete")
    report_finish(summary, plots, run.results.path)


@app.command()
@fail_cleanly
def plot(results_dir: Annotated[Path, typer.Argument(help="A results directory written by benchmark.")]) -> None:
    """Redraw the plots (and summary.csv) of a results directory."""
    from kvbench.bench import session as bench

    summary, plots = bench.redraw(results_dir)
    report_finish(summary, plots, results_dir)


@app.command()
@fail_cleanly
def compare(
    dir_a: Annotated[Path, typer.Argument(help="Baseline results directory (A).")],
    dir_b: Annotated[Path, typer.Argument(help="Results directory to compare (B).")],
) -> None:
    """Per-point ratios of medians, B against A (below 1.00: B is faster)."""
    from kvbench.bench import session as bench

    joined, meta_a, meta_b = bench.compare(dir_a, dir_b)
    for label, meta in (("A", meta_a), ("B", meta_b)):
        s = meta.get("settings", {})
        console.print(escape(f"{label}: {meta.get('config_name')} on {meta.get('device_name')} ({s.get('dtype')}, "
                             f"batch {s.get('batch_size')}, commit {str(meta.get('git_commit'))[:10]})"),
                      highlight=False)
    table = Table(title="B / A, ratio of medians")
    for column in ("strategy", "new tokens", "total A", "total B", "B/A total", "per token A", "per token B",
                   "B/A per token"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for r in joined.itertuples():
        table.add_row(r.strategy, str(r.new_tokens), f"{r.total_s_median_a:.3f} s", f"{r.total_s_median_b:.3f} s",
                      f"{r.total_ratio:.2f}", f"{r.per_token_ms_median_a:.2f} ms", f"{r.per_token_ms_median_b:.2f} ms",
                      f"{r.per_token_ratio:.2f}")
    console.print(table)


@app.command()
@fail_cleanly
def ablate(
    config: ConfigOpt = DEFAULT_CONFIG,
    variants: Annotated[str, typer.Option(help="Comma-separated: kvbench, linear, matmul, mv, no-inference-mode, "
                                               "1-thread, dynamic, naive, hf-cache, hf-naive.")] =
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

    loaded = resolve_config(config)
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
    limits = floor.measure_limits(dev, floor.weight_bytes_per_step(model, batch_size), torch_dtype)
    console.print(f"{escape(loaded.name)} on {dev} ({dtype}), {torch.get_num_threads()} threads; read bandwidth "
                  f"{limits.best_bandwidth_gbs:.1f} GB/s over {limits.bandwidth_bytes / 1e6:.0f} MB")
    built = ablation.build_variants(names, model, prompt, new_tokens)
    with progress_bar() as progress:
        task = progress.add_task("repeats", total=repeats)
        rows = ablation.run_ablation(built, new_tokens, repeats, dev, on_repeat=lambda r: progress.advance(task))
    summary = ablation.summarize_ablation(rows, model, prompt_len, new_tokens, batch_size, limits.best_bandwidth_gbs)
    table = Table(title=f"decode ms/token over {new_tokens} tokens, median of {repeats}; floor "
                        f"{summary.attrs['floor_ms']:.2f} ms", box=box.SIMPLE_HEAD)
    for column in ("variant", "ms/token", "IQR", "×floor", f"×{names[0]}"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in summary.itertuples():
        table.add_row(r.variant, f"{r.per_token_ms:.2f}", f"{r.iqr_ms:.2f}", f"{r.x_floor:.2f}", f"{r.x_first:.2f}")
    console.print(table)
    for name in names:
        console.print(f"  {name}: {ablation.VARIANTS[name]}", highlight=False)
