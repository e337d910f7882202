"""Guidance by name for configs and the command line: ``"cfg:2.0"``, ``"apg:scale=3,eta=0"``.

A spec is ``NAME[:value][,key=value...]``; the positional value is the factory's first
argument (always the scale). Registry names, their factories and the classes they build
(aliases share a row)::

    registry name(s)           factory                class                needs
    -------------------------  ---------------------  -------------------  -------------
    cfg                        cfg                    CFG
    interval                   interval               Interval (inner CFG)
    rescale, cfg_rescale       rescale                CFGRescale
    apg                        apg                    APG
    ag                         ag                     AdaptiveGuidance
    autoguidance               autoguidance           Autoguidance         guide_denoise
    classifier                 classifier_guidance    ClassifierGuidance   log_prob_fn
    elucd                      elucd                  EluCD                logits_fn
    gfcg                       gfcg                   GFCG                 logits_fn
    minority                   minority               MinorityGuidance     log_prob_fn
    cfgpp, cfg++               cfgpp                  CFGPlusPlus
    cfg_zero_star, cfgzero*    cfg_zero_star          CFGZeroStar
    pag                        pag                    PerturbedGuidance (variant "pag")
    slg                        slg                    PerturbedGuidance (variant "slg")
    negtome                    negtome                NegToMe (variant "negtome")
    vendi, cvsg                vendi                  VendiGuidance        features_fn

"needs" lists the Python callables (resources, see :data:`REQUIRES`) a method cannot be
built without: pass them to :func:`parse_guidance` as keywords. A higher layer (the
command line) reads :data:`REQUIRES` to know what to load first, e.g. a guiding model
from ``guide=WORKDIR`` or a classifier from ``classifier=PATH``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from jaxdiff.errors import InvalidArgumentError
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
from jaxdiff.guidance.negtome import negtome
from jaxdiff.guidance.perturbed import pag, slg
from jaxdiff.guidance.rescale import rescale
from jaxdiff.guidance.vendi import vendi

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
    "negtome": negtome,
    "vendi": vendi,
    "cvsg": vendi,
}
"""Guidance factories by registry name (see the table in the module docstring)."""

_NEEDS = {
    "autoguidance": ("guide_denoise",),
    "classifier": ("log_prob_fn",),
    "minority": ("log_prob_fn",),
    "elucd": ("logits_fn",),
    "gfcg": ("logits_fn",),
    "vendi": ("features_fn",),
    "cvsg": ("features_fn",),
}
REQUIRES: dict[str, tuple[str, ...]] = {name: _NEEDS.get(name, ()) for name in GUIDANCE}
"""The resources (Python callables) each registry name needs: ``()`` for most, e.g.
``("log_prob_fn",)`` for ``"classifier"``."""

RESOURCES: dict[str, tuple[str, str]] = {
    "guide_denoise": (
        "the guiding (weaker) model's denoiser (x, sigma, cond) -> x0",
        "guide=WORKDIR (a weaker run of the same model)",
    ),
    "log_prob_fn": (
        "a noise-aware classifier (x, sigma, y) -> [B] log-probabilities",
        "classifier=PATH (a noise-aware classifier file)",
    ),
    "logits_fn": (
        "a clean-data classifier x0 -> [B, K] logits",
        "classifier=PATH (a classifier file)",
    ),
    "features_fn": (
        "a feature network x0 -> [B, F] features",
        "classifier=PATH (its penultimate features; default the shipped digits classifier)",
    ),
}
"""Each resource: (what it is, how to give it on the command line)."""


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


def parse_spec(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """Splits any ``NAME[:value][,key=value...]`` string into ``(name, args, kwargs)``.

    The name is lower-cased and not validated. Values parse as int, float (``inf`` and
    ``nan`` included), bool (``true``/``false``), None (``none``) or else stay strings.

    Raises:
        InvalidArgumentError: for an empty name or key, a repeated key, or a positional
            value after a ``key=value``.
    """
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if not name:
        raise InvalidArgumentError(f"{spec!r} has no name: write NAME[:value][,key=value...]")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if not key or key in kwargs:
                what = "an empty key" if not key else f"the key {key!r} twice"
                raise InvalidArgumentError(
                    f"{spec!r} has {what}: write each argument once as key=value"
                )
            kwargs[key] = _parse_value(value.strip())
        elif kwargs:
            raise InvalidArgumentError(
                f"positional value {item!r} after key=value in {spec!r}: put positional "
                "values first or write them as key=value"
            )
        else:
            args.append(_parse_value(item))
    return name, args, kwargs


def split_spec(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """Splits a guidance spec like :func:`parse_spec` and checks the name is registered.

    Raises:
        InvalidArgumentError: for an unknown name or a malformed spec.
    """
    name, args, kwargs = parse_spec(spec)
    if name not in GUIDANCE:
        raise InvalidArgumentError(
            f"unknown guidance {name!r} in {spec!r}: choose one of {', '.join(sorted(GUIDANCE))}"
        )
    return name, args, kwargs


def _missing(name: str, resource: str, spec: str) -> InvalidArgumentError:
    meaning, cli = RESOURCES[resource]
    return InvalidArgumentError(
        f"guidance {spec!r} needs {resource}=<{meaning}>: from the command line add {cli}; "
        f"in Python pass parse_guidance({spec!r}, {resource}=...) or "
        f"{GUIDANCE[name].__name__}(..., {resource}=...)"
    )


def build(
    name: str, args: list[Any], kwargs: dict[str, Any], spec: str, **resources: Any
) -> Guidance:
    """Calls the factory of ``name`` with the parsed values and the resources it needs.

    Args:
        name: a registered name (see :func:`split_spec`).
        args: positional values from the spec.
        kwargs: ``key=value`` values from the spec. A callable under a resource name is
            accepted as that resource (a string there is not).
        spec: the original spec, for messages.
        **resources: callables (``guide_denoise=``, ``log_prob_fn=``, ``logits_fn=``);
            those the method does not take are ignored.

    Raises:
        InvalidArgumentError: naming ``spec``, for a missing resource, an argument the
            factory does not take, or a value the factory refuses.
    """
    factory = GUIDANCE[name]
    kwargs = dict(kwargs)
    for resource in RESOURCES:
        if resource in kwargs:
            value = kwargs.pop(resource)
            if not callable(value):
                raise InvalidArgumentError(
                    f"{resource}={value!r} in {spec!r}: a {resource} is a Python callable and "
                    f"cannot be written in a spec; "
                    f"from the command line use {RESOURCES[resource][1]}"
                )
            resources.setdefault(resource, value)
    for resource in REQUIRES[name]:
        if resources.get(resource) is None:
            raise _missing(name, resource, spec)
        kwargs[resource] = resources[resource]
    signature = inspect.signature(factory)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        accepted = [p for p in signature.parameters if p not in REQUIRES[name]]
        raise InvalidArgumentError(
            f"bad arguments for guidance {name!r} in {spec!r} ({err}): it takes "
            f"{', '.join(accepted)} (the first may be given without its name)"
        ) from None
    try:
        return factory(*args, **kwargs)
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"{spec!r}: {err}") from None


def parse_guidance(spec: str | None, **resources: Any) -> Guidance | None:
    """Builds a guidance from ``NAME[:value][,key=value...]``; ``"none"`` or "" gives None.

    Values parse as int, float, bool (``true``/``false``), None (``none``) or a string.
    Examples: ``"cfg:2.0"``, ``"interval:2,sigma_lo=0.28,sigma_hi=1.61"``,
    ``"apg:scale=3,eta=0,beta=-0.5,r=none"``, ``"ag:2,threshold=0.99"``. Methods listed in
    :data:`REQUIRES` also need Python callables, given here as keywords::

        parse_guidance("autoguidance:2", guide_denoise=small_denoise)
        parse_guidance("classifier:1,base=cond", log_prob_fn=noisy_classifier)

    Resources a method does not take are ignored, so a caller may pass all it has. On the
    command line :func:`jaxdiff.experiment.build_guidance` loads them (``guide=WORKDIR``,
    ``classifier=PATH``).

    Args:
        spec: the spec, or None / ``"none"`` / "" for no guidance.
        **resources: ``guide_denoise=``, ``log_prob_fn=``, ``logits_fn=`` callables.

    Raises:
        InvalidArgumentError: for an unknown name, a malformed spec, a bad or
            out-of-range argument, or a missing resource (the message says how to give it).
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    return build(*split_spec(spec), spec, **resources)


__all__ = [
    "GUIDANCE",
    "REQUIRES",
    "RESOURCES",
    "build",
    "parse_guidance",
    "parse_spec",
    "split_spec",
]
