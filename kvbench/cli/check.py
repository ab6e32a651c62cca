"""evaluate and kv-evaluate: the correctness commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvbench import verify
from kvbench.errors import KVBenchError
from kvbench.precision import NEAR_TIE_KL
from kvbench import strategies as registry
from kvbench.strategies import COMPILED
from kvbench.strategies import names as strategy_names
from kvbench.cli.common import (
    typed,
    plural,
    PerRowOpt,
    PromptLensOpt,
    Rows,
    rows_asked,
    PLUGIN_HELP,
    DEFAULT_CONFIG,
    AtolOpt,
    BatchOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    PromptLenOpt,
    RtolOpt,
    SeedOpt,
    SrcLenOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    WindowOpt,
    app,
    check_fits,
    check_length,
    check_memory,
    console,
    err_console,
    fail_cleanly,
    output_file,
    progress_bar,
    require_positive,
    resolve_device,
    resolve_dtype,
    resolve_window,
    strategies_for,
    tolerance,
)
from kvbench.config import check_seed, load_config
from kvbench.families import default_strategies, family_of, reads_source
from kvbench.generate import Rollback, RowStops, cache_tokens, for_generation
from kvbench.sampling import SamplingSettings
from kvbench.kernels import for_decoding
from kvbench.weights import build_model, load_cpu_model, read_weights

# --- evaluate ---------------------------------------------------------------------------------------------------

def weights_dtype(tensors: dict) -> str:
    return "/".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}))


def comparison_table(comparisons: list[verify.Comparison], tol: verify.Tolerance) -> Table:
    """Judged by err/tol alone, so it stands beside the verdict; max rel and argmax agreement inform only."""
    table = Table(title=f"logits compared, judged by err/tol = max |Δ| / (atol + rtol |expected|) <= 1 (atol "
                        f"{tol.atol:g}, rtol {tol.rtol:g}); max rel and argmax: for information, not judged",
                  box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("comparison", "max |Δ|", "err/tol", "result", "max rel", "argmax"):
        table.add_column(column, justify="left" if column == "comparison" else "right", no_wrap=True)
    for c in comparisons:
        verdict = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name, f"{c.max_abs:.2e}", f"{c.worst_ratio:.3f}", verdict, f"{c.max_rel:.1e}",
                      f"{c.argmax_agreement:.1%}")
    return table


@app.command()
@fail_cleanly
def evaluate(
    ctx: typer.Context,
    config: ConfigOpt = DEFAULT_CONFIG,
    expected: Annotated[Path | None, typer.Option(help="Expected-logits .safetensors (input_ids, logits).")] = None,
    write_expected: Annotated[Path | None, typer.Option(help="Write the NumPy reference's logits here (an expected "
                                                         "file for --expected).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --write-expected overwrite an existing file.")] = False,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 1,
    prompt_len: PromptLenOpt = 16,
    src_len: SrcLenOpt = 16,
    seed: SeedOpt = 0,
    prompt_lens: PromptLensOpt = None,
) -> None:
    """Check the model's logits after a prompt against the NumPy float64 reference and expected values."""
    loaded = load_config(config)
    rows = rows_asked(ctx, loaded, prompt_lens)
    if rows.prompt_lens:
        evaluate_ragged(loaded, rows.prompt_lens, expected, write_expected, atol, rtol, device, dtype, seed)
        return
    for option, value in (("--batch-size", batch_size), ("--prompt-len", prompt_len), ("--src-len", src_len)):
        require_positive(option, value)
    check_seed("--seed", seed)
    dev, torch_dtype, tol = resolve_device(device), resolve_dtype(dtype), tolerance(dtype, atol, rtol)
    if write_expected is not None:
        output_file(write_expected, "--write-expected", force)
    expected_logits = None
    if expected is not None:
        fixed = [f"--{name.replace('_', '-')}" for name in ("batch_size", "prompt_len", "src_len", "seed") if typed(ctx, name)]
        if fixed:  # the file's own ids are the prompt: these would be silently ignored
            raise KVBenchError(f"--expected {expected} holds its own prompt ids; drop {', '.join(fixed)}")
        inputs, expected_logits = verify.read_expected(expected, loaded.model)
    else:
        check_fits(loaded, max(prompt_len, src_len if reads_source(loaded.model) else 0), "--prompt-len / --src-len")
        inputs = verify.random_inputs(loaded.model, batch_size, prompt_len, src_len, seed)
    file_tensors = read_weights(loaded) if loaded.weights_path is not None else None
    cpu_model = load_cpu_model(loaded, file_tensors)
    # The reference's own copy, as the file holds it: float64 weights stay float64 (the torch model runs them
    # rounded to float32 or --dtype); random weights are the model's.
    cpu_weights = file_tensors if file_tensors is not None else {n: t.clone() for n, t in cpu_model.state_dict().items()}
    model = for_decoding(cpu_model.to(dev, torch_dtype), dev, torch_dtype)
    result, reference = verify.evaluate(model, cpu_weights, inputs, tol, expected_logits)
    source = f", source {tuple(inputs.src_ids.shape)}" if inputs.src_ids is not None else ""
    console.print(f"{escape(loaded.name)}: prompt {tuple(inputs.input_ids.shape)}{source} on {dev} ({dtype}), "
                  f"weights {weights_dtype(cpu_weights)}")
    console.print(comparison_table(result.comparisons, tol))
    for c in result.comparisons:
        if c.nonfinite:
            console.print(f"  [bold red]FAIL[/] {escape(c.name)}: {escape(c.nonfinite)}", highlight=False)
    if write_expected is not None:
        verify.write_expected(write_expected, inputs, reference, verify.model_origin(loaded))
        console.print(f"wrote expected logits of the NumPy reference to {escape(str(write_expected))}")
    if not result.passed:
        err_console.print("[bold red]evaluate failed:[/] logits outside tolerance", highlight=False)
        written_for = verify.expected_origin(expected) if expected is not None else None
        if written_for is not None and written_for != verify.model_origin(loaded):
            err_console.print(escape(f"  note: {expected} was written for {written_for}; this run is "
                                     f"{verify.model_origin(loaded)}"), highlight=False)
        raise typer.Exit(1)


