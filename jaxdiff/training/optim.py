"""AdamW with linear warm-up, a learning-rate schedule and global-norm gradient clipping."""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant", "inverse_sqrt")
"""Learning-rate schedules :func:`make_optimizer` builds (after the linear warm-up)."""


def inverse_sqrt_schedule(
    learning_rate: float, warmup_steps: int, ref_steps: int
) -> optax.Schedule:
    """EDM2's schedule: ``lr * min(step / warmup, 1) / sqrt(max(step / ref_steps, 1))``.

    ``step`` is optax's update count, i.e. the updates done before this one, as EDM2's
    ``cur_nimg / batch_size``; so the first update uses a learning rate of 0 with a warm-up,
    as in EDM2. EDM2's ``ref_batches`` (70k for ImageNet-512, 35k for ImageNet-64) is
    ``ref_steps`` directly (its decay starts at ``ref_batches * batch_size`` images), and its
    warm-up of ``rampup_Mimg`` million images is ``warmup_steps = rampup_Mimg * 1e6 /
    batch_size`` (10 Mimg at batch 2048: 4883 steps).
    """

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        lr = learning_rate / jnp.sqrt(jnp.maximum(t / ref_steps, 1.0))
        if warmup_steps > 0:
            lr = lr * jnp.minimum(t / warmup_steps, 1.0)
        return lr

    return schedule


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    schedule: str = "cosine",
    grad_clip: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Builds the optimizer used by every trainer.

    EDM2's recipe is ``schedule="inverse_sqrt"`` with ``b2=0.99``, ``eps=1e-8``, no weight
    decay (and, unlike EDM2, jaxdiff's default gradient clipping unless ``grad_clip=None``).

    Args:
        learning_rate: peak learning rate.
        warmup_steps: linear warm-up from 0 over this many steps.
        decay_steps: ``"cosine"``: decay to 0 by this step (counted from step 0), None = no
            decay (a constant rate after the warm-up); ``"inverse_sqrt"``: the reference
            step ``t_ref`` after which the rate falls as ``1 / sqrt(step / t_ref)``
            (required); ``"constant"``: must be None.
        schedule: one of :data:`SCHEDULES`.
        grad_clip: clip gradients to this global norm (None = no clipping).
        weight_decay: decoupled weight decay.
        b1: Adam's first-moment rate.
        b2: Adam's second-moment rate.
        eps: Adam's epsilon.

    Returns:
        An optax transformation.

    Raises:
        ValueError: for a non-positive learning rate, negative steps, an unknown schedule, or
            ``decay_steps`` missing (inverse_sqrt), given (constant) or below 1.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if decay_steps is not None and decay_steps < 1:
        raise ValueError(f"decay_steps must be >= 1 (or None), got {decay_steps}")
    if schedule == "inverse_sqrt" and decay_steps is None:
        raise ValueError("schedule 'inverse_sqrt' needs decay_steps (its reference step t_ref)")
    if schedule == "constant" and decay_steps is not None:
        raise ValueError(f"schedule 'constant' does not decay: got decay_steps={decay_steps}")
    if schedule == "inverse_sqrt":
        lr_schedule = inverse_sqrt_schedule(learning_rate, warmup_steps, decay_steps)
    elif decay_steps is not None:
        lr_schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), max(decay_steps, warmup_steps + 1)
        )
    elif warmup_steps > 0:
        lr_schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    else:
        lr_schedule = optax.constant_schedule(learning_rate)
    parts = [] if grad_clip is None else [optax.clip_by_global_norm(grad_clip)]
    parts.append(optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
