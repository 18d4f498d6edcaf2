"""One-line user errors for the command-line entry points: no traceback for bad input."""
from __future__ import annotations

import sys

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError)


def run(main) -> None:
    """Call ``main()``; a user error prints ``error: <message>`` and exits with status 2."""
    try:
        main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_choices(flag: str, values, allowed) -> None:
    """Every value of a multi-valued flag must be one of ``allowed``."""
    for value in values:
        if value not in allowed:
            raise ValueError(f"{flag}={value!r}: allowed values are {', '.join(allowed)}")
