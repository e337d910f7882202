"""Guidance by name for configs and the command line: ``"cfg:2.0"``, ``"apg:scale=3,eta=0"``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxdiff.guidance.ag import ag
from jaxdiff.guidance.apg import apg
from jaxdiff.guidance.autoguidance import autoguidance
from jaxdiff.guidance.base import Guidance
from jaxdiff.guidance.cfg import cfg
from jaxdiff.guidance.cfg_zero_star import cfg_zero_star
from jaxdiff.guidance.cfgpp import cfgpp
from jaxdiff.guidance.classifier import classifier_guidance
from jaxdiff.guidance.elucd import elucd
from jaxdiff.guidance.gfcg import gfcg
from jaxdiff.guidance.interval import interval
from jaxdiff.guidance.minority import minority
from jaxdiff.guidance.perturbed import pag, slg
from jaxdiff.guidance.rescale import rescale

GUIDANCE: dict[str, Callable[..., Guidance]] = {
    "cfg": cfg,
    "interval": interval,
    "rescale": rescale,
    "cfg_rescale": rescale,
    "apg": apg,
    "ag": ag,
    "autoguidance": autoguidance,
    "classifier": classifier_guidance,
    "elucd": elucd,
    "gfcg": gfcg,
    "minority": minority,
    "cfgpp": cfgpp,
    "cfg++": cfgpp,
    "cfg_zero_star": cfg_zero_star,
    "cfgzero*": cfg_zero_star,
    "pag": pag,
    "slg": slg,
}
"""Guidance factories by name; the first positional value of a spec is their first argument.

``autoguidance``, ``classifier``, ``elucd``, ``gfcg`` and ``minority`` also need a second
network or a classifier (a Python callable), so from a string alone they raise a clear
error; build them in Python.
"""


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    return text


def split_spec(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """Splits ``NAME[:value][,key=value...]`` into ``(name, args, kwargs)``.

    Raises:
        ValueError: for an unknown name or a positional value after a keyword.
    """
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
    return name, args, kwargs


def build(name: str, args: list[Any], kwargs: dict[str, Any], spec: str) -> Guidance:
    """Calls the factory of ``name``; a bad argument becomes a ValueError naming ``spec``."""
    try:
        return GUIDANCE[name](*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for guidance {name!r} in {spec!r}: {err}") from err


def parse_guidance(spec: str | None) -> Guidance | None:
    """Builds a guidance from ``NAME[:value][,key=value...]``; ``"none"`` or "" gives None.

    Values parse as int, float, bool (``true``/``false``), None (``none``) or a string.
    Examples: ``"cfg:2.0"``, ``"interval:2,sigma_lo=0.28,sigma_hi=1.61"``,
    ``"apg:scale=3,eta=0,beta=-0.5,r=none"``, ``"ag:2,threshold=0.99"``. Methods that need a
    second network or a classifier are built from a trained run by
    :func:`jaxdiff.inference.build_guidance` (``guide=WORKDIR``, ``classifier=PATH``).

    Raises:
        ValueError: for an unknown name or malformed or missing arguments.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    return build(*split_spec(spec), spec)
