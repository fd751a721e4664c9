"""User-facing errors: the CLI prints their message on one line and exits with code 2; HTTP turns them into 4xx."""


class ScdgmError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option); never shown with a traceback."""


class InputError(ScdgmError, ValueError):
    """Input data that cannot be used as it is (negative, non-finite or non-integer counts, bad shapes...)."""
