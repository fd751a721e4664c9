"""User-facing errors: the CLI prints their message on one line and exits with code 2; HTTP turns them into 4xx.
A stop requested by a signal is `Terminated` (exit 130 / 143), held back while an `uninterrupted` block runs."""
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


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


class _Held(threading.local):
    """Per thread: how deep in `uninterrupted` blocks it is, and the stop signal held for their end."""

    depth = 0
    signum: int | None = None


_held = _Held()


def raise_terminated(signum: int, frame: object) -> None:
    """Handler of SIGINT/SIGTERM (the CLI's): raise `Terminated`, or hold it until the `uninterrupted` block that
    the main thread is in ends."""
    if _held.depth:
        _held.signum = signum
        return
    raise Terminated(signum)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold a stop signal that arrives during the block and raise its `Terminated` when the block ends: for short
    writes that must not be cut in two (an SQLite transaction cut off keeps the tracking store locked against the
    write that then marks the run KILLED)."""
    _held.depth += 1
    try:
        yield
    finally:
        _held.depth -= 1
        if _held.depth == 0 and _held.signum is not None:
            signum, _held.signum = _held.signum, None
            raise Terminated(signum)
