"""Guidance methods: pure, swappable transforms of the denoiser (see :class:`Guidance`)."""

from jaxdiff.guidance.base import (
    Guidance,
    GuideOut,
    NoGuidance,
    StepCtx,
    batch_sigma,
    eval_branches,
    from_ho_salimans,
    per_sample,
    to_ho_salimans,
)
from jaxdiff.guidance.cfg import CFG, cfg
from jaxdiff.guidance.registry import GUIDANCE, parse_guidance

__all__ = [
    "CFG",
    "GUIDANCE",
    "Guidance",
    "GuideOut",
    "NoGuidance",
    "StepCtx",
    "batch_sigma",
    "cfg",
    "eval_branches",
    "from_ho_salimans",
    "parse_guidance",
    "per_sample",
    "to_ho_salimans",
]
