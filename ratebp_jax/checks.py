"""Value checks shared by the config validation, the command lines and the library's own
arguments, so that a bad value reads the same wherever it is given.

Each check raises ``ValueError`` with one message, ``<field>=<value!r>: <what is allowed>``,
and otherwise returns the value. ``field`` is the name the user typed: a config field
(``step_mode``), a keyword argument, or a flag (``--step-mode``).
"""
from __future__ import annotations

import difflib
import math
import numbers


def closest(name: str, candidates) -> str:
    """``"; did you mean X?"`` for the closest candidate, or ``""``."""
    match = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def allowed_values(allowed, *, also: str | None = None) -> str:
    """``"allowed values are a, b, c"`` (``", or <also>"`` appended when given): the one
    wording every choice error uses."""
    return f"allowed values are {', '.join(map(str, allowed))}" + (f", or {also}" if also else "")


def check_choice(field: str, value, allowed, *, also: str | None = None):
    """``value`` must be one of ``allowed`` (a sequence, or a dict's keys); the message lists
    them, ``also`` describes any other accepted form, and the closest name is suggested."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{field}={value!r}: {allowed_values(allowed, also=also)}"
                         f"{closest(str(value), allowed)}")
    return value


def check_choices(field: str, values, allowed):
    """Every one of ``values`` (a multi-valued flag or a list field) must be one of
    ``allowed``; the first that is not is named."""
    for value in values:
        check_choice(field, value, allowed)
    return values


def check_int(field: str, value, minimum: int = 1, maximum: int | None = None):
    """``value`` must be an integer (Python or NumPy, not a bool) in [minimum, maximum]."""
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= minimum and (maximum is None or value <= maximum))
    if not ok:
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{field}={value!r}: must be an integer >= {minimum}{bound}")
    return value


def check_number(field: str, value, low=None, high=None, *, low_open: bool = False,
                 high_open: bool = False):
    """``value`` must be a finite real number (not a bool) within ``low`` and ``high``, each
    bound included unless ``low_open`` / ``high_open``; None leaves that side unbounded."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value)
          and (low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        if low is not None and high is not None:
            where = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            where = f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            where = f" {'<' if high_open else '<='} {high}"
        else:
            where = ""
        raise ValueError(f"{field}={value!r}: must be a finite number{where}")
    return value


def check_bool(field: str, value):
    """``value`` must be True or False (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}={value!r}: must be true or false")
    return value
