"""The Typer app: commands parse options and delegate. The only place that prints or decides exit codes."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Callable

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvbench import verify
from kvbench.cache import STRATEGIES
from kvbench.config import LoadedConfig, load_config
from kvbench.errors import KVBenchError
from kvbench.model import Decoder, init_weights
from kvbench.weights import build_model, load_cpu_model, save_weights

app = typer.Typer(help="Prove a transformer's KV cache exact and measure what it buys.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = Path("configs/default.yaml")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config, or a GPT-2 checkpoint directory.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random prompt.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per batch.")]
PromptLenOpt = Annotated[int, typer.Option(help="Prompt length in tokens (random ids).")]


def fail_cleanly(command: Callable) -> Callable:
    """Turn KVBenchError into one line on stderr plus its exit code; Ctrl-C into a short message."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KVBenchError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
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


def require_positive(option: str, value: int) -> None:
    if value <= 0:
        raise KVBenchError(f"{option} must be a positive integer (got {value})")


def check_fits(loaded: LoadedConfig, total: int, what: str) -> None:
    limit = loaded.model.max_seq_len
    if loaded.model.positional == "learned" and total > limit:
        raise KVBenchError(f"{what} = {total} tokens do not fit max_seq_len {limit} of {loaded.source}; "
                           "shorten them or raise max_seq_len")


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
    atol: Annotated[float, typer.Option(help="Absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance.")] = 1e-4,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 1,
    prompt_len: PromptLenOpt = 16,
    seed: SeedOpt = 0,
) -> None:
    """Check the model's logits after a prompt against the NumPy float64 reference and expected values."""
    loaded = resolve_config(config)
    require_positive("--batch-size", batch_size)
    require_positive("--prompt-len", prompt_len)
    dev = resolve_device(device)
    expected_logits = None
    if expected is not None:
        input_ids, expected_logits = verify.read_expected(expected, loaded.model)
    else:
        check_fits(loaded, prompt_len, "--prompt-len")
        input_ids = verify.random_prompt(loaded.model, batch_size, prompt_len, seed)
    cpu_model = load_cpu_model(loaded)
    cpu_weights = {name: t.clone() for name, t in cpu_model.state_dict().items()}  # the reference's own copy
    model = cpu_model.to(dev)
    tol = verify.Tolerance(atol, rtol)
    result, reference = verify.evaluate(model, cpu_weights, input_ids, tol, expected_logits)
    console.print(f"{loaded.name}: prompt {tuple(input_ids.shape)} on {dev}")
    console.print(comparison_table(result.comparisons, tol))
    if write_expected is not None:
        verify.write_expected(write_expected, input_ids, reference)
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
        return "none"
    kind = "near-tie" if d.near_tie else "[bold red]MISMATCH[/]"
    return (f"{kind} at step {d.step} (row {d.row}): chose {d.chosen}, naive {d.naive_choice}, "
            f"naive gap {d.gap:.2e}")


def strategy_table(checks: list[verify.StrategyCheck], tol: verify.Tolerance) -> Table:
    table = Table(title=f"cached vs naive recomputation (atol {tol.atol:g}, rtol {tol.rtol:g})")
    for column in ("strategy", "steps", "max abs diff", "err/tol", "first divergent token", "result"):
        table.add_column(column, justify="left" if column in ("strategy", "first divergent token") else "right")
    for c in checks:
        verdict = "[green]pass[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.strategy, str(c.new_tokens), f"{c.max_abs:.3e}", f"{c.worst_ratio:.3f}",
                      divergence_text(c), verdict)
    return table


@app.command("kv-evaluate")
@fail_cleanly
def kv_evaluate(
    config: ConfigOpt = DEFAULT_CONFIG,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate per strategy.")] = 1000,
    strategies: Annotated[str, typer.Option(help=f"Comma-separated, from: {', '.join(STRATEGIES)}.")] = "static,dynamic",
    batch_size: BatchOpt = 1,
    prompt_len: PromptLenOpt = 16,
    atol: Annotated[float, typer.Option(help="Absolute tolerance on logits.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance on logits.")] = 1e-4,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
) -> None:
    """Prove that generation with a KV cache gives naive recomputation's logits and tokens."""
    loaded = resolve_config(config)
    names = parse_strategies(strategies)
    for option, value in (("--new-tokens", new_tokens), ("--batch-size", batch_size), ("--prompt-len", prompt_len)):
        require_positive(option, value)
    check_fits(loaded, prompt_len + new_tokens, "--prompt-len + --new-tokens")
    dev = resolve_device(device)
    model = build_model(loaded, dev)
    prompt = verify.random_prompt(loaded.model, batch_size, prompt_len, seed).to(dev)
    tol = verify.Tolerance(atol, rtol)
    console.print(f"{loaded.name}: batch {batch_size}, prompt {prompt_len}, {new_tokens} new tokens on {dev}")
    with progress_bar() as progress:
        tasks = {s: progress.add_task(f"{s:>8}", total=new_tokens) for s in names}
        checks = verify.kv_evaluate(model, prompt, new_tokens, names, tol,
                                    on_step=lambda s, step: progress.advance(tasks[s]))
    console.print(strategy_table(checks, tol))
    if not all(c.passed for c in checks):
        err_console.print("[bold red]kv-evaluate failed:[/] a strategy does not match naive recomputation",
                          highlight=False)
        raise typer.Exit(1)


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
    model = Decoder(loaded.model)
    init_weights(model, loaded.model.seed if seed is None else seed, every_tensor=every_tensor)
    save_weights(model, out)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"wrote {n_params:,} parameters for {loaded.name} to {out}")


def main() -> None:
    app(prog_name="kvbench")


if __name__ == "__main__":
    sys.exit(main())
