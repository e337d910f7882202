"""Guidance by name for configs and the command line: ``"cfg:2.0"``, ``"cfg:scale=2.0"``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxdiff.guidance.base import Guidance
from jaxdiff.guidance.cfg import cfg

GUIDANCE: dict[str, Callable[..., Guidance]] = {"cfg": cfg}
"""Guidance factories by name; the first positional value of a spec is their first argument."""


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_guidance(spec: str | None) -> Guidance | None:
    """Builds a guidance from ``NAME[:value][,key=value...]``; ``"none"`` or "" gives None.

    Examples: ``"cfg:2.0"``, ``"cfg:scale=1.5"``.

    Raises:
        ValueError: for an unknown name or malformed arguments.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name not in GUIDANCE:
        raise ValueError(f"unknown guidance {name!r} in {spec!r}: choose one of {sorted(GUIDANCE)}")
    args, kwargs = [], {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if "=" in item:
            k, _, v = item.partition("=")
            kwargs[k.strip()] = _parse_value(v.strip())
        elif kwargs:
            raise ValueError(f"positional value {item!r} after key=value in guidance {spec!r}")
        else:
            args.append(_parse_value(item))
    try:
        return GUIDANCE[name](*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for guidance {name!r} in {spec!r}: {err}") from err
