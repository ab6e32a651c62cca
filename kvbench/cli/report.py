"""report: one self-contained HTML (or Markdown) file for results directories, sweeps, or runs compared."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from kvbench.cli.common import app, console, fail_cleanly, output_file, typed
from kvbench.errors import KVBenchError


class ReportFormat(str, enum.Enum):
    html = "html"
    md = "md"


SUFFIX_FORMATS = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}


@app.command()
@fail_cleanly
def report(
    ctx: typer.Context,
    dirs: Annotated[list[Path], typer.Argument(metavar="DIR...", help="Results or sweep directories; with several, "
                                               "each is compared against the first.")],
    out: Annotated[Path | None, typer.Option(help="File to write.", show_default="report.html (or report.md) "
                                             "in the first DIR")] = None,
    format: Annotated[ReportFormat, typer.Option("--format", help="html: one file, images and styles inline; "
                                                 "md: Markdown for an issue or PR.")] = ReportFormat.html,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")] = False,
) -> None:
    """Environment, summary tables, floors, every plot, and (for several runs) ratios marked where they differ
    beyond noise, in one file that needs no network to view."""
    from kvbench import report as build_report

    named = SUFFIX_FORMATS.get(out.suffix.lower()) if out is not None else None
    if named is not None and named != format.value:
        if typed(ctx, "format"):  # a Markdown file named .html would open as garbled HTML
            raise KVBenchError(f"--out {out} is named as {named} but --format {format.value} writes "
                               f"{format.value}; name it .{format.value} or give --format {named}")
        format = ReportFormat(named)  # --out r.md alone: the name says which
    target = out if out is not None else dirs[0] / f"report.{format.value}"
    output_file(target, "--out", force or out is None)  # the default name is the report's own: rewritten
    sections = build_report.build(dirs)
    title = "kvbench report: " + ", ".join(str(d) for d in dirs)
    text = (build_report.to_html if format is ReportFormat.html else build_report.to_markdown)(sections, title)
    target.write_text(text, encoding="utf-8")
    console.print(f"wrote {escape(str(target))} ({len(text) / 1e6:.1f} MB)", highlight=False)
