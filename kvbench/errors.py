"""The one exception kvbench raises for things the user can fix.

The CLI turns it into a single line on stderr and an exit code; nothing else prints tracebacks for bad input.
"""


class KVBenchError(Exception):
    """A problem with the user's input (config, file, option): exit code 2 unless said otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
