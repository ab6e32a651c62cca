"""The Typer app: commands parse options and delegate. The only place that prints or decides exit codes."""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Annotated, Callable

import torch
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvbench import textgen, verify
from kvbench.bench.machine import command_line as command_line_text
from kvbench.cache import COMPILED, DEFAULT_WINDOW, SEQ2SEQ_STRATEGIES, STRATEGIES, window_of
from kvbench.config import LoadedConfig, Seq2SeqConfig, load_config
from kvbench.errors import KVBenchError
from kvbench.generate import for_generation, new_cache
from kvbench.model import init_weights
from kvbench.precision import DEFAULT_TOLERANCE, DTYPES
from kvbench.sampling import SamplingSettings
from kvbench.tokenizer import parse_ids, tokenizer_for
from kvbench.weights import build_model, decode_kernel, load_cpu_model, new_model, save_weights

app = typer.Typer(help="Prove a transformer's KV cache exact and measure what it buys.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console(soft_wrap=True)  # long lines stay whole, for copying and grepping
err_console = Console(stderr=True, soft_wrap=True)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = Path("configs/default.yaml")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config, or a GPT-2 checkpoint directory.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random prompt.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
PromptLenOpt = Annotated[int, typer.Option(help="Prompt length in tokens (random ids).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
SrcLenOpt = Annotated[int, typer.Option(help="Source length in tokens (encoder-decoder configs only).")]
DEFAULT_SEQ2SEQ_STRATEGIES = "naive,static,static+self-only,dynamic,dynamic+self-only"
DEFAULT_SEQ2SEQ_BENCH = "naive,static+self-only,static"  # the three ways: nothing, self-attention, both cached
WindowOpt = Annotated[int | None, typer.Option(
    help=f"Sliding window W [default: the config's sliding_window, else {DEFAULT_WINDOW}].")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy; otherwise sample at this temperature.")]
TopKOpt = Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.")]
TopPOpt = Annotated[float | None, typer.Option(help="Sample among the most likely tokens holding probability p.")]
PromptOpt = Annotated[str | None, typer.Option(help="Prompt text (needs a tokenizer: bytes or tokenizer.json).")]
PromptIdsOpt = Annotated[str | None, typer.Option(help="Prompt as comma-separated token ids.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help=f"Add {COMPILED}: the static cache with its decode step "
                                          "compiled (torch.compile; a CUDA graph on CUDA).")]
AtolOpt = Annotated[float | None, typer.Option(help="Absolute tolerance on logits [default: by dtype].")]
RtolOpt = Annotated[float | None, typer.Option(help="Relative tolerance on logits [default: by dtype].")]


def fail_cleanly(command: Callable) -> Callable:
    """Turn KVBenchError into one line on stderr plus its exit code; Ctrl-C into a short message; running out
    of memory into advice (it depends on the sizes asked for, which the user can change)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KVBenchError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except torch.OutOfMemoryError:
            err_console.print("[bold red]error:[/] out of device memory; lower --batch-size, the lengths or "
                              "--new-tokens, or use a smaller config", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def resolve_config(path: Path) -> LoadedConfig:
    if path == DEFAULT_CONFIG and not path.exists():
        path = REPO_CONFIGS / "default.yaml"  # running outside the checkout root
    return load_config(path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda} but no GPU visible"
            raise KVBenchError(f"--device {name}: CUDA is not available (torch {torch.__version__} {build}); "
                               "use --device cpu")
        index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise KVBenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    raise KVBenchError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N")


def parse_strategies(text: str, allowed: tuple[str, ...] = STRATEGIES) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise KVBenchError(f"--strategies is empty; choose from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise KVBenchError(f"--strategies: unknown strategy {name!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise KVBenchError(f"--dtype {name!r} is not supported; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def tolerance(dtype: str, atol: float | None, rtol: float | None) -> verify.Tolerance:
    default_atol, default_rtol = DEFAULT_TOLERANCE[dtype]
    tol = verify.Tolerance(default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    if tol.atol < 0 or tol.rtol < 0:
        raise KVBenchError(f"tolerances must be 0 or more (got --atol {tol.atol:g}, --rtol {tol.rtol:g})")
    return tol


def with_compiled(strategies: list[str], compile: bool) -> list[str]:
    return strategies + [COMPILED] if compile and COMPILED not in strategies else strategies


def is_seq2seq(loaded: LoadedConfig) -> bool:
    return isinstance(loaded.model, Seq2SeqConfig)


def strategies_for(loaded: LoadedConfig, text: str | None, default: str, compile: bool,
                   seq2seq_default: str = DEFAULT_SEQ2SEQ_STRATEGIES) -> list[str]:
    """The strategies asked for (or the family's default), checked against what the config's family supports."""
    if not is_seq2seq(loaded):
        return with_compiled(parse_strategies(text or default), compile)
    if compile:
        raise KVBenchError(f"--compile supports decoder-only configs; {loaded.source} is an encoder-decoder")
    return parse_strategies(text or seq2seq_default, SEQ2SEQ_STRATEGIES)


def require_positive(option: str, value: int) -> None:
    if value <= 0:
        raise KVBenchError(f"{option} must be a positive integer (got {value})")


def check_fits(loaded: LoadedConfig, total: int, what: str) -> None:
    limit = loaded.model.max_seq_len
    if total > limit:
        raise KVBenchError(f"{what} = {total} tokens do not fit max_seq_len {limit} of {loaded.source}; "
                           "shorten them or raise max_seq_len")


def check_length(loaded: LoadedConfig, total: int, strategies: list[str], what: str) -> None:
    """Every strategy stops at max_seq_len, except sliding with sinusoidal positions: its attention span
    is bounded and sinusoidal encodings exist for any position, so it may run past (learned ones may not)."""
    sinusoidal = loaded.model.positional == "sinusoidal"
    bounded = [s for s in strategies if not (sinusoidal and s.startswith("sliding"))]
    if bounded:
        note = f" (for {', '.join(bounded)})" if len(bounded) < len(strategies) else ""
        check_fits(loaded, total, what + note)


def resolve_window(loaded: LoadedConfig, window: int | None) -> int:
    if window is not None:
        require_positive("--window", window)
    return window_of(loaded.model, window)


# --- evaluate ---------------------------------------------------------------------------------------------------

def comparison_table(comparisons: list[verify.Comparison], tol: verify.Tolerance) -> Table:
    table = Table(title=f"logits compared (atol {tol.atol:g}, rtol {tol.rtol:g})")
    for column in ("comparison", "max abs", "max rel", "argmax agree", "err/tol", "result"):
        table.add_column(column, justify="left" if column == "comparison" else "right")
    for c in comparisons:
        verdict = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name, f"{c.max_abs:.3e}", f"{c.max_rel:.3e}", f"{c.argmax_agreement:.1%}",
                      f"{c.worst_ratio:.3f}", verdict)
    return table


@app.command()
@fail_cleanly
def evaluate(
    config: ConfigOpt = DEFAULT_CONFIG,
    expected: Annotated[Path | None, typer.Option(help="Expected-logits .safetensors (input_ids, logits).")] = None,
    write_expected: Annotated[Path | None, typer.Option(help="Write the NumPy reference's logits here.")] = None,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    batch_size: BatchOpt = 1,
    prompt_len: PromptLenOpt = 16,
    src_len: SrcLenOpt = 16,
    seed: SeedOpt = 0,
) -> None:
    """Check the model's logits after a prompt against the NumPy float64 reference and expected values."""
    loaded = resolve_config(config)
    for option, value in (("--batch-size", batch_size), ("--prompt-len", prompt_len), ("--src-len", src_len)):
        require_positive(option, value)
    dev, torch_dtype, tol = resolve_device(device), resolve_dtype(dtype), tolerance(dtype, atol, rtol)
    expected_logits = None
    if expected is not None:
        inputs, expected_logits = verify.read_expected(expected, loaded.model)
    else:
        check_fits(loaded, max(prompt_len, src_len if is_seq2seq(loaded) else 0), "--prompt-len / --src-len")
        inputs = verify.random_inputs(loaded.model, batch_size, prompt_len, src_len, seed)
    cpu_model = load_cpu_model(loaded)
    cpu_weights = {name: t.clone() for name, t in cpu_model.state_dict().items()}  # the reference's own copy
    model = cpu_model.to(dev, torch_dtype).use_kernel(decode_kernel(dev, torch_dtype))
    result, reference = verify.evaluate(model, cpu_weights, inputs, tol, expected_logits)
    source = f", source {tuple(inputs.src_ids.shape)}" if inputs.src_ids is not None else ""
    console.print(f"{loaded.name}: prompt {tuple(inputs.input_ids.shape)}{source} on {dev} ({dtype})")
    console.print(comparison_table(result.comparisons, tol))
    if write_expected is not None:
        verify.write_expected(write_expected, inputs, reference)
        console.print(f"wrote expected logits of the NumPy reference to {write_expected}")
    if not result.passed:
        err_console.print("[bold red]evaluate failed:[/] logits outside tolerance", highlight=False)
        raise typer.Exit(1)


# --- kv-evaluate ------------------------------------------------------------------------------------------------

def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True)


def divergence_text(check: verify.StrategyCheck) -> str:
    d = check.divergence
    if d is None:
        return "no token differs from naive's choice"
    kind = "near-tie" if d.near_tie else "MISMATCH" if check.exact else "differs (not exact by design)"
    return (f"{kind} at step {d.step} (row {d.row}): chose {d.chosen}, naive would choose {d.naive_choice}, "
            f"naive gap {d.gap:.2e}")


def strategy_table(checks: list[verify.StrategyCheck], tol: verify.Tolerance) -> Table:
    table = Table(title=f"each strategy vs naive recomputation (atol {tol.atol:g}, rtol {tol.rtol:g}); "
                        "Δ = logit difference", box=box.SIMPLE_HEAD)
    for column in ("strategy", "max |Δ|", "Δ/tol", "mean KL", "top-1", "tokens", "result"):
        table.add_column(column, justify="left" if column == "strategy" else "right", no_wrap=True)
    for c in checks:
        verdict = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        d = c.divergence
        tokens = "same" if d is None else f"{'tie' if d.near_tie else 'DIFF'} @{d.step}"
        table.add_row(c.strategy, f"{c.max_abs:.2e}", f"{c.worst_ratio:.3f}",
                      f"{c.vs_naive.mean_kl:.1e}", f"{c.vs_naive.top1:.1%}", tokens, verdict)
    return table


def report_checks(checks: list[verify.StrategyCheck], tol: verify.Tolerance, window: int) -> None:
    console.print(strategy_table(checks, tol))
    for c in checks:
        rule = ("exact: every logit within tolerance, no real token mismatch" if c.exact else
                f"int8, not exact: mean KL <= {c.max_mean_kl:g} and top-1 >= {c.min_top1:.0%} required")
        console.print(f"  {c.strategy}: {rule}; {divergence_text(c)}", highlight=False)
        if c.drift is not None:
            console.print(f"  {c.strategy} (window {window}) against full attention, for information: max abs "
                          f"{c.drift.max_abs:.2e}, mean KL {c.drift.mean_kl:.1e}, top-1 {c.drift.top1:.1%}",
                          highlight=False)


@app.command("kv-evaluate")
@fail_cleanly
def kv_evaluate(
    config: ConfigOpt = DEFAULT_CONFIG,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate per strategy.")] = 1000,
    strategies: Annotated[str | None, typer.Option(
        help=f"Comma-separated, from: {', '.join(STRATEGIES)} [default: static,dynamic; for an encoder-decoder "
             f"{DEFAULT_SEQ2SEQ_STRATEGIES}]; an encoder-decoder takes {', '.join(SEQ2SEQ_STRATEGIES)}.")] = None,
    batch_size: BatchOpt = 1,
    prompt_len: PromptLenOpt = 16,
    src_len: SrcLenOpt = 16,
    atol: AtolOpt = None,
    rtol: RtolOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the random prompt and of sampling.")] = 0,
    compile: CompileOpt = False,
    window: WindowOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
) -> None:
    """Prove that generation with a KV cache gives naive recomputation's logits and tokens."""
    loaded = resolve_config(config)
    names = strategies_for(loaded, strategies, "static,dynamic", compile)
    for option, value in (("--new-tokens", new_tokens), ("--batch-size", batch_size), ("--prompt-len", prompt_len),
                          ("--src-len", src_len)):
        require_positive(option, value)
    check_length(loaded, prompt_len + new_tokens, names, "--prompt-len + --new-tokens")
    if is_seq2seq(loaded):
        check_fits(loaded, src_len, "--src-len")
    sampling = SamplingSettings(temperature, top_k, top_p, seed)
    win = resolve_window(loaded, window)
    dev, torch_dtype, tol = resolve_device(device), resolve_dtype(dtype), tolerance(dtype, atol, rtol)
    model = for_generation(build_model(loaded, dev, torch_dtype), batch_size, src_len, seed)
    prompt = verify.random_prompt(loaded.model, batch_size, prompt_len, seed).to(dev)
    console.print(f"{loaded.name}: batch {batch_size}, prompt {prompt_len}, {new_tokens} new tokens on {dev} "
                  f"({dtype}), {sampling.describe()}")
    with progress_bar() as progress:
        tasks = {s: progress.add_task(f"{s:>8}", total=new_tokens) for s in names}
        checks = verify.kv_evaluate(model, prompt, new_tokens, names, tol, sampling, win,
                                    on_step=lambda s, step: progress.advance(tasks[s]))
    report_checks(checks, tol, win)
    if not all(c.passed for c in checks):
        err_console.print("[bold red]kv-evaluate failed:[/] a strategy does not match naive recomputation",
                          highlight=False)
        raise typer.Exit(1)


# --- generate ---------------------------------------------------------------------------------------------------

def prompt_tokens(tokenizer, text: str | None, ids: str | None, vocab: int, source: Path) -> list[int]:
    if ids is not None:
        return parse_ids(ids, vocab)
    if tokenizer is None:
        raise KVBenchError(f"{source} has no tokenizer (vocabulary of {vocab}, no tokenizer.json): give the prompt "
                           "as token ids with --prompt-ids 1,2,3")
    tokens = tokenizer.encode(text)
    if not tokens:
        raise KVBenchError("--prompt is empty; give some text")
    return tokens


def stream_one(stream: textgen.TextStream, token_times: bool) -> None:
    """Print tokens as they come (or one line per token with its time), then the summary."""
    for event in stream:
        if token_times:
            console.print(f"{event.index:5d} {1000 * event.seconds:8.2f} ms  {event.text!r}", highlight=False)
        else:
            console.out(event.text, end="", highlight=False)
            console.file.flush()
    console.print("" if token_times else "\n", end="")
    err_console.print(f"[dim]{stream.summary.describe()}[/]", highlight=False)


@app.command("generate")
@fail_cleanly
def generate_command(
    config: ConfigOpt = DEFAULT_CONFIG,
    prompt: PromptOpt = None,
    prompt_ids: PromptIdsOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    strategy: Annotated[str, typer.Option(help=f"One of {', '.join(STRATEGIES)}.")] = "static",
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling.")] = 0,
    window: WindowOpt = None,
    interactive: Annotated[bool, typer.Option("--interactive", help="Prompt after prompt; an empty line or "
                                              "Ctrl-D ends. The cache is reset between prompts.")] = False,
    token_times: Annotated[bool, typer.Option("--token-times", help="One line per token with its time.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Stream generated text with each token's time, then a summary (tokens/s, prefill, decode, cache size)."""
    loaded = resolve_config(config)
    if is_seq2seq(loaded):
        raise KVBenchError(f"generate supports decoder-only configs; {loaded.source} is an encoder-decoder")
    [name] = strategies_for(loaded, strategy, strategy, compile=False)
    require_positive("--max-new-tokens", max_new_tokens)
    if not interactive and prompt is None and prompt_ids is None:
        raise KVBenchError("give --prompt TEXT or --prompt-ids 1,2,3 (or --interactive)")
    sampling = SamplingSettings(temperature, top_k, top_p, seed)
    win = resolve_window(loaded, window)
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    model = build_model(loaded, dev, torch_dtype)
    tokenizer = tokenizer_for(loaded)
    room = loaded.model.max_seq_len  # a static cache for the longest sequence, reused for every prompt
    cache = new_cache(model, name, 1, room, win)
    err_console.print(f"[dim]{loaded.name} on {dev} ({dtype}), {name} cache, {sampling.describe()}, "
                      f"tokenizer: {tokenizer.name if tokenizer else 'none (ids)'}[/]", highlight=False)

    def run(text: str | None, ids: str | None) -> None:
        tokens = prompt_tokens(tokenizer, text, ids, loaded.model.vocab_size, loaded.source)
        check_length(loaded, len(tokens) + max_new_tokens - 1, [name], "prompt + --max-new-tokens - 1")
        stream_one(textgen.TextStream(model, tokens, max_new_tokens, name, cache, sampling, tokenizer, win),
                   token_times)

    if not interactive:
        run(prompt, prompt_ids)
        return
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            break
        if not line.strip():
            break
        try:
            run(line if tokenizer else None, None if tokenizer else line)
        except KVBenchError as exc:  # a prompt too long or malformed: say so and ask again
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)


# --- visualize --------------------------------------------------------------------------------------------------

@app.command("visualize")
@fail_cleanly
def visualize_command(
    out: Annotated[Path, typer.Option(help="Directory for attention.png and cache_growth.png.")],
    config: ConfigOpt = DEFAULT_CONFIG,
    prompt: PromptOpt = None,
    prompt_ids: PromptIdsOpt = None,
    strategies: Annotated[str, typer.Option(help="Caches whose growth to plot.")] = "static,dynamic,sliding,quantized",
    new_tokens: Annotated[int, typer.Option(help="Decode steps to follow the caches over.")] = 200,
    window: WindowOpt = None,
) -> None:
    """Attention heatmaps of every layer and head for a prompt, and each cache's size over decode steps."""
    from kvbench import visualize as vis

    loaded = resolve_config(config)
    if is_seq2seq(loaded):
        raise KVBenchError(f"visualize supports decoder-only configs; {loaded.source} is an encoder-decoder")
    if prompt is None and prompt_ids is None:
        raise KVBenchError("give --prompt TEXT or --prompt-ids 1,2,3")
    names = parse_strategies(strategies)
    require_positive("--new-tokens", new_tokens)
    model = build_model(loaded, "cpu")
    tokenizer = tokenizer_for(loaded)
    tokens = prompt_tokens(tokenizer, prompt, prompt_ids, loaded.model.vocab_size, loaded.source)
    check_length(loaded, len(tokens) + new_tokens - 1, names, "prompt + --new-tokens - 1")
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([tokens])  # (1, T)
    labels = [tokenizer.label(t) if tokenizer else str(t) for t in tokens]
    maps = vis.attention_maps(model, ids)
    written = [vis.attention_figure(maps, labels, out / "attention.png",
                                    f"{loaded.name}: attention of every layer and head over the prompt")]
    win = resolve_window(loaded, window)
    growth = vis.cache_growth(model, ids, new_tokens, names, win)
    growth.to_csv(out / "cache_growth.csv", index=False)
    written.append(vis.cache_growth_figure(growth, out / "cache_growth.png",
                                           f"{loaded.name}: KV cache over {new_tokens} decode steps (window {win})"))
    console.print(f"wrote {', '.join(str(p) for p in written)}")


# --- train ------------------------------------------------------------------------------------------------------

@app.command("train")
@fail_cleanly
def train_command(
    config: ConfigOpt = DEFAULT_CONFIG,
    corpus: Annotated[list[Path] | None, typer.Option(help="Text file, or directory of *.py files; repeatable "
                                                       "[default: Python's standard library].")] = None,
    max_bytes: Annotated[int, typer.Option(help="Read at most this many bytes of corpus.")] = 4_000_000,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Bytes per training sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of batches (initial weights come from the config's seed).")] = 0,
    save_every: Annotated[int, typer.Option(help="Save the weights every N steps too.")] = 250,
    out: Annotated[Path | None, typer.Option(help="Weights file to write [default: the config's weights].")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing weights file.")] = False,
) -> None:
    """Train a byte-level model (vocab 256) on text, from its config's random initialisation."""
    from kvbench import train as training

    loaded = resolve_config(config)
    target = out or loaded.weights_path
    if target is None:
        raise KVBenchError(f"{loaded.source} names no weights file: give --out FILE")
    if target.exists() and not force:
        raise KVBenchError(f"{target} exists; pass --force to overwrite it")
    for option, value in (("--steps", steps), ("--batch-size", batch_size), ("--seq-len", seq_len),
                          ("--max-bytes", max_bytes), ("--save-every", save_every)):
        require_positive(option, value)
    if is_seq2seq(loaded):
        raise KVBenchError("train makes decoder-only byte-level models; this config is an encoder-decoder")
    sources = corpus or [training.stdlib_dir()]
    text = training.read_corpus(sources, max_bytes)
    settings = training.TrainSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed)
    model = new_model(loaded.model)
    init_weights(model, loaded.model.seed)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"training {loaded.name} ({n_params:,} parameters) on {len(text):,} bytes from "
                  f"{', '.join(map(str, sources))}, {steps} steps of {batch_size} x {seq_len} bytes")
    meta = {"trained_by": "kvbench train", "command": command_line_text(), "corpus": ", ".join(map(str, sources)),
            "corpus_bytes": str(len(text)), "steps": str(steps)}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True)

    def on_step(step: int, loss: float, rate: float) -> None:
        progress.update(task, completed=step + 1, description=f"loss {loss:.3f} nats/byte, lr {rate:.1e}")
        if (step + 1) % save_every == 0:
            save_weights(model, target, {**meta, "steps_done": str(step + 1)})

    try:
        with progress:
            task = progress.add_task("starting", total=steps)
            log = training.train(model, text, settings, on_step)
    except KeyboardInterrupt:
        save_weights(model, target, {**meta, "interrupted": "true"})
        err_console.print(f"interrupted: the weights trained so far are saved in {target}", highlight=False)
        raise typer.Exit(130) from None
    save_weights(model, target, {**meta, "val_loss": f"{log.val_after:.4f}"})
    console.print(f"held-out loss {log.val_before:.3f} -> {log.val_after:.3f} nats/byte; "
                  f"last training loss {log.losses[-1]:.3f}; weights in {target}")


@app.command("init-weights")
@fail_cleanly
def init_weights_command(
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    config: ConfigOpt = DEFAULT_CONFIG,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the config's).")] = None,
    every_tensor: Annotated[bool, typer.Option(help="Randomise LayerNorm gains and biases too.")] = True,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write seeded random weights for a config (a reference model for evaluate, or a starting point)."""
    loaded = resolve_config(config)
    if out.exists() and not force:
        raise KVBenchError(f"{out} exists; pass --force to overwrite it")
    model = new_model(loaded.model)
    init_weights(model, loaded.model.seed if seed is None else seed, every_tensor=every_tensor)
    save_weights(model, out)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"wrote {n_params:,} parameters for {loaded.name} to {out}")


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
        self.progress.console.print(f"{COMPILED}: decode step compiled in {duration(seconds)} (not in any timing)")

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
        speedup = math.nan if row.strategy == "naive" else row.speedup_vs_naive
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
    console.print(f"results in {results_path}" + (f" ({', '.join(p.name for p in plots)})" if plots else ""))


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
    settings = SweepSettings(
        lengths=parse_lengths(lengths or DEFAULT_LENGTHS),
        strategies=strategies_for(loaded, strategies, DEFAULT_BENCH_STRATEGIES, compile, DEFAULT_SEQ2SEQ_BENCH),
        repeats=3 if repeats is None else repeats, warmup=1 if warmup is None else warmup,
        prompt_len=prompt_len or 16, batch_size=batch_size or 1, device=str(resolve_device(device)),
        dtype=dtype or "float32", threads=threads, seed=seed or 0, window=resolve_window(loaded, window),
        src_len=(src_len or 16) if is_seq2seq(loaded) else None)
    resolve_dtype(settings.dtype)
    check_length(loaded, settings.prompt_len + max(settings.lengths) - 1, settings.strategies,
                 "--prompt-len + longest --lengths - 1")
    if settings.src_len:
        check_fits(loaded, settings.src_len, "--src-len")
    return settings


@app.command()
@fail_cleanly
def benchmark(
    config: ConfigOpt = DEFAULT_CONFIG,
    device: DeviceOpt = "auto",
    lengths: Annotated[str | None, typer.Option(help=f"New tokens per point [default: {DEFAULT_LENGTHS}].")] = None,
    strategies: Annotated[str | None, typer.Option(
        help=f"Comma-separated, from: {', '.join(STRATEGIES)} [default: {DEFAULT_BENCH_STRATEGIES}].")] = None,
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
        console.print(f"resuming {resume}: {len(run.results.completed())} runs already recorded")
    else:
        loaded = resolve_config(config)
        settings = new_settings(loaded, device, lengths, strategies, repeats, warmup, prompt_len, batch_size,
                                threads, dtype, seed, compile, window, src_len)
        run = bench.start(loaded, settings, out, Path("results"))
        console.print(f"{loaded.name} on {settings.device} ({settings.dtype}), writing to {run.results.path}")
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
                          f"{run.results.runs_csv}; continue with: kvbench benchmark --resume {run.results.path}",
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
        console.print(f"{label}: {meta.get('config_name')} on {meta.get('device_name')} ({s.get('dtype')}, batch "
                      f"{s.get('batch_size')}, commit {str(meta.get('git_commit'))[:10]})", highlight=False)
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
    names = parse_strategies(variants, tuple(ablation.VARIANTS))
    for option, value in (("--new-tokens", new_tokens), ("--repeats", repeats), ("--prompt-len", prompt_len),
                          ("--batch-size", batch_size)):
        require_positive(option, value)
    if new_tokens < 2:
        raise KVBenchError("--new-tokens must be at least 2: per-token time is (t(N) - t(1)) / (N - 1)")
    check_fits(loaded, prompt_len + new_tokens, "--prompt-len + --new-tokens")
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    model = build_model(loaded, dev, torch_dtype)
    prompt = verify.random_prompt(loaded.model, batch_size, prompt_len, seed).to(dev)
    limits = floor.measure_limits(dev, floor.weight_bytes_per_step(model, batch_size), torch_dtype)
    console.print(f"{loaded.name} on {dev} ({dtype}), {torch.get_num_threads()} threads; read bandwidth "
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


def main() -> None:
    app(prog_name="kvbench")


if __name__ == "__main__":
    sys.exit(main())
