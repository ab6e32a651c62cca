"""What every command shares: the Typer app, the consoles, option types, the one error path, input checks."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Annotated, Callable

import torch
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import kvbench
from kvbench import memory, plugins, verify
from kvbench import strategies as registry
from kvbench.config import LoadedConfig, shipped_names
from kvbench.families import family_of, reads_source
from kvbench.errors import KVBenchError, KVBenchWarning
from kvbench.precision import DEFAULT_TOLERANCE, DTYPES
from kvbench.strategies import COMPILED, DEFAULT_WINDOW, window_of



class Command(typer.core.TyperCommand):
    """A usage line as users read them, `kvbench plot RESULTS_DIR`, where typer writes `{results_dir}`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = (param.metavar or param.name).upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class App(typer.Typer):
    def command(self, *args, cls: type | None = None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


# Plain help (no rich markup mode): rich markup would swallow bracketed text such as "[default: ...]", and
# typer's rich panels label every flag <bool> although flags take no value.
app = App(help="Prove a transformer's KV cache exact and measure what it buys.", rich_markup_mode=None,
          no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
# Long lines stay whole, for copying and grepping. No emoji codes: user text such as `--device cuda:x:` must
# print as typed (and user text is passed through rich's escape() against markup like `[red]` in a path).
# Piped or logged (no terminal, no COLUMNS), rich would assume 80 columns and cut table cells to "…": a CI log
# or a file would lose the numbers, so tables get room for their natural width there.
UNCUT_WIDTH = 240


def _width(stream) -> int | None:
    return None if "COLUMNS" in os.environ or stream.isatty() else UNCUT_WIDTH


class CliConsole(Console):
    def on_broken_pipe(self) -> None:
        """The reader went away (`| head`, a closed pager): stop quietly with the status of a tool that SIGPIPE
        ended, not rich's 1, which kvbench uses for a failed verification."""
        # this console's stream (stdout, or stderr for err_console) to /dev/null: the last flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())
        raise SystemExit(128 + signal.SIGPIPE)


console = CliConsole(soft_wrap=True, emoji=False, width=_width(sys.stdout))
err_console = CliConsole(stderr=True, soft_wrap=True, emoji=False, width=_width(sys.stderr))

DEFAULT_CONFIG = "default"  # a shipped config's name: found wherever kvbench runs from

ConfigOpt = Annotated[str, typer.Option(
    "--config", "-c", metavar="NAME|PATH",
    help=f"A shipped config's name ({', '.join(shipped_names())}), a YAML file, or a checkpoint directory "
         "(GPT-2, Llama, Qwen2 or Mistral, as save_pretrained writes it).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random prompt.")]
EngineOpt = Annotated[str, typer.Option(
    metavar="kvbench|transformers",
    help="Whose modeling code runs the model: kvbench's own, or transformers' (--config a checkpoint directory of "
         "any causal LM transformers loads offline; strategies naive, hf-dynamic, hf-static, hf-sliding, "
         "hf-offloaded, hf-quantized: transformers' Cache classes; needs pip install 'kvbench[hf]').")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
PromptLenOpt = Annotated[int, typer.Option(help="Prompt length in tokens (random ids).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
SrcLenOpt = Annotated[int, typer.Option(help="Source length in tokens (encoder-decoder configs only).")]
# Said in the --help of every command that takes strategies: a plugin spec runs the plugin's code.
PLUGIN_HELP = ("A plugin, module.path:ClassName or path/to/file.py:ClassName (a kvbench.KVCache subclass), or an "
               "installed kvbench.strategies entry point, is imported: that runs its code.")
WindowOpt = Annotated[int | None, typer.Option(
    help="Sliding window W.", show_default=f"the config's sliding_window, else {DEFAULT_WINDOW}")]
TemperatureOpt = Annotated[float, typer.Option(help="0 = greedy; otherwise sample at this temperature.")]
TopKOpt = Annotated[int | None, typer.Option(help="Sample among the k most likely tokens.", show_default="every token")]
TopPOpt = Annotated[float | None, typer.Option(help="Sample among the most likely tokens holding probability p.",
                                               show_default="every token")]
PromptOpt = Annotated[str | None, typer.Option(help="Prompt text (needs a tokenizer: bytes or tokenizer.json).")]
PromptIdsOpt = Annotated[str | None, typer.Option(help="Prompt as comma-separated token ids (generate: several "
                                                  "prompts as one ragged batch, separated by ';').")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help=f"Add {COMPILED.name}: the static cache with its decode step "
                                          "compiled (torch.compile; a CUDA graph on CUDA).")]
TOLERANCES = ", ".join(f"{name} {atol:g}" for name, (atol, _) in DEFAULT_TOLERANCE.items())
AtolOpt = Annotated[float | None, typer.Option(help="Absolute tolerance on logits.", show_default=f"by dtype: {TOLERANCES}")]
RtolOpt = Annotated[float | None, typer.Option(
    help="Relative tolerance on logits.",
    show_default="by dtype: " + ", ".join(f"{name} {rtol:g}" for name, (_, rtol) in DEFAULT_TOLERANCE.items()))]


def plural(count: int, word: str) -> str:
    """'1 thread', '2 threads'."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def version(value: bool) -> None:
    if value:
        console.print(f"kvbench {kvbench.__version__} (torch {torch.__version__})", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: Annotated[bool, typer.Option("--version", callback=version, is_eager=True,
                                               help="Print kvbench's version and exit.")] = False,
) -> None:
    """Prove a transformer's KV cache exact and measure what it buys."""


MEMORY_ADVICE = "lower --batch-size, the lengths (--new-tokens, --lengths, --window) or use a smaller config"


def fail_cleanly(command: Callable) -> Callable:
    """Turn KVBenchError into one line on stderr plus its exit code; Ctrl-C into a short message; running out
    of memory into advice (it depends on the sizes asked for, which the user can change). KVBenchWarnings
    print as one line each and the command goes on."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", KVBenchWarning)
                warnings.showwarning = _warning_printer()
                return command(*args, **kwargs)
        except KVBenchError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except torch.OutOfMemoryError:
            err_console.print(f"[bold red]error:[/] out of device memory; {MEMORY_ADVICE}", highlight=False)
            raise typer.Exit(2) from None
        except RuntimeError as exc:
            if not is_allocation_failure(exc):
                raise
            err_console.print(f"[bold red]error:[/] out of memory{allocation_size(exc)}; {MEMORY_ADVICE}",
                              highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


_original_showwarning = warnings.showwarning


def _warning_printer() -> Callable:
    """showwarning for one command: a KVBenchWarning as one line, once (the same file read twice, as compare
    reads a run for its table and for its noise test, says the same thing once)."""
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, KVBenchWarning):
            _original_showwarning(message, category, filename, lineno, file, line)
        elif str(message) not in said:
            said.add(str(message))
            err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)

    return show


# What torch's CPU allocator says when malloc fails (an allocation the estimates in kvbench.memory missed)
ALLOCATION_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_allocation_failure(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in ALLOCATION_FAILURES)


def allocation_size(exc: RuntimeError) -> str:
    found = re.search(r"tried to allocate (\d+) bytes", str(exc))
    return f": an allocation of {memory.size_text(int(found.group(1)))} failed" if found else ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    if cuda is None:
        raise KVBenchError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU index)")
    if not torch.cuda.is_available():
        build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda} but no GPU visible"
        raise KVBenchError(f"--device {name}: CUDA is not available (torch {torch.__version__} {build}); "
                           "use --device cpu")
    index = int(cuda.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise KVBenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


def parse_choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """Comma-separated names, each one of `allowed`, in order, without repeats."""
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names:
        raise KVBenchError(f"{option} is empty; choose from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise KVBenchError(f"{option}: unknown choice {name!r}; choose from {', '.join(allowed)}")
    return names


def parse_strategies(text: str, family: str = "decoder", option: str = "--strategies") -> list[str]:
    """Registered strategy names for the family, checked once here; the rest of kvbench asks the registry.
    A plugin spec (module:Class, file.py:Class) is imported and registered here, and stands for its name."""
    names = plugins.strategy_names(text, option)
    if not names:
        raise KVBenchError(f"{option} is empty; choose from {', '.join(registry.names(family))}")
    for name in names:
        registry.get(name, family, option)
    return list(dict.fromkeys(names))  # keep order, drop repeats


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise KVBenchError(f"--dtype {name!r} is not supported; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def tolerance(dtype: str, atol: float | None, rtol: float | None) -> verify.Tolerance:
    default_atol, default_rtol = DEFAULT_TOLERANCE[dtype]
    tol = verify.Tolerance(default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    for option, value in (("--atol", tol.atol), ("--rtol", tol.rtol)):
        # nan compares false with everything and inf allows everything: either would switch the check off
        if not (math.isfinite(value) and value >= 0):
            raise KVBenchError(f"{option} must be a finite number, 0 or more (got {value:g})")
    return tol


def with_compiled(strategies: list[str], compile: bool) -> list[str]:
    return strategies + [COMPILED.name] if compile and COMPILED.name not in strategies else strategies


def strategies_for(loaded: LoadedConfig, text: str | None, default: str, compile: bool, option: str = "--strategies",
                   family_default: str | None = None) -> list[str]:
    """The strategies asked for (or the family's default, else `default`), checked against what the config's
    family supports."""
    family = loaded.model.family
    if compile and family not in COMPILED.families:
        raise KVBenchError(f"--compile supports kvbench's decoder-only models, not {registry.FAMILY_WORDS[family]}")
    chosen = (family_default or default) if text is None else text  # "" is refused, not read as the default
    return with_compiled(parse_strategies(chosen, family, option), compile)


def output_dir(path: Path, option: str) -> Path:
    """A directory a command writes into, created with its parents; refused up front if that cannot be."""
    if path.exists() and not path.is_dir():
        raise KVBenchError(f"{option} {path} is a file; give a directory (it is created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVBenchError(f"{option} {path}: cannot create the directory ({exc.strerror})") from None
    return path


def output_file(path: Path, option: str, force: bool) -> Path:
    """A file a command will write, checked before any work: not a directory, not overwritten without --force,
    its directory created and writable (so that nothing computed is lost at the end)."""
    if path.is_dir():
        raise KVBenchError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise KVBenchError(f"{option} {path} exists; pass --force to overwrite it")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise KVBenchError(f"{option} {path}: {blocking} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".kvbench-probe-"):
            pass
    except OSError as exc:
        raise KVBenchError(f"{option} {path}: cannot write in {path.parent} ({exc.strerror})") from None
    return path


def require_positive(option: str, value: int) -> None:
    if value <= 0:
        raise KVBenchError(f"{option} must be a positive integer (got {value})")


def check_memory(loaded: LoadedConfig, device: torch.device | str, dtype: torch.dtype, strategies: list[str],
                 batch: int, tokens: int, window: int, lengths: str) -> None:
    """Refuse, before allocating anything, weights plus a strategy's cache that cannot fit in the device's
    memory: one line naming the option to lower, instead of the allocator's traceback."""
    from kvbench.weights import model_bytes, require_model_fits

    require_model_fits(loaded.model, device, dtype)  # first: too large a model is the config's fault alone
    weights = model_bytes(loaded.model, dtype, device)
    for name in strategies:
        windowed = registry.get(name).windowed
        held = f"window {window}" if windowed else f"{tokens} tokens"
        memory.require(weights + memory.cache_bytes(loaded.model, name, batch, tokens, window, dtype), device,
                       f"the {name} cache ({held} x batch {batch}) with the model's weights",
                       f"lower {'--window' if windowed else lengths} or --batch-size")


def check_fits(loaded: LoadedConfig, total: int, what: str) -> None:
    limit = loaded.model.max_seq_len
    if total > limit:
        raise KVBenchError(f"{what} = {total} tokens do not fit max_seq_len {limit} of {loaded.source}; "
                           "shorten them or raise max_seq_len")


def check_length(loaded: LoadedConfig, total: int, strategies: list[str], what: str) -> None:
    """Every strategy stops at max_seq_len, except sliding with sinusoidal or rotary positions: its attention
    span is bounded and those positions exist for any index, so it may run past (learned ones may not)."""
    unbounded = loaded.model.unbounded_positions
    bounded = [s for s in strategies if not (unbounded and registry.get(s).windowed)]
    if bounded:
        note = f" (for {', '.join(bounded)})" if len(bounded) < len(strategies) else ""
        check_fits(loaded, total, what + note)


def resolve_window(loaded: LoadedConfig, window: int | None, strategies: list[str] = ()) -> int:
    """The window the windowed strategies attend; a --window that none of `strategies` reads is said to be."""
    if window is not None:
        require_positive("--window", window)
        if family_of(loaded.model).own_window:  # its caches are built from the model's own config
            raise KVBenchError("--window: transformers' models attend with their own window (config.json "
                               "sliding_window); drop --window under --engine transformers")
        if strategies and not any(reads_window(name) for name in strategies):
            warnings.warn(f"--window {window} has no effect: none of {', '.join(strategies)} attends a window "
                          "(sliding does)", KVBenchWarning)
    return window_of(loaded.model, window)


def reads_window(name: str) -> bool:
    """Whether a strategy may use --window: a windowed one, one with its own visibility, or any cache that is
    not one of kvbench's own (a plugin may read the window from its CacheShape)."""
    strategy = registry.get(name)
    own_cache = strategy.cache is None or strategy.cache.__module__ == registry.__name__
    return strategy.windowed or strategy.visibility is not None or not own_cache


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True)


# --- a batch given row by row: --prompt-lens, --new-tokens-per-row ----------------------------------------------

PromptLensOpt = Annotated[str | None, typer.Option(
    metavar="N,N,...", help="A ragged batch: one prompt length per row (sets the batch size, and the prompt "
                            "length to the longest); rows are left-padded.")]
PerRowOpt = Annotated[str | None, typer.Option(
    metavar="N,N,...", help="Rows that stop at different steps: new tokens per row (sets the batch size; the "
                            "generation runs to the largest); a finished row stops growing its cache.")]


def parse_rows(text: str, option: str, example: str) -> list[int]:
    """One positive integer per row, comma-separated, in row order (repeats allowed: rows may be alike)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise KVBenchError(f"{option}: {text!r} must be positive integers, one per row; e.g. {option} {example}")
    return [int(p) for p in parts]


def typed(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` (its parameter name) was typed on the command line, not left at its default."""
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


@dataclasses.dataclass(frozen=True)
class Rows:
    """A batch given row by row: prompt lengths and/or new tokens per row (None where not given)."""

    prompt_lens: list[int] | None = None
    new_tokens: list[int] | None = None

    @property
    def batch(self) -> int | None:
        given = self.prompt_lens or self.new_tokens
        return len(given) if given else None


def rows_asked(ctx: typer.Context, loaded: LoadedConfig, prompt_lens: str | None,
               per_row: str | None = None) -> Rows:
    """--prompt-lens and --new-tokens-per-row, parsed here for every command. Each sets the batch size, and
    replaces an option of its own (--prompt-len; --new-tokens, --lengths or --max-new-tokens), which may not
    be typed beside it; given together they must count the same rows."""
    rows = Rows(parse_rows(prompt_lens, "--prompt-lens", "5,17,40") if prompt_lens is not None else None,
                parse_rows(per_row, "--new-tokens-per-row", "30,12,50") if per_row is not None else None)
    for option, values, replaced in (("--prompt-lens", rows.prompt_lens, ("batch_size", "prompt_len")),
                                     ("--new-tokens-per-row", rows.new_tokens,
                                      ("batch_size", "new_tokens", "lengths", "max_new_tokens"))):
        if values is None:
            continue
        if reads_source(loaded.model):
            raise KVBenchError(f"{option}: batches given row by row are for decoder models; this config is an "
                               "encoder-decoder")
        for name in (n for n in replaced if n in ctx.params and typed(ctx, n)):
            flag = "--" + name.replace("_", "-")
            raise KVBenchError(f"{flag} and {option} both set the batch; drop {flag} ({option} gives one value "
                               "per row)")
    if rows.prompt_lens and rows.new_tokens and len(rows.prompt_lens) != len(rows.new_tokens):
        raise KVBenchError(f"--new-tokens-per-row: {len(rows.new_tokens)} values for the {len(rows.prompt_lens)} rows "
                           "of --prompt-lens; give one per row")
    return rows
