"""Exit codes of the command line, and the error it reports without a traceback."""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CLIError(Exception):
    """An error to report without a traceback: `argument` names the option at fault, `exit_code` is 1 or 2."""

    def __init__(self, message: str, argument: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.argument = argument
        self.exit_code = exit_code

    def __str__(self) -> str:
        message = super().__str__()
        return f"argument {self.argument}: {message}" if self.argument else message
