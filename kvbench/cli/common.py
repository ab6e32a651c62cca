"""What every command shares: the Typer app, the consoles, option types, the one error path, input checks."""

from __future__ import annotations

import functools
import math
import re
import warnings
from pathlib import Path
from typing import Annotated, Callable

import torch
import typer
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

from kvbench import memory, verify
from kvbench import strategies as registry
from kvbench.config import LoadedConfig, Seq2SeqConfig, load_config
from kvbench.errors import KVBenchError, KVBenchWarning
from kvbench.precision import DEFAULT_TOLERANCE, DTYPES
from kvbench.strategies import COMPILED, DEFAULT_WINDOW, window_of

app = typer.Typer(help="Prove a transformer's KV cache exact and measure what it buys.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
# Long lines stay whole, for copying and grepping. No emoji codes: user text such as `--device cuda:x:` must
# print as typed (and user text is passed through rich's escape() against markup like `[red]` in a path).
console = Console(soft_wrap=True, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, emoji=False)

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
CompileOpt = Annotated[bool, typer.Option("--compile", help=f"Add {COMPILED.name}: the static cache with its decode step "
                                          "compiled (torch.compile; a CUDA graph on CUDA).")]
AtolOpt = Annotated[float | None, typer.Option(help="Absolute tolerance on logits [default: by dtype].")]
RtolOpt = Annotated[float | None, typer.Option(help="Relative tolerance on logits [default: by dtype].")]


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
                warnings.showwarning = _show_warning
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, KVBenchWarning):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)
    else:
        _original_showwarning(message, category, filename, lineno, file, line)


# What torch's CPU allocator says when malloc fails (an allocation the estimates in kvbench.memory missed)
ALLOCATION_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_allocation_failure(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in ALLOCATION_FAILURES)


def allocation_size(exc: RuntimeError) -> str:
    found = re.search(r"tried to allocate (\d+) bytes", str(exc))
    return f": an allocation of {memory.size_text(int(found.group(1)))} failed" if found else ""


def resolve_config(path: Path) -> LoadedConfig:
    if path == DEFAULT_CONFIG and not path.exists():
        path = REPO_CONFIGS / "default.yaml"  # running outside the checkout root
    return load_config(path)


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
    """Registered strategy names for the family, checked once here; the rest of kvbench asks the registry."""
    names = [s.strip() for s in text.split(",") if s.strip()]
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


def is_seq2seq(loaded: LoadedConfig) -> bool:
    return isinstance(loaded.model, Seq2SeqConfig)


def strategies_for(loaded: LoadedConfig, text: str | None, default: str, compile: bool,
                   seq2seq_default: str = DEFAULT_SEQ2SEQ_STRATEGIES) -> list[str]:
    """The strategies asked for (or the family's default), checked against what the config's family supports."""
    family = loaded.model.family
    if compile and family not in COMPILED.families:
        raise KVBenchError(f"--compile supports decoder-only configs; {loaded.source} is an encoder-decoder")
    chosen = text or (seq2seq_default if is_seq2seq(loaded) else default)
    return with_compiled(parse_strategies(chosen, family), compile)


def require_positive(option: str, value: int) -> None:
    if value <= 0:
        raise KVBenchError(f"{option} must be a positive integer (got {value})")


def check_memory(loaded: LoadedConfig, device: torch.device | str, dtype: torch.dtype, strategies: list[str],
                 batch: int, tokens: int, window: int, lengths: str) -> None:
    """Refuse, before allocating anything, weights plus a strategy's cache that cannot fit in the device's
    memory: one line naming the option to lower, instead of the allocator's traceback."""
    from kvbench.weights import model_bytes, require_model_fits

    require_model_fits(loaded.model, device, dtype)  # first: too large a model is the config's fault alone
    weights = model_bytes(loaded.model, dtype)
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
    """Every strategy stops at max_seq_len, except sliding with sinusoidal positions: its attention span
    is bounded and sinusoidal encodings exist for any position, so it may run past (learned ones may not)."""
    sinusoidal = loaded.model.positional == "sinusoidal"
    bounded = [s for s in strategies if not (sinusoidal and registry.get(s).windowed)]
    if bounded:
        note = f" (for {', '.join(bounded)})" if len(bounded) < len(strategies) else ""
        check_fits(loaded, total, what + note)


def resolve_window(loaded: LoadedConfig, window: int | None) -> int:
    if window is not None:
        require_positive("--window", window)
    return window_of(loaded.model, window)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True)
