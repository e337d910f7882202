"""Samplers: one scan driver (:func:`sample`) and one solver per module."""

from jaxdiff.samplers.ancestral import DDIM, EulerAncestral, ancestral_split, ddim, euler_ancestral
from jaxdiff.samplers.base import (
    EvalState,
    Solver,
    normal_like,
    per_sample_normal,
    sample_keys,
    step_keys,
)
from jaxdiff.samplers.dpmpp_2m import DPMSolverPP2M, dpmpp_2m
from jaxdiff.samplers.driver import sample
from jaxdiff.samplers.edm_stochastic import EDMStochastic, edm_stochastic
from jaxdiff.samplers.euler import Euler, euler, euler_update
from jaxdiff.samplers.heun import Heun, heun, heun_update

SOLVERS = {
    "euler": euler,
    "heun": heun,
    "edm_stochastic": edm_stochastic,
    "ddim": ddim,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
}
"""Solver factories by name (for the CLI)."""


def get_solver(name: str, **kwargs) -> Solver:
    """Builds a solver by name, e.g. ``get_solver("ddim", eta=1.0)``.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: choose one of {sorted(SOLVERS)}")
    return SOLVERS[name](**kwargs)


__all__ = [
    "DDIM",
    "SOLVERS",
    "DPMSolverPP2M",
    "EDMStochastic",
    "Euler",
    "EulerAncestral",
    "EvalState",
    "Heun",
    "Solver",
    "ancestral_split",
    "ddim",
    "dpmpp_2m",
    "edm_stochastic",
    "euler",
    "euler_ancestral",
    "euler_update",
    "get_solver",
    "heun",
    "heun_update",
    "normal_like",
    "per_sample_normal",
    "sample",
    "sample_keys",
    "step_keys",
]
