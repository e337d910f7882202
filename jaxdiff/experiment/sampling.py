"""The one sampler spec: solver, sigmas and guidance resolved from ``config.sample``.

:func:`resolve_sampler` is the only place a run's ``config.sample`` becomes a solver, a
noise schedule and a guidance. ``python -m sample``, the progress grids, in-loop
evaluation and ``sample_and_evaluate`` all call it, so every guidance method (autoguidance
with ``guide=WORKDIR`` and the classifier methods with ``classifier=PATH`` included) is
reachable the same way from the command line, from ``config.sample`` and in training.

A few-step distilled student stores its own recipe in ``config.sample``: its solver
(``"renoise"`` for f-distill, consistency and sCM students, ``"euler"`` for progressive
distillation, ``"meanflow"`` for MeanFlow) and ``sigmas``, the K levels it was trained at
(:func:`student_sample_recipe`). With its own solver :func:`resolve_sampler` samples at
those levels, ``k <= K`` steps at ``k`` of them
(:func:`jaxdiff.distill.few_step.level_indices`), never at others; another solver
(``--solver=heun``) samples over Karras levels as for every run. Students saved before
they stored the recipe get it from their ``distill_config`` (:func:`with_student_recipe`,
applied by ``load_run``).

A guidance-distilled student (``sample.guidance_input = "aux_time"``) takes the CFG scale
as a network input: ``--guidance=cfg:W`` becomes ``aux_time = aux_scale * W`` in one
evaluation per step (``none`` is ``W = 1``, the conditional model), in
:attr:`SamplerSpec.model_kwargs`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.distill.few_step import level_indices, student_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import Guidance
from jaxdiff.guidance.registry import REQUIRES, parse_guidance, parse_spec
from jaxdiff.samplers import Solver, get_solver
from jaxdiff.utils import storage

GUIDE_KEYS = ("guide", "guide_ema", "classifier")
"""Spec keys resolved here into callables: a guiding run's workdir and EMA, a classifier."""

RENOISE = "renoise"
"""The few-step students' solver: denoise, then re-noise with fresh noise at the next level."""

FEW_STEP_METHODS = ("distill", "fdistill")
"""``distill_config.method`` of runs whose students sample with the re-noising recipe."""

MEANFLOW = "meanflow"
"""MeanFlow students' sampler: jumps ``z_r = z_t - (t - r) u(z_t, r, t)`` between its
stored levels (not a denoiser solver; :mod:`jaxdiff.experiment.generation` runs it)."""

GUIDANCE_INPUT = "aux_time"
"""``config.sample.guidance_input`` of a guidance-distilled student: CFG's scale is fed to
the network as ``aux_time``."""


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
        trained_levels: a few-step student's K trained levels when ``sigmas`` are chosen
            from them (its stored recipe), else None (Karras levels).
        model_kwargs: static keyword arguments of the network's apply (a guidance-distilled
            student's ``aux_time``).
    """

    solver: Solver
    sigmas: np.ndarray
    guidance: Guidance | None
    solver_spec: str
    guidance_spec: str
    rho: float
    trained_levels: np.ndarray | None = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def solver_name(self) -> str:
        """The solver's name without its arguments, e.g. ``"renoise"``."""
        return solver_name(self.solver_spec)

    @property
    def steps(self) -> int:
        """Number of solver steps."""
        return len(self.sigmas) - 1

    def describe(self) -> str:
        """One line naming everything that decides the samples."""
        if self.trained_levels is not None:
            used = ", ".join(f"{v:.4g}" for v in self.sigmas[:-1])
            trained = ", ".join(f"{v:.4g}" for v in self.trained_levels)
            which = (
                f"the student's trained levels {trained}"
                if self.steps == len(self.trained_levels)
                else f"levels {used} of the student's trained {trained}"
            )
            fresh = "; fresh noise between steps" if self.solver.stochastic else ""
            return (
                f"solver {self.solver_spec}, {self.steps} steps ({which}{fresh}), "
                f"guidance {self.guidance_spec}"
            )
        return (
            f"solver {self.solver_spec}, {self.steps} steps (Karras sigmas "
            f"{self.sigmas[0]:g} -> {self.sigmas[-2]:g}, rho {self.rho:g}), "
            f"guidance {self.guidance_spec}"
        )


