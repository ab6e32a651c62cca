"""profile: one decode step broken down by operation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from kvbench.cli.common import (
    plural,
    DEFAULT_CONFIG,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    SeedOpt,
    app,
    check_fits,
    check_memory,
    console,
    fail_cleanly,
    output_file,
    require_positive,
    resolve_device,
    resolve_dtype,
)
from kvbench.config import check_seed, load_config
from kvbench.families import family_of
from kvbench.strategies import get, names
from kvbench import pages


def _cell(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def profile_table(profile) -> Table:
    s = profile.settings
    table = Table(title=f"one {s['strategy']} decode step at batch {s['batch']}, {s['context']} tokens visible "
                        f"({s['dtype'].removeprefix('torch.')}, {s['device']}); median of {s['steps']} steps; "
                        f"attention: {profile.attention}", box=box.SIMPLE_HEAD, padding=(0, 1))
    for column in ("operation", "calls", "ms", "share", "MB", "MFLOP", "GB/s", "GFLOP/s"):
        table.add_column(column, justify="left" if column == "operation" else "right", no_wrap=column != "operation")
    for r in profile.table.itertuples():
        last = r.operation.startswith("step")
        table.add_row(r.operation, _cell(r.calls, ".0f"), f"{r.time_ms:.3f}", f"{100 * r.share:.1f}%",
                      _cell(r.bytes / 1e6, ".1f"), _cell(r.flops / 1e6, ".1f"), _cell(r.gb_per_s, ".1f"),
                      _cell(r.gflop_per_s, ".1f"), style="bold" if last else None, end_section=r.operation.startswith("rest"))
    return table


@app.command()
@fail_cleanly
def profile(
    config: ConfigOpt = DEFAULT_CONFIG,
    strategy: Annotated[str, typer.Option(help=f"One of: {', '.join(names('decoder'))}.")] = "static",
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 1,
    context: Annotated[int, typer.Option(metavar="N", help="Tokens already in the cache (visible to the step).")] = 1000,
    steps: Annotated[int, typer.Option(help="Steps timed (the median is reported).")] = 20,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: Annotated[Path | None, typer.Option(help="CSV of the table.",
                                             show_default="profile-<config>-<strategy>-b<B>-c<N>.csv")] = None,
    force: ForceOpt = False,
) -> None:
    """One decode step by operation: time, bytes, FLOPs, achieved rates, share of the step."""
    from kvbench.bench.profile import profile_step
    from kvbench.weights import build_model

    loaded = load_config(config)
    get(strategy, "decoder", "--strategy")
    for option, value in (("--batch-size", batch_size), ("--context", context), ("--steps", steps)):
        require_positive(option, value)
    check_seed("--seed", seed)
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    if not family_of(loaded.model).profiled:
        from kvbench.errors import KVBenchError

        raise KVBenchError(f"--config {config}: kvbench profile times decoder-only models; this one is "
                           f"{loaded.model.family}")
    check_fits(loaded, context + 2 * steps + 16, "--context + 2 x --steps + 16")
    check_memory(loaded, dev, torch_dtype, [strategy], batch_size, context + 2 * steps + 16, context, "--context")
    out = output_file(out or Path(f"profile-{loaded.name}-{strategy}-b{batch_size}-c{context}.csv"), "--out", force)
    model = build_model(loaded, dev, torch_dtype)
    result = profile_step(model, strategy, batch_size, context, steps, seed)
    result.table.to_csv(out, index=False)
    console.print(profile_table(result))
    host = f"; {pages.describe(pages.huge_pages())}" if dev.type == "cpu" else ""
    console.print(f"{plural(torch.get_num_threads(), 'thread')}{host}; written to {escape(str(out))}",
                  highlight=False)