def evaluate_ragged(loaded, lengths: list[int], expected: Path | None, write_expected: Path | None,
                    atol: float | None, rtol: float | None, device: str, dtype: str, seed: int) -> None:
    """evaluate --prompt-lens: one left-padded forward, each row against the reference run on it alone."""
    for option, value in (("--expected", expected), ("--write-expected", write_expected)):
        if value is not None:
            raise KVBenchError(f"{option} and --prompt-lens: an expected file holds one rectangular batch; drop one")
    check_seed("--seed", seed)
    check_fits(loaded, max(lengths), "the longest --prompt-lens")
    dev, torch_dtype, tol = resolve_device(device), resolve_dtype(dtype), tolerance(dtype, atol, rtol)
    cpu_model = load_cpu_model(loaded, read_weights(loaded) if loaded.weights_path is not None else None)
    cpu_weights = {n: t.clone() for n, t in cpu_model.state_dict().items()}
    model = for_decoding(cpu_model.to(dev, torch_dtype), dev, torch_dtype)
    prompts = [verify.random_prompt(loaded.model, 1, n, seed + row)[0] for row, n in enumerate(lengths)]
    result = verify.evaluate_rows(model, cpu_weights, prompts, tol)
    console.print(f"{escape(loaded.name)}: a ragged batch of prompts {'/'.join(map(str, lengths))}, left-padded, on "
                  f"{dev} ({dtype}); each row against the reference alone")
    console.print(comparison_table(result.comparisons, tol))
    if not result.passed:
        err_console.print("[bold red]evaluate failed:[/] logits outside tolerance", highlight=False)
        raise typer.Exit(1)


# --- kv-evaluate ------------------------------------------------------------------------------------------------


def divergence_text(check: verify.StrategyCheck) -> str:
    d = check.divergence
    if d is None:
        return "no token differs from naive's choice"
    kind = "near-tie" if d.near_tie else "MISMATCH" if check.exact else "differs (not exact by design)"
    return (f"{kind} at step {d.step} (row {d.row}): chose {d.chosen}, naive would choose {d.naive_choice}, "
            f"naive gap {d.gap:.2e}")


def _contents(check: verify.StrategyCheck) -> str:
    if check.contents_unchecked:
        return "n/a"  # a plugin without contents(): said below
    return "—" if check.contents_ratio is None else f"{check.contents_ratio:.2f}"


