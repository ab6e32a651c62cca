"""The one exception kvbench raises for things the user can fix.

The CLI turns it into a single line on stderr and an exit code; nothing else prints tracebacks for bad input.
"""


class KVBenchError(Exception):
    """A problem with the user's input (config, file, option): exit code 2 unless said otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class KVBenchWarning(UserWarning):
    """Something the user should know that does not stop the command (e.g. weights holding NaN).

    Raised with warnings.warn where it is found; the CLI prints it as one line on stderr.
    """
