"""Minority guidance (Um et al., ICLR 2024): classifier guidance towards rare samples."""

from __future__ import annotations

import flax.struct
from jax.typing import ArrayLike

from jaxdiff.guidance.classifier import ClassifierGuidance, LogProbFn, _check


@flax.struct.dataclass
class MinorityGuidance(ClassifierGuidance):
    """Classifier guidance whose classifier predicts a quantized *minority score*.

    Same equation and API as :class:`~jaxdiff.guidance.ClassifierGuidance`:
    ``D_hat = D + s sigma^2 grad_x log p(l~ | x, sigma)``, with ``l~`` the target minority
    class (``target``, or the ``cond`` labels when None). What differs is the classifier
    ``log_prob_fn`` it expects:

    * The minority score of a clean sample is ``l(x0) = E[LPIPS(x0, D(x0 + sigma n))]``: how
      badly the model reconstructs it from a moderately noised version (the reference uses
      step 60 of 100 respaced steps and 5 draws). Rare, unusual samples reconstruct worse.
    * Scores over the training set are quantized into ``L`` quantile classes (the
      reference uses ``L = 100``; class ``L - 1`` = the most unusual 1%).
    * A noise-aware classifier ``p(l | x, sigma)`` is trained on noised training samples
      and those classes (the reference trains on frozen ADM-classifier features).
    * Sampling guides towards a high class: the reference README uses class 99 with
      scale 3.5 on LSUN-Bedroom, with an unconditional model (``base="uncond"``).

    Attributes:
        scale: ``s`` (scalar or ``[B]``).
        target: minority class ``l~`` (int or ``[B]``); None = the ``cond`` labels.
        log_prob_fn: static; the minority-score classifier ``(x, sigma, l) -> [B]``.
        base: static; conditioning the denoiser sees (``"uncond"`` or ``"cond"``).
    """

    scale: ArrayLike = 3.5
    what = "minority guidance"


def minority(
    scale: ArrayLike = 3.5,
    *,
    log_prob_fn: LogProbFn,
    target: ArrayLike | None = None,
    base: str = "uncond",
) -> MinorityGuidance:
    """Minority guidance towards minority-score class ``target``; see :class:`MinorityGuidance`.

    Defaults: scale 3.5 (the reference README's LSUN-Bedroom setting, with target 99 of
    100 classes); the denoiser sees ``uncond``. Costs 1 evaluation plus a classifier
    forward and backward pass per call.

    Reference: S. Um, S. Lee, J. C. Ye, "Don't Play Favorites: Minority Guidance for
    Diffusion Models", ICLR 2024 (``soobin-um/minority-guidance``).

    Args:
        scale: ``s``.
        log_prob_fn: the noise-aware minority-score classifier (required, keyword only).
        target: minority class to guide towards; None = the ``cond`` labels, which must
            then be integer class labels (checked when the sampler is traced).
        base: ``"uncond"`` or ``"cond"``.

    Raises:
        InvalidArgumentError: for a non-finite ``scale``, a ``log_prob_fn`` that is not
            callable, a negative or fractional ``target``, or another ``base``.
    """
    _check("minority guidance", scale, log_prob_fn, target, base)
    return MinorityGuidance(scale=scale, target=target, log_prob_fn=log_prob_fn, base=base)