def build_solver(spec: str) -> Solver:
    """A solver from ``NAME[:key=value,...]``, e.g. ``"heun"`` or ``"ddim:eta=1"``.

    ``"meanflow"`` gives the Euler solver as a stand-in (a MeanFlow student's jumps are
    Euler steps of its denoiser with ``aux_time``; :mod:`jaxdiff.experiment.generation`
    runs them).

    Raises:
        InvalidArgumentError: for an unknown solver or bad arguments.
    """
    name, args, kwargs = parse_spec(spec)
    if name == MEANFLOW and not args and not kwargs:
        return get_solver("euler")
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


CLASSIFIER_RESOURCES = frozenset({"log_prob_fn", "logits_fn", "features_fn"})
"""Guidance resources that come from a classifier file (``classifier=PATH``)."""


def _classifier_fns(path: str | None) -> dict[str, Any]:
    from jaxdiff.metrics.classifier import load_classifier, noisy_classifier_inputs

    clf = load_classifier(path)

    def logits_fn(x0):
        return clf.logits(x0)

    def log_prob_fn(x, sigma, y):
        x_in, label = noisy_classifier_inputs(x, sigma)
        logp = jax.nn.log_softmax(clf.logits(x_in, label))
        return jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=1)[:, 0]

    fns = {"logits_fn": logits_fn, "features_fn": clf.features}
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
    uses_classifier = bool(CLASSIFIER_RESOURCES & needs)
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
    * ``elucd:...``, ``gfcg:...`` and ``vendi:...`` (its feature network) use a clean
      classifier on x0; ``classifier=PATH``
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
    if CLASSIFIER_RESOURCES & needs:
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

    A few-step student (``config.sample.sigmas`` = its K trained levels) with the
    ``renoise`` solver samples as trained: ``k`` steps (default K) at ``k`` of its levels,
    evenly spaced, always starting at the first
    (:func:`jaxdiff.distill.few_step.level_indices`). Any other solver uses Karras levels.

    Args:
        sample_config: the run's ``config.sample`` (``solver``, ``steps``, ``sigma_min``,
            ``sigma_max``, ``rho``, ``guidance``; a student's ``sigmas``).
        num_classes: the model's classes; an unconditional model samples unguided.
        solver: overrides ``config.sample.solver`` (``NAME[:key=value,...]``).
        steps: overrides ``config.sample.steps`` (>= 1; at most K for a student's recipe).
        guidance: overrides ``config.sample.guidance`` (``"none"`` for no guidance).

    Raises:
        InvalidArgumentError: for a bad solver, step count or guidance, or more steps
            than a student's trained levels (the message names K).
    """
    sc = sample_config
    solver_spec = str(sc.solver if solver is None else solver)
    num_steps = int(sc.steps if steps is None else steps)
    if num_steps < 1:
        raise InvalidArgumentError(
            f"steps must be >= 1, got {num_steps}: pass --steps=N (e.g. 18), or leave it out "
            "to use the run's config.sample.steps"
        )
    built_solver = build_solver(solver_spec)
    guidance_spec = str(sc.guidance if guidance is None else guidance)
    model_kwargs = {}
    if sc.get("guidance_input") == GUIDANCE_INPUT:
        built, scale = None, _distilled_scale(guidance_spec)
        model_kwargs["aux_time"] = float(sc.get("aux_scale", 1.0)) * scale
        guidance_spec = f"cfg:{scale:g} (the student's input, one evaluation a step)"
    else:
        built = build_guidance(guidance_spec)
    if built is not None and num_classes == 0:
        built, guidance_spec = None, "none (unconditional model)"
    elif built is None and not model_kwargs:
        guidance_spec = "none"
    trained = sc.get("sigmas")
    name = solver_name(solver_spec)
    if name == MEANFLOW and trained is None:
        raise InvalidArgumentError(
            "solver 'meanflow' samples a MeanFlow student at its stored levels, and this "
            "run has none (config.sample.sigmas): pass --solver=heun (or euler) instead"
        )
    if trained is not None and name == solver_name(str(sc.solver)):
        trained = np.asarray(trained, np.float32).reshape(-1)
        sigmas = _trained_schedule(trained, num_steps)
    else:
        trained = None
        sigmas = karras_sigmas(num_steps, sc.sigma_min, sc.sigma_max, sc.rho)
    return SamplerSpec(
        solver=built_solver,
        sigmas=np.asarray(sigmas, np.float32),
        guidance=built,
        solver_spec=solver_spec,
        guidance_spec=guidance_spec,
        rho=float(sc.rho),
        trained_levels=trained,
        model_kwargs=model_kwargs,
    )


def solver_name(spec: str) -> str:
    """The name of a ``NAME[:key=value,...]`` solver spec, lower-cased."""
    return spec.partition(":")[0].strip().lower()


def _distilled_scale(spec: str) -> float:
    """The CFG scale a guidance-distilled student is asked for: ``cfg:W`` or ``none`` (1)."""
    name, args, kwargs = parse_spec(spec)
    if name == "none":
        return 1.0
    values = [*args, *kwargs.values()]
    if name != "cfg" or len(values) != 1:
        raise InvalidArgumentError(
            f"guidance {spec!r} on a guidance-distilled student: it has CFG built in and "
            "takes only --guidance=cfg:W (W its scale, one evaluation a step) or "
            "--guidance=none (W = 1)"
        )
    try:
        return float(values[0])
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"guidance {spec!r}: the scale must be a number") from None


def _trained_schedule(levels: np.ndarray, num_steps: int) -> np.ndarray:
    """``num_steps`` of a student's trained ``levels`` (the level_indices rule), then 0."""
    if num_steps > levels.size:
        shown = ", ".join(f"{v:.4g}" for v in levels)
        raise InvalidArgumentError(
            f"steps={num_steps}, but this student was trained at K={levels.size} levels "
            f"({shown}): pass --steps=1..{levels.size} (that many of its levels), or an ODE "
            "solver such as --solver=heun to sample it over Karras levels instead"
        )
    return np.append(levels[level_indices(levels.size, num_steps)], 0.0)


def student_sample_recipe(levels: Any) -> dict[str, Any]:
    """The ``config.sample`` entries of a few-step student trained at ``levels``.

    ``{"solver": "renoise", "steps": K, "sigmas": [K levels], "guidance": "none"}``: the
    levels are stored as float32 values, so sampling uses exactly the training levels.
    """
    values = [float(v) for v in np.asarray(levels, np.float32).reshape(-1)]
    return {"solver": RENOISE, "steps": len(values), "sigmas": values, "guidance": "none"}


def trained_levels(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """A few-step student's trained levels, or None for a run that is not one.

    ``config.sample.sigmas`` where stored; for a student saved before students stored
    them, the same levels derived from its ``distill_config`` (``distill.student_steps``
    on the ``config.sample`` sigma range, as distillation chose them).
    """
    if config.sample.get("sigmas") is not None:
        return np.asarray(config.sample.sigmas, np.float32).reshape(-1)
    d = config.get("distill_config")
    if d is None or d.get("method") not in FEW_STEP_METHODS:
        return None
    num = d.get("distill", {}).get("student_steps")
    if num is None:
        return None
    sc = config.sample
    return np.asarray(student_sigmas(int(num), sc.sigma_min, sc.sigma_max, sc.rho), np.float32)


def with_student_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the sampling recipe of an old student filled in (else unchanged).

    Students saved before the recipe was stored carry ``solver = "euler"`` and no
    ``sample.sigmas``; their levels come from :func:`trained_levels`, so they sample as
    they were trained, like new students.
    """
    if config.sample.get("sigmas") is not None:
        return config
    levels = trained_levels(config)
    if levels is not None:
        for key, value in student_sample_recipe(levels).items():
            config.sample[key] = value
    return config


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
    "FEW_STEP_METHODS",
    "RENOISE",
    "SamplerSpec",
    "build_guidance",
    "build_solver",
    "parse_labels",
    "resolve_sampler",
    "student_sample_recipe",
    "trained_levels",
    "with_student_recipe",
]
