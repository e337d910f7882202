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

__all__ = [
    "CFG",
    "Guidance",
    "GuideOut",
    "NoGuidance",
    "StepCtx",
    "batch_sigma",
    "cfg",
    "eval_branches",
    "from_ho_salimans",
    "per_sample",
    "to_ho_salimans",
]
