"""Guidance methods: pure, swappable transforms of the denoiser (see :class:`Guidance`).

See ``docs/guidance.md`` for the table of methods, costs and the composition design.
"""

from jaxdiff.guidance.ag import AdaptiveGuidance, AGState, ag
from jaxdiff.guidance.apg import APG, APGState, apg
from jaxdiff.guidance.autoguidance import Autoguidance, autoguidance
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
from jaxdiff.guidance.cfg_zero_star import CFGZeroStar, cfg_zero_star
from jaxdiff.guidance.cfgpp import CFGPlusPlus, cfgpp
from jaxdiff.guidance.classifier import ClassifierGuidance, classifier_guidance
from jaxdiff.guidance.elucd import EluCD, calibrated_log_likelihood, elucd
from jaxdiff.guidance.gfcg import GFCG, gfcg, reference_class
from jaxdiff.guidance.interval import Interval, interval, interval_from_steps, within_interval
from jaxdiff.guidance.minority import MinorityGuidance, minority
from jaxdiff.guidance.negtome import NegToMe, negtome
from jaxdiff.guidance.perturbed import PerturbedGuidance, pag, slg
from jaxdiff.guidance.registry import GUIDANCE, REQUIRES, parse_guidance, parse_spec
from jaxdiff.guidance.rescale import CFGRescale, rescale
from jaxdiff.guidance.spaces import SPACES, from_space, to_space
from jaxdiff.guidance.switch import cond_guidance
from jaxdiff.guidance.vendi import (
    VendiBank,
    VendiGuidance,
    bank_add,
    bank_from_features,
    vendi,
    vendi_entropy,
    vendi_score,
)

__all__ = [
    "APG",
    "CFG",
    "GFCG",
    "GUIDANCE",
    "REQUIRES",
    "SPACES",
    "AGState",
    "APGState",
    "AdaptiveGuidance",
    "Autoguidance",
    "CFGPlusPlus",
    "CFGRescale",
    "CFGZeroStar",
    "ClassifierGuidance",
    "EluCD",
    "Guidance",
    "GuideOut",
    "Interval",
    "MinorityGuidance",
    "NegToMe",
    "NoGuidance",
    "PerturbedGuidance",
    "StepCtx",
    "VendiBank",
    "VendiGuidance",
    "ag",
    "apg",
    "autoguidance",
    "bank_add",
    "bank_from_features",
    "batch_sigma",
    "calibrated_log_likelihood",
    "cfg",
    "cfg_zero_star",
    "cfgpp",
    "classifier_guidance",
    "cond_guidance",
    "elucd",
    "eval_branches",
    "from_ho_salimans",
    "from_space",
    "gfcg",
    "interval",
    "interval_from_steps",
    "minority",
    "negtome",
    "pag",
    "parse_guidance",
    "parse_spec",
    "per_sample",
    "reference_class",
    "rescale",
    "slg",
    "to_ho_salimans",
    "to_space",
    "vendi",
    "vendi_entropy",
    "vendi_score",
    "within_interval",
]
