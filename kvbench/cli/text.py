"""generate, visualize, train and init-weights: the cache at work on text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kvbench import textgen
from kvbench.bench.machine import command_line as command_line_text
from kvbench.strategies import names as strategy_names
from kvbench.cli.common import (
    PLUGIN_HELP,
    DEFAULT_CONFIG,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    PromptIdsOpt,
    PromptOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    WindowOpt,
    app,
    check_length,
    check_memory,
    console,
    err_console,
    fail_cleanly,
    output_dir,
    output_file,
    parse_strategies,
    require_positive,
    resolve_device,
    resolve_dtype,
    resolve_window,
    strategies_for,
)
from kvbench.config import check_seed, load_config
from kvbench.families import reads_source
from kvbench.errors import KVBenchError
from kvbench.generate import new_cache
from kvbench.model import init_weights
from kvbench.bench.plots import save
from kvbench.sampling import SamplingSettings
from kvbench.tokenizer import parse_ids, tokenizer_for
from kvbench.weights import build_model, new_model, save_weights

# --- generate ---------------------------------------------------------------------------------------------------

def prompt_tokens(tokenizer, text: str | None, ids: str | None, vocab: int, source: Path) -> list[int]:
    if ids is not None and text is not None:
        raise KVBenchError("give --prompt or --prompt-ids, not both")
    if ids is not None:
        return parse_ids(ids, vocab)
    if tokenizer is None:
        raise KVBenchError(f"{source} has no tokenizer (vocabulary of {vocab}, no tokenizer.json): give the prompt "
                           "as token ids with --prompt-ids 1,2,3")
    tokens = tokenizer.encode(text)
    if not tokens:
        raise KVBenchError("--prompt is empty; give some text")
    return tokens


def stream_one(stream: textgen.TextStream, token_times: bool, echo: str | None) -> None:
    """Print the prompt (unless the user just typed it), then tokens as they come (or one line per token with
    its time), then the summary. Ctrl-C stops the answer with what was generated so far summarised."""
    if echo is not None:
        console.out(f"prompt: {echo!r}" if token_times else echo, end="\n" if token_times else "", highlight=False)
    try:
        for event in stream:
            if token_times:
                console.print(f"{event.index:5d} {1000 * event.seconds:8.2f} ms  {escape(repr(event.text))}",
                              highlight=False)
            else:
                console.out(event.text, end="", highlight=False)
                console.file.flush()
    finally:  # also when interrupted: end the line and say what was generated
        console.print("" if token_times else "\n", end="")
        err_console.print(f"[dim]{escape(stream.summary.describe())}[/]", highlight=False)


def show_rows(prompts: list[list[int]], result: textgen.RowsResult, tokenizer) -> None:
    """Each row's prompt and continuation (as text with a tokenizer, else ids), then the batch's summary."""
    for row, (prompt, new) in enumerate(zip(prompts, result.new_tokens)):
        console.print(f"row {row} ({len(prompt)} prompt tokens): {prompt_text(tokenizer, None, prompt)}"
                      f"-> {prompt_text(tokenizer, None, new)}", highlight=False, markup=False)
    if result.stopped:
        err_console.print("stopped (Ctrl-C): the rows as far as they got", highlight=False)
    err_console.print(f"[dim]{escape(result.summary.describe())}[/]", highlight=False)


def prompt_text(tokenizer, text: str | None, ids: list[int]) -> str:
    """The prompt as the answer continues it: text through the tokenizer, ids as the ids are printed."""
    return tokenizer.decode(ids) if tokenizer else "".join(f"{token} " for token in ids)


def enable_line_editing() -> bool:
    """input() edits lines (arrows, history) once readline is imported; not every platform has it."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


def interact(run) -> None:
    """Prompt after prompt until an empty line or end of input. Ctrl-C stops the answer being generated, not
    the session; Ctrl-C at the prompt ends the session (as interrupted)."""
    enable_line_editing()
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            return
        if not line.strip():
            return
        try:
            run(line)
        except KVBenchError as exc:  # a prompt too long or malformed: say so and ask again
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        except KeyboardInterrupt:
            err_console.print("stopped; next prompt (an empty line or Ctrl-D ends)", highlight=False)


