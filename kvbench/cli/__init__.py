"""The Typer app: commands parse options and delegate. The only place that prints or decides exit codes.

Commands live in submodules by concern; importing them registers them on `app`, in the order --help lists.
They are imported inside main(), so that Ctrl-C while torch loads ends with one line, not a traceback.
"""

from __future__ import annotations

import os
import signal
import sys

from kvbench.pages import HUGE_PAGES_ENV


def _app():
    from kvbench.cli import bench, check, profile, report, sweep, text  # noqa: F401  (registers the commands)
    from kvbench.cli.common import app

    return app


def _stop_as_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Before torch loads (it reads the variable once): its CPU allocator then puts every buffer of 2 MB or more
    # (weights, caches, the floor's probes) in transparent huge pages. A decode step streams hundreds of MB, and
    # with 4 KB pages every page is a TLB miss; measured here, steps 4-9% faster (docs/perf.md). Set it to 0
    # to opt out; meta.json and profile record which it was.
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    # SIGTERM (a job scheduler's, `timeout`'s, `kill`'s) stops a command as Ctrl-C does: what finished is
    # kept and the resume command printed, where its default would end the process with nothing written.
    signal.signal(signal.SIGTERM, _stop_as_ctrl_c)
    try:
        app = _app()
    except KeyboardInterrupt:  # while torch, pandas and matplotlib load (about 2 s)
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    app(prog_name="kvbench")


def __getattr__(name: str):
    if name == "app":  # `from kvbench.cli import app` (tests, embedding): every command registered
        return _app()
    raise AttributeError(f"module 'kvbench.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
