"""The one sampler spec: solver, sigmas and guidance resolved from ``config.sample``.

:func:`resolve_sampler` is the only place a run's ``config.sample`` becomes a solver, a
noise schedule and a guidance. ``python -m sample``, the progress grids, in-loop
evaluation and ``sample_and_evaluate`` all call it, so every guidance method (autoguidance
with ``guide=WORKDIR`` and the classifier methods with ``classifier=PATH`` included) is
reachable the same way from the command line, from ``config.sample`` and in training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import Guidance
from jaxdiff.guidance.registry import REQUIRES, parse_guidance, parse_spec
from jaxdiff.samplers import Solver, get_solver
from jaxdiff.utils import storage

GUIDE_KEYS = ("guide", "guide_ema", "classifier")
"""Spec keys resolved here into callables: a guiding run's workdir and EMA, a classifier."""


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample: a solver, its noise levels and a guidance (or None).

    Attributes:
        solver: the solver.
        sigmas: ``[steps + 1]`` decreasing noise levels (host array, ending in 0).
        guidance: the guidance, or None for the plain denoiser.
        solver_spec: the solver as text, e.g. ``"heun"`` or ``"ddim:eta=1"``.
        guidance_spec: the guidance as text, e.g. ``"cfg:2.0"`` or ``"none"``.
        rho: the Karras schedule's warping.
    """

    solver: Solver
    sigmas: np.ndarray
    guidance: Guidance | None
    solver_spec: str
    guidance_spec: str
    rho: float

    @property
    def steps(self) -> int:
        """Number of solver steps."""
        return len(self.sigmas) - 1

    def describe(self) -> str:
        """One line naming everything that decides the samples."""
        return (
            f"solver {self.solver_spec}, {self.steps} steps (Karras sigmas "
            f"{self.sigmas[0]:g} -> {self.sigmas[-2]:g}, rho {self.rho:g}), "
            f"guidance {self.guidance_spec}"
        )


def build_solver(spec: str) -> Solver:
    """A solver from ``NAME[:key=value,...]``, e.g. ``"heun"`` or ``"ddim:eta=1"``.

    Raises:
        InvalidArgumentError: for an unknown solver or bad arguments.
    """
    name, args, kwargs = parse_spec(spec)
    return get_solver(name, *args, **kwargs)


def _pop_keys(spec: str, keys: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    head, _, rest = spec.partition(":")
    keep, popped = [], {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if eq and key.strip() in keys:
            popped[key.strip()] = value.strip()
        else:
            keep.append(item)
    return head + (":" + ",".join(keep) if keep else ""), popped


def _classifier_fns(path: str | None) -> dict[str, Any]:
    from jaxdiff.metrics.classifier import load_classifier, noisy_classifier_inputs

    clf = load_classifier(path)

    def logits_fn(x0):
        return clf.logits(x0)

    def log_prob_fn(x, sigma, y):
        x_in, label = noisy_classifier_inputs(x, sigma)
        logp = jax.nn.log_softmax(clf.logits(x_in, label))
        return jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1)[:, 0]

    fns = {"logits_fn": logits_fn}
    if clf.model.noise_conditioned:  # only a noise-aware classifier can judge noisy x
        fns["log_prob_fn"] = log_prob_fn
    return fns


def check_guidance_spec(spec: str) -> tuple[str, dict[str, str], set[str]]:
    """Validates a guidance string without loading anything, so bad input fails at once.

    Checks the method name, its keys and value ranges (by building it with stand-in
    callables), that ``guide=`` is given where needed and names a run with checkpoints,
    and that a ``classifier=`` file exists.

    Returns:
        ``(spec without the loader keys, the loader keys, the resources it needs)``.

    Raises:
        InvalidArgumentError: naming the bad part of ``spec`` and the fix.
    """
    rest, keys = _pop_keys(spec, GUIDE_KEYS)
    name = rest.partition(":")[0].strip().lower()
    needs = set(REQUIRES.get(name, ()))
    uses_classifier = bool({"log_prob_fn", "logits_fn"} & needs)
    used = ({"guide", "guide_ema"} if "guide_denoise" in needs else set()) | (
        {"classifier"} if uses_classifier else set()
    )
    stray = sorted(set(keys) - used)
    if stray:
        raise InvalidArgumentError(
            f"{spec!r}: {name} takes no {', '.join(k + '=' for k in stray)} argument: remove it"
        )
    if "guide_denoise" in needs and "guide" not in keys:
        raise InvalidArgumentError(
            f"{spec!r}: autoguidance needs the guiding run, e.g. "
            "'autoguidance:2.0,guide=runs/digits_small'"
        )
    guide = keys.get("guide")
    if guide is not None and guide.lower().endswith(".safetensors"):
        if not storage.isfile(guide):
            raise InvalidArgumentError(f"{spec!r}: guide={guide} does not exist")
    elif guide is not None and not storage.isdir(storage.join(guide, "checkpoints")):
        raise InvalidArgumentError(
            f"{spec!r}: guide={guide} holds no checkpoints/: pass the workdir of a trained "
            "run or a converted .safetensors network"
        )
    path = keys.get("classifier")
    if path is not None and not storage.isfile(path):
        raise InvalidArgumentError(f"{spec!r}: classifier file {path} does not exist")
    parse_guidance(rest, **{r: _stand_in for r in needs})  # names, keys and value ranges
    return rest, keys, needs


def _stand_in(*args: Any, **kwargs: Any) -> None:
    """A callable that is never called: lets a spec be range-checked before loading."""
    raise AssertionError("a stand-in resource was called")


def build_guidance(spec: str | None) -> Guidance | None:
    """Builds any guidance from its text form, loading what it needs from disk.

    Beyond :func:`jaxdiff.guidance.parse_guidance`:

    * ``autoguidance:2.0,guide=WORKDIR`` loads the weaker guiding model from another
      run's workdir (``guide_ema=RATE|none`` picks its params) or from a converted
      published network (``guide=edm2-img512-xs.safetensors``);
    * ``classifier:1.0,classifier=PATH`` and ``minority:...,classifier=PATH`` use a
      noise-aware classifier file (``--config.noise_aware=True`` of the classifier
      trainer, ``train/configs/digits_classifier.py``);
    * ``elucd:...`` and ``gfcg:...`` use a clean classifier on x0; ``classifier=PATH``
      defaults to the shipped digits classifier.

    Raises:
        InvalidArgumentError: for an unknown method, bad arguments, a missing ``guide=``
            or a classifier that cannot serve the method.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    rest, keys, needs = check_guidance_spec(spec)
    resources: dict[str, Any] = {}
    if "guide_denoise" in needs:
        from jaxdiff.experiment.runs import load_run
        from jaxdiff.generate import model_denoiser

        ema = keys.get("guide_ema", "default")
        bad = load_run(keys["guide"], ema=None if ema == "none" else ema)
        resources["guide_denoise"] = model_denoiser(bad.model, bad.formulation, bad.params)
    if {"log_prob_fn", "logits_fn"} & needs:
        resources.update(_classifier_fns(keys.get("classifier")))
        if "log_prob_fn" in needs and "log_prob_fn" not in resources:
            raise InvalidArgumentError(
                f"{spec!r} needs a noise-aware classifier: train one with `python -m train "
                "--config=train/configs/digits_classifier.py --config.noise_aware=True "
                "--workdir=runs/clf`, then add classifier=runs/clf/classifier.npz"
            )
    return parse_guidance(rest, **resources)