@app.command("generate")
@fail_cleanly
def generate_command(
    config: ConfigOpt = DEFAULT_CONFIG,
    prompt: PromptOpt = None,
    prompt_ids: PromptIdsOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    strategy: Annotated[str, typer.Option(metavar="NAME", help=f"One of {', '.join(strategy_names('decoder'))}. {PLUGIN_HELP}")] = \
        "static",
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling.")] = 0,
    window: WindowOpt = None,
    interactive: Annotated[bool, typer.Option("--interactive", help="Prompt after prompt, with line editing; an "
                                              "empty line or Ctrl-D ends, Ctrl-C stops the answer being written. "
                                              "The cache is reset between prompts.")] = False,
    token_times: Annotated[bool, typer.Option("--token-times", help="One line per token with its time.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Stream generated text with each token's time, then a summary (tokens/s, prefill, decode, cache size)."""
    loaded = load_config(config)
    if reads_source(loaded.model):
        raise KVBenchError(f"generate supports decoder-only configs; {loaded.source} is an encoder-decoder")
    names = strategies_for(loaded, strategy, strategy, compile=False, option="--strategy")
    if len(names) != 1:
        raise KVBenchError(f"--strategy takes one strategy (got {strategy!r}); kv-evaluate compares several")
    [name] = names
    require_positive("--max-new-tokens", max_new_tokens)
    if not interactive and prompt is None and prompt_ids is None:
        raise KVBenchError("give --prompt TEXT or --prompt-ids 1,2,3 (or --interactive)")
    sampling = SamplingSettings(temperature, top_k, top_p, seed)
    win = resolve_window(loaded, window, names)
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    room = loaded.model.max_seq_len  # a static cache for the longest sequence, reused for every prompt
    check_memory(loaded, dev, torch_dtype, [name], 1, room, win, "max_seq_len (generate's cache covers it)")
    model = build_model(loaded, dev, torch_dtype)
    tokenizer = tokenizer_for(loaded)
    cache = new_cache(model, name, 1, room, win)
    err_console.print(f"[dim]{escape(loaded.name)} on {dev} ({dtype}), {name} cache, {sampling.describe()}, "
                      f"tokenizer: {tokenizer.name if tokenizer else 'none (ids)'}[/]", highlight=False)

    if prompt_ids is not None and ";" in prompt_ids:  # rows: one left-padded batch, printed when done
        if interactive:
            raise KVBenchError("--interactive takes one prompt at a time; give rows (1,2;3,4) without it")
        rows = [parse_ids(row, loaded.model.vocab_size) for row in prompt_ids.split(";")]
        check_length(loaded, max(map(len, rows)) + max_new_tokens - 1, [name], "longest row + --max-new-tokens - 1")
        batch_cache = new_cache(model, name, len(rows), room, win)
        show_rows(rows, textgen.generate_rows(model, rows, max_new_tokens, name, batch_cache, sampling),
                  tokenizer)
        return

    def run(text: str | None, ids: str | None, echo: bool = True) -> None:
        tokens = prompt_tokens(tokenizer, text, ids, loaded.model.vocab_size, loaded.source)
        check_length(loaded, len(tokens) + max_new_tokens - 1, [name], "prompt + --max-new-tokens - 1")
        stream_one(textgen.TextStream(model, tokens, max_new_tokens, name, cache, sampling, tokenizer),
                   token_times, prompt_text(tokenizer, text, tokens) if echo else None)

    if interactive:  # the typed prompt is on the screen already: not echoed
        interact(lambda line: run(line if tokenizer else None, None if tokenizer else line, echo=False))
    else:
        run(prompt, prompt_ids)


# --- visualize --------------------------------------------------------------------------------------------------

VISUALIZE_FILES = ("attention.png", "cache_growth.csv", "cache_growth.png")

@app.command("visualize")
@fail_cleanly
def visualize_command(
    out: Annotated[Path, typer.Option(help="Directory for attention.png and cache_growth.png (created).")],
    config: ConfigOpt = DEFAULT_CONFIG,
    prompt: PromptOpt = None,
    prompt_ids: PromptIdsOpt = None,
    strategies: Annotated[str, typer.Option(metavar="NAME,...", help=f"Caches whose growth to plot. {PLUGIN_HELP}")] = \
        "static,dynamic,sliding,quantized",
    new_tokens: Annotated[int, typer.Option(help="Decode steps to follow the caches over.")] = 200,
    window: WindowOpt = None,
    force: ForceOpt = False,
) -> None:
    """Attention heatmaps of every layer and head for a prompt, and each cache's size over decode steps."""
    from kvbench import visualize as vis

    loaded = load_config(config)
    if reads_source(loaded.model):
        raise KVBenchError(f"visualize supports decoder-only configs; {loaded.source} is an encoder-decoder")
    if prompt is None and prompt_ids is None:
        raise KVBenchError("give --prompt TEXT or --prompt-ids 1,2,3")
    names = parse_strategies(strategies)
    require_positive("--new-tokens", new_tokens)
    output_dir(out, "--out")  # before the model runs: a file there would only be found at the end
    for name in VISUALIZE_FILES:
        output_file(out / name, "--out", force)
    model = build_model(loaded, "cpu")
    tokenizer = tokenizer_for(loaded)
    tokens = prompt_tokens(tokenizer, prompt, prompt_ids, loaded.model.vocab_size, loaded.source)
    check_length(loaded, len(tokens) + new_tokens - 1, names, "prompt + --new-tokens - 1")
    ids = torch.tensor([tokens])  # (1, T)
    labels = [tokenizer.label(t) if tokenizer else str(t) for t in tokens]
    maps = vis.attention_maps(model, ids)
    written = [save(vis.attention_figure(maps, labels, f"{loaded.name}: attention of every layer and head over "
                                                       "the prompt"), out / "attention.png")]
    win = resolve_window(loaded, window, names)
    growth = vis.cache_growth(model, ids, new_tokens, names, win)
    growth.to_csv(out / "cache_growth.csv", index=False)
    written.append(save(vis.cache_growth_figure(growth, f"{loaded.name}: KV cache over {new_tokens} decode steps "
                                                        f"(window {win})"), out / "cache_growth.png"))
    console.print(f"wrote {escape(', '.join(str(p) for p in written))}")


# --- train ------------------------------------------------------------------------------------------------------

@app.command("train")
@fail_cleanly
def train_command(
    config: ConfigOpt = DEFAULT_CONFIG,
    corpus: Annotated[list[Path] | None, typer.Option(
        metavar="PATH", help="Text file, or directory of *.py files; repeatable.",
        show_default="Python's standard library")] = None,
    max_bytes: Annotated[int, typer.Option(help="Read at most this many bytes of corpus.")] = 4_000_000,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Bytes per training sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of batches (initial weights come from the config's seed).")] = 0,
    save_every: Annotated[int, typer.Option(help="Save the weights every N steps too.")] = 250,
    out: Annotated[Path | None, typer.Option(help="Weights file to write (parent directories are created).",
                                             show_default="the config's weights file")] = None,
    force: ForceOpt = False,
) -> None:
    """Train a byte-level model (vocab 256) on text, from its config's random initialisation."""
    from kvbench import train as training

    loaded = load_config(config)
    for option, value in (("--steps", steps), ("--batch-size", batch_size), ("--seq-len", seq_len),
                          ("--max-bytes", max_bytes), ("--save-every", save_every)):
        require_positive(option, value)
    # everything that can refuse, before the corpus is read and the first step taken
    if reads_source(loaded.model):
        raise KVBenchError("train makes decoder-only byte-level models; this config is an encoder-decoder")
    training.check_trainable(loaded.model, seq_len)
    target = out or loaded.weights_path
    if target is None:
        raise KVBenchError(f"{loaded.source} names no weights file: give --out FILE")
    output_file(target, "--out" if out else f"{loaded.source}'s weights file", force)
    settings = training.TrainSettings(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed)
    sources = corpus or [training.stdlib_dir()]
    text = training.read_corpus(sources, max_bytes)
    model = new_model(loaded.model)
    init_weights(model, loaded.model.seed)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"training {escape(loaded.name)} ({n_params:,} parameters) on {len(text):,} bytes from "
                  f"{escape(', '.join(map(str, sources)))}, {steps} steps of {batch_size} x {seq_len} bytes")
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
        try:
            save_weights(model, target, {**meta, "interrupted": "true"})
        except KVBenchError as exc:  # interrupted in the middle of a diverging update: keep the file as it was
            err_console.print(f"interrupted: the weights were not saved ({escape(str(exc))})", highlight=False)
            raise typer.Exit(130) from None
        err_console.print(f"interrupted: the weights trained so far are saved in {escape(str(target))}",
                          highlight=False)
        raise typer.Exit(130) from None
    save_weights(model, target, {**meta, "val_loss": f"{log.val_after:.4f}"})
    console.print(f"held-out loss {log.val_before:.3f} -> {log.val_after:.3f} nats/byte; "
                  f"last training loss {log.losses[-1]:.3f}; weights in {escape(str(target))}")


@app.command("init-weights")
@fail_cleanly
def init_weights_command(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The .safetensors file to write (parent directories are "
                                                           "created).")],
    config: ConfigOpt = DEFAULT_CONFIG,
    seed: Annotated[int | None, typer.Option(help="Seed of the random weights.", show_default="the config's seed")] = None,
    every_tensor: Annotated[bool, typer.Option(help="Randomise LayerNorm gains and biases too.")] = True,
    force: ForceOpt = False,
) -> None:
    """Write seeded random weights for a config (a reference model for evaluate, or a starting point)."""
    loaded = load_config(config)
    output_file(out, "OUT", force)
    if seed is not None:
        check_seed("--seed", seed)
    model = new_model(loaded.model)
    init_weights(model, loaded.model.seed if seed is None else seed, every_tensor=every_tensor)
    save_weights(model, out)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"wrote {n_params:,} parameters for {escape(loaded.name)} to {escape(str(out))}")
