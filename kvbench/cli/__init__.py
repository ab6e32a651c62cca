"""The Typer app: commands parse options and delegate. The only place that prints or decides exit codes.

Commands live in submodules by concern; importing them registers them on `app`, in the order --help lists.
"""

from kvbench.cli import bench, check, profile, report, sweep, text  # noqa: F401  (registers the commands)
from kvbench.cli.common import app


def main() -> None:
    app(prog_name="kvbench")


__all__ = ["app", "main"]
