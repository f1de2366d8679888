"""User-facing errors: the CLI prints their message on one line and exits with code 2, no traceback."""


class CurateError(Exception):
    """A problem the user can fix (bad file, bad parameter, missing weights). The message says what and how."""
