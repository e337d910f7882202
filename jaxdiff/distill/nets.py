"""Builds the :class:`~jaxdiff.distill.fdistill.Nets` of a UNet teacher."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.diffusion.formulation import Formulation
from jaxdiff.distill.fdistill import FDistillConfig, Nets
from jaxdiff.distill.features import input_features, make_denoise_feats
from jaxdiff.distill.heads import DiscHead
from jaxdiff.distill.pool import init_pool, make_pool_spec


def make_unet_nets(
    model: nn.Module,
    formulation: Formulation,
    cfg: FDistillConfig,
    *,
    num_classes: int,
    sample_shape: tuple[int, ...],
    teacher_params_example: object,
    feature_names: Sequence[str] = ("enc0", "mid"),
    head_width: int = 32,
    teacher_guidance: float = 1.0,
) -> Nets:
    """The pure functions of a UNet run: student/fake and teacher share the architecture.

    Args:
        model: the teacher's UNet (also the generator's and fake score's).
        formulation: its formulation.
        cfg: the f-distill config (extractor, head form, pool).
        num_classes: classes (0 = unconditional); heads are conditional only if > 0.
        sample_shape: one sample's shape, e.g. ``(8, 8, 1)``.
        teacher_params_example: params (or their shapes) to trace the feature shapes.
        feature_names: UNet features the heads read (``enc{level}``, ``mid``).
        head_width: channels of each head branch.
        teacher_guidance: CFG scale of the teacher's ``x0`` (1 = none).
    """
    names = () if cfg.extractor == "input" else tuple(feature_names)
    student = make_denoise_feats(model, formulation, names, num_classes=num_classes)
    teacher = make_denoise_feats(
        model, formulation, names, guidance_scale=teacher_guidance, num_classes=num_classes
    )
    head = DiscHead(width=head_width, num_classes=num_classes, form=cfg.head_form)
    spec = make_pool_spec(cfg.num_heads, cfg.head_kinds, cfg.num_groups)
    x = jnp.zeros((2, *sample_shape), jnp.float32)
    sigma = jnp.ones((2,), jnp.float32)
    cond = jnp.zeros((2,), jnp.int32) if num_classes else None
    if names:
        feats = jax.eval_shape(lambda p: student(p, x, sigma, cond)[1], teacher_params_example)
        feats = [jnp.zeros(f.shape, f.dtype) for f in feats]
    else:
        feats = input_features(x, sigma, cfg.sigma_data)
    label = jnp.zeros((2,), jnp.float32)

    def init(key):
        return init_pool(head, key, cfg.num_heads, feats, label, cond)

    return Nets(student=student, teacher=teacher, head=head, pool_spec=spec, init_pool=init)


__all__ = ["make_unet_nets"]
