"""User-facing errors: the CLI prints their message on one line and exits with code 2; HTTP turns them into 4xx.
A stop requested by a signal is `Terminated` (exit 130 / 143)."""
import signal


class ScdgmError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option); never shown with a traceback."""


class InputError(ScdgmError, ValueError):
    """Input data that cannot be used as it is (negative, non-finite or non-integer counts, bad shapes...)."""


class Terminated(BaseException):
    """The process was asked to stop by SIGINT (Ctrl+C) or SIGTERM. A BaseException, as KeyboardInterrupt is, so
    `except Exception` lets it through while `finally` blocks and context managers clean up (runs end KILLED,
    staging folders go); the CLI prints its message on one line and exits 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum
