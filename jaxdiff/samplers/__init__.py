"""Samplers: one scan driver (:func:`sample`) and one solver per module."""

import inspect

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.samplers.ancestral import (
    DDIM,
    EulerAncestral,
    ancestral_split,
    ancestral_update,
    ddim,
    euler_ancestral,
)
from jaxdiff.samplers.base import (
    EvalState,
    Solver,
    batch_keys,
    normal_like,
    per_sample_normal,
    step_keys,
)
from jaxdiff.samplers.dpmpp_2m import DPMSolverPP2M, dpmpp_2m
from jaxdiff.samplers.driver import sample, sampling_dtype
from jaxdiff.samplers.edm_stochastic import EDMStochastic, edm_stochastic
from jaxdiff.samplers.euler import Euler, euler, euler_update
from jaxdiff.samplers.heun import Heun, heun, heun_update
from jaxdiff.samplers.inversion import (
    EDIT_MODES,
    check_inversion_solver,
    direct_inversion_edit,
    inversion_sigmas,
    invert,
    regenerate,
)
from jaxdiff.samplers.renoise import Renoise, renoise

SOLVERS = {
    "euler": euler,
    "heun": heun,
    "edm_stochastic": edm_stochastic,
    "ddim": ddim,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "renoise": renoise,
}
"""Solver factories by name (for the CLI)."""


def get_solver(name: str, *args, **kwargs) -> Solver:
    """Builds a solver by name, e.g. ``get_solver("ddim", eta=1.0)`` or ``("ddim", 1.0)``.

    Raises:
        InvalidArgumentError: for an unknown name, arguments the solver does not take, or
            an out-of-range value.
    """
    if name not in SOLVERS:
        raise InvalidArgumentError(
            f"unknown solver {name!r}: choose one of {', '.join(sorted(SOLVERS))}"
        )
    signature = inspect.signature(SOLVERS[name])
    try:
        signature.bind(*args, **kwargs)
    except TypeError as err:
        raise InvalidArgumentError(
            f"bad arguments for solver {name!r} ({err}): it takes "
            f"{', '.join(signature.parameters) or 'no arguments'}"
        ) from None
    return SOLVERS[name](*args, **kwargs)


__all__ = [
    "DDIM",
    "EDIT_MODES",
    "SOLVERS",
    "DPMSolverPP2M",
    "EDMStochastic",
    "Euler",
    "EulerAncestral",
    "EvalState",
    "Heun",
    "Renoise",
    "Solver",
    "ancestral_split",
    "ancestral_update",
    "batch_keys",
    "check_inversion_solver",
    "ddim",
    "direct_inversion_edit",
    "dpmpp_2m",
    "edm_stochastic",
    "euler",
    "euler_ancestral",
    "euler_update",
    "get_solver",
    "heun",
    "heun_update",
    "inversion_sigmas",
    "invert",
    "normal_like",
    "per_sample_normal",
    "regenerate",
    "renoise",
    "sample",
    "sampling_dtype",
    "step_keys",
]