def strategy_table(checks: list[verify.StrategyCheck], tol: verify.Tolerance) -> Table:
    """One row per strategy, within 80 columns. `by` says what the row is judged by: the logit tolerance
    (exact strategies) or the KL / top-1 thresholds (approximate ones); both kinds' K/V must pass too."""
    table = Table(title=f"vs naive recomputation (atol {tol.atol:g}, rtol {tol.rtol:g}); |Δ|: largest logit "
                        "difference; KL: mean and worst step; K/V: stored keys and values vs a fresh forward, "
                        "≤ 1 passes", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("strategy", "by", "|Δ|", "Δ/tol", "KL", "KL max", "top-1", "tokens", "K/V", "result"):
        table.add_column(column, justify="left" if column in ("strategy", "by") else "right", no_wrap=True)
    for c in checks:
        verdict = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        d = c.divergence
        tokens = "same" if d is None else f"{'tie' if d.near_tie else 'DIFF'}@{d.step}"
        top1 = c.lowest_top1
        table.add_row(c.strategy, "tol" if c.exact else "KL", f"{c.max_abs:.0e}",
                      f"{c.worst_ratio:.2f}" if c.exact else "—", f"{c.pooled.mean_kl:.0e}", f"{c.worst_kl:.0e}",
                      "100%" if top1 == 1 else f"{top1:.1%}", tokens, _contents(c), verdict)
    return table


def natural_width(table: Table) -> int:
    """The columns a table needs to show every cell whole."""
    return Console(width=1000).measure(table).maximum


def rules_text(checks: list[verify.StrategyCheck]) -> list[str]:
    """How each kind of row is judged, once per kind present."""
    rules = {}
    for c in checks:
        if c.exact:
            rules["tol"] = "by tol: every logit within tolerance, no token naive would not choose (near-ties aside)"
        else:
            t = c.thresholds
            rules["KL"] = (f"by KL: mean KL <= {t.max_mean_kl:g}, top-1 >= {t.min_top1:.0%} over all generations; "
                           f"every step's KL <= {t.max_step_kl:g}, at most {t.max_streak} disagreeing steps in a row "
                           f"(near-ties, KL <= {NEAR_TIE_KL:g}, aside)")
    return [*rules.values(), "K/V (every cache): stored K/V within rounding of a fresh forward's, plus the cache's "
                             "own storage bound (int8: max|x|/254 per vector)"]


def report_checks(checks: list[verify.StrategyCheck], tol: verify.Tolerance, window: int) -> None:
    table = strategy_table(checks, tol)
    # a long (plugin) strategy name widens the table past 80 columns rather than cutting names and headers
    width = console.width
    console.width = max(width, natural_width(table))  # print(width=) cannot exceed the console's own
    try:
        console.print(table)
    finally:
        console.width = width
    for rule in rules_text(checks):
        console.print(f"  {rule}", highlight=False)
    plan = max((c.generations for c in checks), key=len)
    labels = list(dict.fromkeys(g.label.split(": row ")[0] for g in plan))  # a ragged batch's rows: one generation
    console.print(f"  each cache object served {plural(len(labels), 'generation')}, each checked: "
                  + "; ".join(labels), highlight=False)
    for c in checks:
        fewer = [label for label in labels if label not in {g.label.split(": row ")[0] for g in c.generations}]
        if fewer and len(c.generations) > 1:  # a cache that cannot serve a case (ragged = False) skipped it
            console.print(f"  {c.strategy}: not run on {'; '.join(fewer)} (the strategy declares it does not "
                          "serve it)", highlight=False)
        if c.contents_unchecked:
            console.print(f"  {c.strategy}: stored K/V unchecked (the cache provides no contents())", highlight=False)
        if c.divergence is not None:
            console.print(f"  {c.strategy}: {divergence_text(c)}", highlight=False)
        for failure in c.failures:
            console.print(f"  [bold red]FAIL[/] {escape(c.strategy)}, {escape(failure)}", highlight=False)
        if c.drift is not None:
            console.print(f"  {c.strategy} (window {window}) against full attention, for information: max abs "
                          f"{c.drift.max_abs:.2e}, mean KL {c.drift.mean_kl:.1e}, top-1 {c.drift.top1:.1%}",
                          highlight=False)


def row_stops(loaded, rows: Rows, eos_id: int | None) -> RowStops | None:
    """Where the rows stop: --new-tokens-per-row and --eos-id, checked; None when neither is given."""
    if eos_id is not None and not 0 <= eos_id < loaded.model.vocab_size:
        raise KVBenchError(f"--eos-id {eos_id} is not a token id of {loaded.name}; give one in 0..{loaded.model.vocab_size - 1}")
    if rows.new_tokens is None and eos_id is None:
        return None
    return RowStops(tuple(rows.new_tokens) if rows.new_tokens else None, eos_id)


@app.command("kv-evaluate")
@fail_cleanly
def kv_evaluate(
    ctx: typer.Context,
    config: ConfigOpt = DEFAULT_CONFIG,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate per strategy.")] = 1000,
    strategies: Annotated[str | None, typer.Option(
        metavar="NAME,...", help=f"Comma-separated, from: {', '.join(strategy_names('decoder'))}; an encoder-decoder "
                                 f"takes {', '.join(strategy_names('encoder-decoder'))}. {PLUGIN_HELP}",
        show_default=f"static,dynamic; {default_strategies('check')}")] = None,
    batch_size: BatchOpt = 1,
    prompt_len: PromptLenOpt = 16,
    src_len: SrcLenOpt = 16,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random prompt and of sampling.")] = 0,
    engine: EngineOpt = "kvbench",
    compile: CompileOpt = False,
    window: WindowOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    prompt_lens: PromptLensOpt = None,
    new_tokens_per_row: PerRowOpt = None,
    eos_id: Annotated[int | None, typer.Option(
        metavar="ID", help="A row stops after it emits this token id (rows then stop at different steps).")] = None,
    rollback: Annotated[int | None, typer.Option(
        metavar="K", help="Every 5 steps, write K random draft tokens into the cache and roll them back (crop), "
                          "as speculative decoding does with rejected drafts; the result must still be naive's.")] = None,
    prefill_chunk: Annotated[int | None, typer.Option(
        help="Prefill every prompt this many tokens per forward (chunked prefill, as servers do for long "
             "prompts); default: the whole prompt at once.")] = None,
) -> None:
    """Prove that generation with a KV cache gives naive recomputation's logits and tokens."""
    loaded = load_config(config, engine)
    names = strategies_for(loaded, strategies, "static,dynamic", compile,
                           family_default=family_of(loaded.model).check_strategies)
    rows = rows_asked(ctx, loaded, prompt_lens, new_tokens_per_row)
    lengths = rows.prompt_lens
    batch_size = rows.batch or batch_size
    prompt_len = max(lengths) if lengths else prompt_len
    new_tokens = max(rows.new_tokens) if rows.new_tokens else new_tokens
    stops = row_stops(loaded, rows, eos_id)
    for option, value in (("--new-tokens", new_tokens), ("--batch-size", batch_size), ("--prompt-len", prompt_len),
                          ("--src-len", src_len), ("--prefill-chunk", 1 if prefill_chunk is None else prefill_chunk),
                          ("--rollback", 1 if rollback is None else rollback)):
        require_positive(option, value)
    drafts = Rollback(rollback) if rollback else None
    if drafts is not None and drafts.tokens > drafts.most_tokens(new_tokens):
        raise KVBenchError(f"--rollback {rollback}: no draft that long fits --new-tokens {new_tokens} (drafts go in "
                           f"every {drafts.every} steps and end before the last token: at most "
                           f"{max(drafts.most_tokens(new_tokens), 0)} here); give --new-tokens "
                           f"{rollback + drafts.every} or more")
    check_length(loaded, prompt_len + new_tokens - 1, names, "--prompt-len + --new-tokens - 1")
    family = family_of(loaded.model)
    if family.reads_source:
        check_fits(loaded, src_len, "--src-len")
    sampling = SamplingSettings(temperature, top_k, top_p, seed)
    win = resolve_window(loaded, window, names)
    dev, torch_dtype, tol = resolve_device(device), resolve_dtype(dtype), tolerance(dtype, atol, rtol)
    check_memory(loaded, dev, torch_dtype, names, batch_size, cache_tokens(prompt_len, new_tokens), win,
                 "--new-tokens, --prompt-len")
    model = for_generation(build_model(loaded, dev, torch_dtype), batch_size, src_len, seed)
    prompt = verify.random_prompt(loaded.model, batch_size, prompt_len, seed).to(dev)
    if lengths:  # each row its own prompt, drawn as a batch's rows are
        prompt = [verify.random_prompt(loaded.model, 1, n, seed + row)[0].to(dev) for row, n in enumerate(lengths)]
        prompt_len = "/".join(map(str, lengths))
    source = f", source {src_len}" if family.reads_source else ""
    chunked = f", prefill in chunks of {prefill_chunk}" if prefill_chunk else ""
    chunked += f", {rollback} draft tokens rolled back every {drafts.every} steps" if drafts else ""
    chunked += verify.stops_text(stops)
    console.print(f"{escape(loaded.name)}: batch {batch_size}{source}, prompt {prompt_len}{chunked}, {new_tokens} new "
                  f"tokens on {dev} ({dtype}), {sampling.describe()}")
    if family.explain:
        for name in names:
            console.print(f"  {name}: {family.explain(name)}", highlight=False)
    if any(registry.get(name).compiled for name in names):  # otherwise a silent pause at its first step
        err_console.print(f"{COMPILED.name}: its first steps compile the decode step (torch.compile; tens of "
                          "seconds on a CPU)", highlight=False)
    with progress_bar() as progress:
        tasks = {s: progress.add_task(f"{s:>8}", total=None) for s in names}
        checks = verify.kv_evaluate(model, prompt, new_tokens, names, tol, sampling, win,
                                    on_step=lambda s, total: progress.update(tasks[s], total=total, advance=1),
                                    prefill_chunk=prefill_chunk, rollback=drafts,
                                    stops=stops)
    report_checks(checks, tol, win)
    if not all(c.passed for c in checks):
        err_console.print("[bold red]kv-evaluate failed:[/] a strategy does not match naive recomputation",
                          highlight=False)
        raise typer.Exit(1)
