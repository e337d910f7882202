"""The composition layer: config in, runs out. The only code in jaxdiff that reads a config.

Everything below it (models, formulations, samplers, guidance, metrics, the train step,
checkpoints, the loop driver) takes explicit arguments; this package turns an
``ml_collections.ConfigDict`` into those objects and drives the runs:

* :func:`train_and_evaluate`, :func:`distill_and_evaluate`, :func:`train_classifier`:
  the runs behind ``python -m train`` (chosen by ``config.method``);
* :func:`load_run`: a trained run's config and one set of params, sharded onto any mesh;
* :func:`resolve_sampler`: the one sampler spec (solver, sigmas, guidance) from a run's
  ``config.sample`` plus overrides; :func:`build_guidance` for any guidance string;
* :func:`generate_samples`, :func:`hybrid_generate_samples`, :func:`sample_and_evaluate`:
  sampling and evaluation of loaded runs.
"""

import os
from typing import Any

import ml_collections

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.experiment.builders import PRECISIONS, Precision, build_precision
from jaxdiff.experiment.classifier import train_classifier, train_digits_classifier
from jaxdiff.experiment.distill import DISTILL_METHODS, distill_and_evaluate
from jaxdiff.experiment.evaluate import build_evaluator, evaluator_options, sample_and_evaluate
from jaxdiff.experiment.generation import (
    generate_fn,
    generate_samples,
    hybrid_generate_samples,
)
from jaxdiff.experiment.latents import latent_scaling, load_vae, run_vae
from jaxdiff.experiment.pretrained import load_pretrained_run
from jaxdiff.experiment.runs import TrainedModel, load_run
from jaxdiff.experiment.sampling import (
    SamplerSpec,
    build_guidance,
    build_solver,
    check_guidance_spec,
    parse_labels,
    resolve_sampler,
)
from jaxdiff.experiment.train import (
    Experiment,
    StepBundle,
    build_experiment,
    build_train_step,
    init_state,
    train_and_evaluate,
)

METHODS = {
    "train": train_and_evaluate,
    "distill": distill_and_evaluate,
    **{name: distill_and_evaluate for name in DISTILL_METHODS},
    "classifier": train_classifier,
}
"""``config.method`` -> the run it selects (``"train"`` when the key is absent)."""


def run_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Any:
    """Runs ``config`` in ``workdir`` with the driver its ``method`` names.

    Raises:
        InvalidArgumentError: for an unknown ``config.method``.
    """
    method = config.get("method", "train")
    if method not in METHODS:
        raise InvalidArgumentError(
            f"unknown config.method {method!r}: choose one of {sorted(METHODS)}"
        )
    return METHODS[method](config, workdir)


__all__ = [
    "METHODS",
    "PRECISIONS",
    "Experiment",
    "Precision",
    "StepBundle",
    "SamplerSpec",
    "TrainedModel",
    "build_evaluator",
    "evaluator_options",
    "build_experiment",
    "build_precision",
    "build_train_step",
    "build_guidance",
    "build_solver",
    "check_guidance_spec",
    "distill_and_evaluate",
    "generate_fn",
    "generate_samples",
    "hybrid_generate_samples",
    "init_state",
    "latent_scaling",
    "load_pretrained_run",
    "load_run",
    "load_vae",
    "parse_labels",
    "resolve_sampler",
    "run_experiment",
    "run_vae",
    "sample_and_evaluate",
    "train_and_evaluate",
    "train_classifier",
    "train_digits_classifier",
]
