"""Command-line error handling: a user error is one line and exit code 2, never a traceback.

``python -m train`` and ``python -m sample`` call :func:`run` instead of ``absl.app.run``.
Bad flags, bad config values and bad files (``ValueError``, ``OSError``, a locked workdir,
an unreadable checkpoint) print ``error: <message>`` plus one hint line and exit with 2; a
non-finite loss exits with 1 the same way. ``--debug`` (or ``JAXDIFF_DEBUG=1``) shows
the full traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
_USER_ERROR_NAMES = {"WorkdirLockedError", "CheckpointCorruptError", "UsageError"}
HINT = "hint: add --debug (or set JAXDIFF_DEBUG=1) to see the full traceback"


def _exit_code(err: BaseException) -> int | None:
    if isinstance(err, FloatingPointError):
        return EXIT_RUN_FAILED
    names = {cls.__name__ for cls in type(err).__mro__}
    if isinstance(err, (ValueError, OSError, flags.Error)) or names & _USER_ERROR_NAMES:
        return EXIT_USER_ERROR
    return None


def debug_requested(argv: list[str] | None = None) -> bool:
    """Whether ``--debug`` is on the command line or ``JAXDIFF_DEBUG`` is set (not 0)."""
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("JAXDIFF_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    """Prints ``error: message`` (on one line) and the hint to stderr; exits with ``code``."""
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    sys.stderr.write(f"error: {message}\n{HINT}\n")
    sys.stderr.flush()
    sys.exit(code)


def _message(err: BaseException) -> str:
    text = str(err) if not isinstance(err, OSError) or not err.filename else None
    if text is None:  # e.g. "[Errno 21] Is a directory: 'out.png'"
        text = f"{err.strerror}: {err.filename}"
    return text or type(err).__name__


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """``absl.app.run(main)`` with one-line user errors; see the module docstring."""
    argv = list(sys.argv if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]

    def parse(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except Exception as err:  # flag syntax, unknown keys, a config file that fails
            if debug or _exit_code(err) is None and not isinstance(err, AttributeError):
                raise
            fail(f"{_message(err)} (see --helpfull for the flags)")
        return []  # unreachable: fail() exits

    def guarded(args: list[str]) -> None:
        try:
            main(args)
        except Exception as err:
            code = _exit_code(err)
            if debug or code is None:
                raise
            fail(_message(err), code)

    app.run(guarded, argv=argv, flags_parser=parse)


__all__ = ["EXIT_RUN_FAILED", "EXIT_USER_ERROR", "debug_requested", "fail", "run"]
