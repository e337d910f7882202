"""AdamW with linear warm-up, optional cosine decay and global-norm gradient clipping."""

from __future__ import annotations

import optax


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    grad_clip: float | None = 1.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Builds the optimizer used by every trainer.

    Args:
        learning_rate: peak learning rate.
        warmup_steps: linear warm-up from 0 over this many steps.
        decay_steps: if set, cosine decay to 0 by this step (counted from step 0).
        grad_clip: clip gradients to this global norm (None = no clipping).
        weight_decay: decoupled weight decay.
        b1: Adam's first-moment rate.
        b2: Adam's second-moment rate.
        eps: Adam's epsilon.

    Returns:
        An optax transformation.

    Raises:
        ValueError: for a non-positive learning rate or negative steps.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay_steps is not None:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, max(warmup_steps, 1), max(decay_steps, warmup_steps + 1)
        )
    elif warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    else:
        schedule = optax.constant_schedule(learning_rate)
    parts = [] if grad_clip is None else [optax.clip_by_global_norm(grad_clip)]
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
