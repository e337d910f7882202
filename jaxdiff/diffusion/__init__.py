"""The math of noise: formulations, preconditioning, conversions and sigma schedules."""

from jaxdiff.diffusion.conversions import (
    flow_t_to_sigma,
    logsnr_to_sigma,
    shift_flow_t,
    sigma_to_flow_t,
    sigma_to_logsnr,
    sigma_to_vp,
    vp_to_sigma,
)
from jaxdiff.diffusion.edm import EDM
from jaxdiff.diffusion.flow import FlowMatching
from jaxdiff.diffusion.formulation import Cond, Denoiser, Formulation, NetFn, Precond, expand_to
from jaxdiff.diffusion.schedules import (
    flow_sigmas,
    karras_sigmas,
    log_linear_sigmas,
    vp_sigmas,
)
from jaxdiff.diffusion.vp import VPEpsilon, VPrediction
from jaxdiff.diffusion.vp_schedules import (
    CosineVPSchedule,
    DiscreteVPSchedule,
    LinearVPSchedule,
    VPSchedule,
    get_vp_schedule,
)

FORMULATIONS = {
    "edm": EDM,
    "vp": VPEpsilon,
    "eps": VPEpsilon,
    "v": VPrediction,
    "flow": FlowMatching,
}
"""Formulation classes by name (for configs)."""


def get_formulation(name: str, **kwargs) -> Formulation:
    """Builds a formulation by name (``edm``, ``vp``/``eps``, ``v``, ``flow``).

    Args:
        name: the formulation's name.
        **kwargs: fields of the formulation dataclass; ``schedule`` may be a name
            (``"linear"``/``"cosine"``) for the VP formulations.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in FORMULATIONS:
        raise ValueError(f"unknown formulation {name!r}: choose one of {sorted(FORMULATIONS)}")
    if isinstance(kwargs.get("schedule"), str):
        kwargs["schedule"] = get_vp_schedule(kwargs["schedule"])
    return FORMULATIONS[name](**kwargs)


__all__ = [
    "EDM",
    "FORMULATIONS",
    "Cond",
    "CosineVPSchedule",
    "DiscreteVPSchedule",
    "Denoiser",
    "FlowMatching",
    "Formulation",
    "LinearVPSchedule",
    "NetFn",
    "Precond",
    "VPEpsilon",
    "VPSchedule",
    "VPrediction",
    "expand_to",
    "flow_sigmas",
    "flow_t_to_sigma",
    "get_formulation",
    "get_vp_schedule",
    "karras_sigmas",
    "log_linear_sigmas",
    "logsnr_to_sigma",
    "shift_flow_t",
    "sigma_to_flow_t",
    "sigma_to_logsnr",
    "sigma_to_vp",
    "vp_sigmas",
    "vp_to_sigma",
]
