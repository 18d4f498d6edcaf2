"""One-line user errors for the command-line entry points: no traceback for bad input, and
no Ctrl-C dropped with a traceback (``keep_ctrl_c``).

Every script validates its flags before it computes or writes anything. A bad value ends
with one line on stderr, ``error: <flag>=<value>: <what is allowed>``, and exit status 2;
``ArgumentParser`` makes argparse's own type errors follow the same form (argparse prints
a usage block and a second line by default).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import zipfile

# The value checks, shared with the config validation; scripts call them as cli.check_*.
from ratebp_jax.checks import (allowed_values, check_bool, check_choices,  # noqa: F401
                               check_int, check_number, closest)

USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               FileExistsError, PermissionError, IsADirectoryError, zipfile.BadZipFile)


class UsageError(ValueError):
    """A bad command line or config value; its message names the field and what is allowed."""


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run(main, argv=None) -> None:
    """Call ``main(argv)``; a user error prints ``error: <message>`` and exits with status 2."""
    try:
        main(argv)
    except USER_ERRORS as e:
        fail(str(e) or type(e).__name__)


def keep_ctrl_c(delay_s: float = 0.05) -> None:
    """Make a Ctrl-C that lands in a garbage-collection callback or a ``__del__`` count.

    Python runs a signal handler between any two bytecodes of the main thread, so the
    KeyboardInterrupt of a Ctrl-C can be raised inside a finaliser (JAX registers one with
    the garbage collector). Python cannot propagate an exception from there: it prints
    "Exception ignored in ..." with a traceback, drops the Ctrl-C, and the run goes on.
    This hook sends SIGINT again ``delay_s`` later, from a timer thread, so that the
    handler runs once more after the finaliser has returned; raising it at once would run
    the handler inside this hook, where the exception is dropped in the same way. Every
    other unraisable exception goes to Python's default hook. ``main.py`` installs it for
    the whole run, and the training loop for as long as it handles Ctrl-C.
    """
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            timer = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGINT))
            timer.daemon = True  # a run that is already ending does not wait for it
            timer.start()
        else:
            sys.__unraisablehook__(unraisable)
    sys.unraisablehook = hook


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit 2) and defaults in every help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(message)


def check_output_path(flag: str, path) -> None:
    """An output file's folder must exist and the path must not be a folder."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag}={path!r}: is a directory; give a file path")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}={path!r}: its folder {folder!r} does not exist")


# --------------------------------------------------------------------------- absl + configs
def define_config_flag(default_path: str, help_text: str) -> None:
    """``--config``, a Python config file, defined without a default.

    ml_collections would load a default file, and apply the ``--config.FIELD`` overrides,
    while the script is being imported, where an error cannot become one line;
    ``absl_flags_parser`` supplies ``default_path`` at parse time instead.
    """
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    flags.FLAGS["config"].default_as_str = repr(os.path.relpath(default_path))  # for --help


def absl_flags_parser(default_config: str):
    """A ``flags_parser`` for ``absl.app.run`` with every error one line: a bad or missing
    flag, a missing or failing ``--config`` file, a bad ``--config.FIELD`` value or an
    unknown field (with the closest name)."""
    from absl import flags

    def parse(argv):
        path = _config_arg(argv)
        if path is None:
            path, argv = default_config, [argv[0], f"--config={default_config}", *argv[1:]]
        if not os.path.isfile(path.split(":", 1)[0]):
            raise UsageError(f"--config={path!r}: no such file (a Python file with "
                             f"get_config())")
        try:
            rest = flags.FLAGS(argv)
            flags.FLAGS.config.keys()  # ml_collections defers a file's load error to first use
            return rest
        except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many kinds
            raise UsageError(_flag_error(e, argv, path)) from None
    return parse


def _config_arg(argv) -> str | None:
    """The value of the last ``--config`` in ``argv``, or None."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        m = re.fullmatch(r"--?config(=(.*))?", arg)
        if m:
            value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _flag_error(error, argv, path) -> str:
    """One line for ``error``, raised while parsing ``argv``: a missing required flag, the
    config file's own failure, the first unknown ``--config.FIELD`` (ml_collections raises
    AttributeError, KeyError or TypeError for it), else the gist of the error."""
    from absl import flags
    missing = re.findall(r"Flag (--[\w-]+) must have a value other than None", str(error))
    if missing:
        return f"{', '.join(missing)}: required, not given"
    try:
        config = flags.FLAGS["config"].parser.parse(path)
        config.keys()
    except Exception as e:  # noqa: BLE001 - the config file fails to run
        return f"--config={path!r}: cannot load it ({_gist(e)})"
    for arg in argv[1:]:
        m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if m and _unknown_field(config, m.group(1)):
            return _unknown_field(config, m.group(1))
    return _gist(error)


def _unknown_field(config, field: str) -> str | None:
    """``config.FIELD: no such field; did you mean ...?`` if ``field`` (dotted) is not in
    ``config``, else None."""
    from ml_collections import config_dict
    node = config
    for part in field.split("."):
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            keys = node.keys() if isinstance(node, config_dict.ConfigDict) else []
            return f"config.{field}: no such field{closest(part, keys)}"
        node = node[part]
    return None


def _gist(error) -> str:
    """An exception's message on one line. absl starts each with ``flag ``; ml_collections
    embeds a whole traceback in some, of which the last line says what went wrong."""
    lines = [line.strip().removeprefix("flag ") for line in str(error).splitlines()
             if line.strip()]
    if not lines:
        return type(error).__name__
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return "; ".join(lines)
