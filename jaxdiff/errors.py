"""The one error type for bad user input: a wrong argument, config value or flag.

:class:`InvalidArgumentError` subclasses :class:`ValueError`, so existing ``except
ValueError`` code keeps working; the command-line entry points catch it to print one line
(the message names the value and the fix) instead of a traceback.
"""


class InvalidArgumentError(ValueError):
    """A bad argument: the message names the offending value and how to fix it."""


__all__ = ["InvalidArgumentError"]
