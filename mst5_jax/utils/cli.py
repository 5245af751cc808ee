"""The error style the command-line entry points share (CONTRACT §4b).

A user error (a bad flag, path, data or model) is printed as one ``error: ...`` line on
stderr and exits with status 2; the traceback appears only with ``--debug``.
"""
from __future__ import annotations

import sys
from typing import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in what the user asked for; its message names the value and the fix."""


# Exceptions that mean "the input was wrong" when they escape a CLI.
_USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(body: Callable[[], int], *, debug: bool, prog: str) -> int:
    """Calls `body`; a user error becomes ``prog: error: message`` and exit status 2."""
    try:
        return body()
    except _USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        print(f"{prog}: error: {e.code}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
