"""REPA from ``config.repa``: the model's projector fields and the loss term.

``config.repa`` (see ``train/configs/common.py``):

* ``weight``: REPA's ``proj_coeff`` lambda (0 = off: no projector, no term; the paper 0.5);
* ``layer``: the aligned activation: a UNet's ``"enc{level}"`` / ``"mid"``, a DiT's block
  count as a string (``"8"`` = after 8 blocks, REPA's ``encoder_depth``); ``""`` picks
  ``"enc1"`` (``"enc0"`` for a one-level UNet) or ``depth // 3`` (REPA: 4 of SiT-B's 12);
* ``hidden``: the projector's hidden width (REPA: 2048);
* ``encoder``: ``"digits_classifier"`` (the shipped digits classifier's ``[B, 4, 4, 32]``
  stage-1 map), ``"digits_classifier:STAGE"``, or the path of converted DINOv2 weights
  (``python -m jaxdiff.metrics.convert_dinov2``), whose patch tokens REPA aligns to.

Two halves, both needed: :func:`repa_model` adds the projector to the network (the run's
params then hold ``repa_projector``; sampling never runs it), and :func:`build_repa`
(registered as ``BUILDERS["repa"]`` in :mod:`jaxdiff.experiment.loss_terms`) builds the
:class:`~jaxdiff.training.repa.RepaTerm`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import ml_collections

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.models import DiT, UNet
from jaxdiff.training.repa import RepaEncoder, RepaTerm, classifier_encoder, dinov2_encoder
from jaxdiff.utils import storage

CLASSIFIER = "digits_classifier"
"""``config.repa.encoder`` naming the shipped digits classifier."""


def _weight(config: ml_collections.ConfigDict) -> float:
    if "repa" not in config:
        return 0.0
    weight = config.repa.get("weight", 0.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise InvalidArgumentError(
            f"config.repa.weight={weight!r}: use 0 (off) or a positive number (REPA's "
            "proj_coeff: 0.5), e.g. --config.repa.weight=0.5"
        )
    return float(weight)


@functools.lru_cache(maxsize=4)
def load_encoder(spec: str) -> RepaEncoder:
    """The encoder ``config.repa.encoder`` names (loaded once per process).

    Raises:
      InvalidArgumentError: For a missing weights file or a bad classifier stage.
    """
    name, _, stage = spec.partition(":")
    if name == CLASSIFIER:
        if stage and not stage.isdigit():
            raise InvalidArgumentError(
                f"config.repa.encoder={spec!r}: the stage after ':' must be a number, e.g. "
                f"'{CLASSIFIER}:1' (the 4x4x32 map)"
            )
        try:
            return classifier_encoder(int(stage or 1))
        except ValueError as e:
            raise InvalidArgumentError(f"config.repa.encoder={spec!r}: {e}") from e
    if not spec or not storage.isfile(spec):
        raise InvalidArgumentError(
            f"config.repa.encoder={spec!r} is neither {CLASSIFIER!r} nor a DINOv2 weights "
            "file: pass --config.repa.encoder=digits_classifier, or the file made by "
            "`python -m jaxdiff.metrics.convert_dinov2 --src dinov2_vitb14_pretrain.pth --dst F`"
        )
    return dinov2_encoder(spec)


def _layer(config: ml_collections.ConfigDict, model: nn.Module) -> dict:
    """The model's layer field (``repa_layer`` / ``repa_depth``) from ``config.repa.layer``."""
    layer = str(config.repa.get("layer", "") or "")
    if isinstance(model, UNet):
        levels = len(model.ch_mult)
        names = [f"enc{i}" for i in range(levels)] + ["mid"]
        layer = layer or f"enc{min(1, levels - 1)}"
        if layer not in names:
            raise InvalidArgumentError(
                f"config.repa.layer={layer!r} names no UNet activation: use one of {names}"
            )
        return {"repa_layer": layer}
    if isinstance(model, DiT):
        depth = layer or str(max(1, model.depth // 3))
        if not depth.isdigit() or not 1 <= int(depth) <= model.depth:
            raise InvalidArgumentError(
                f"config.repa.layer={layer!r}: for a DiT give the number of blocks before the "
                f"aligned tokens, 1..{model.depth} (REPA: 8 of 28), e.g. --config.repa.layer=2"
            )
        if model.scan_blocks:
            raise InvalidArgumentError(
                "REPA reads the tokens after one block, which scan_blocks hides: pass "
                "--config.model.scan_blocks=False"
            )
        return {"repa_depth": int(depth)}
    raise InvalidArgumentError(
        f"config.repa.weight > 0 but REPA supports the unet and dit models, not "
        f"{type(model).__name__}: pass --config.repa.weight=0"
    )


def repa_model(config: ml_collections.ConfigDict, model: nn.Module) -> nn.Module:
    """``model`` with REPA's projector fields when ``config.repa.weight > 0``, else itself.

    Raises:
      InvalidArgumentError: For a bad ``config.repa`` value or an unsupported model.
    """
    if _weight(config) == 0:
        return model
    hidden = config.repa.get("hidden", 2048)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise InvalidArgumentError(
            f"config.repa.hidden={hidden!r}: use a positive width (REPA: 2048)"
        )
    fields = _layer(config, model)
    encoder = load_encoder(str(config.repa.get("encoder", CLASSIFIER)))
    return model.clone(repa_dim=encoder.dim, repa_hidden=hidden, **fields)


def build_repa(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    num_classes: int,
    sample_shape: tuple[int, ...],
) -> RepaTerm | None:
    """REPA's loss term from ``config.repa`` (None when ``weight`` is 0).

    Raises:
      InvalidArgumentError: For a bad value, or a model built without the projector.
    """
    del num_classes
    weight = _weight(config)
    if weight == 0:
        return None
    encoder = load_encoder(str(config.repa.get("encoder", CLASSIFIER)))
    if getattr(model, "repa_dim", 0) != encoder.dim:
        raise InvalidArgumentError(
            f"config.repa.weight={weight} but the model has no REPA projector of width "
            f"{encoder.dim} (repa_dim={getattr(model, 'repa_dim', None)}): build it with "
            "jaxdiff.experiment.repa.repa_model(config, model)"
        )
    if len(sample_shape) != 3 or sample_shape[-1] not in (1, 3):
        raise InvalidArgumentError(
            f"REPA's encoder reads images, but this run trains on {tuple(sample_shape)} "
            "arrays (latents?): REPA needs [H, W, 1 or 3] images in the batch; pass "
            "--config.repa.weight=0"
        )
    return RepaTerm(weight=weight, encoder=encoder)


__all__ = ["CLASSIFIER", "build_repa", "load_encoder", "repa_model"]