def resolve_sampler(
    sample_config: ml_collections.ConfigDict,
    *,
    num_classes: int,
    solver: str | None = None,
    steps: int | None = None,
    guidance: str | None = None,
) -> SamplerSpec:
    """The sampler of a run: its stored ``config.sample`` unless an override is given.

    Args:
        sample_config: the run's ``config.sample`` (``solver``, ``steps``, ``sigma_min``,
            ``sigma_max``, ``rho``, ``guidance``).
        num_classes: the model's classes; an unconditional model samples unguided.
        solver: overrides ``config.sample.solver`` (``NAME[:key=value,...]``).
        steps: overrides ``config.sample.steps`` (>= 1).
        guidance: overrides ``config.sample.guidance`` (``"none"`` for no guidance).

    Raises:
        InvalidArgumentError: for a bad solver, step count or guidance.
    """
    sc = sample_config
    solver_spec = str(sc.solver if solver is None else solver)
    num_steps = int(sc.steps if steps is None else steps)
    if num_steps < 1:
        raise InvalidArgumentError(
            f"steps must be >= 1, got {num_steps}: pass --steps=N (e.g. 18), or leave it out "
            "to use the run's config.sample.steps"
        )
    guidance_spec = str(sc.guidance if guidance is None else guidance)
    built = build_guidance(guidance_spec)
    if built is not None and num_classes == 0:
        built, guidance_spec = None, "none (unconditional model)"
    elif built is None:
        guidance_spec = "none"
    sigmas = np.asarray(karras_sigmas(num_steps, sc.sigma_min, sc.sigma_max, sc.rho), np.float32)
    return SamplerSpec(
        solver=build_solver(solver_spec),
        sigmas=sigmas,
        guidance=built,
        solver_spec=solver_spec,
        guidance_spec=guidance_spec,
        rho=float(sc.rho),
    )


def parse_labels(spec: str | None, num: int, num_classes: int) -> np.ndarray:
    """Labels for ``num`` samples: ``None``/"cycle" cycles the classes, "3" or "0,1,7" repeats.

    Raises:
        InvalidArgumentError: for labels outside ``[0, num_classes]`` (``num_classes`` =
            null class) or that are not integers.
    """
    if num_classes == 0:
        return np.zeros(num, np.int32)
    if spec in (None, "", "cycle"):
        return (np.arange(num) % num_classes).astype(np.int32)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"--labels must be integers like '0,1,7', got {spec!r}") from err
    if not values or min(values) < 0 or max(values) > num_classes:
        raise InvalidArgumentError(
            f"labels {spec!r} out of range: use 0..{num_classes - 1} ({num_classes} = null class)"
        )
    return np.resize(np.asarray(values, np.int32), num)


__all__ = [
    "SamplerSpec",
    "build_guidance",
    "build_solver",
    "parse_labels",
    "resolve_sampler",
]
