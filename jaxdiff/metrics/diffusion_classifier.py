"""The zero-shot diffusion classifier: a class-conditional denoiser as a classifier.

Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier". A
class-conditional denoiser classifies an image ``x0`` by the class whose conditional
denoising error is lowest. For each class ``c`` the error is the epsilon-prediction MSE
averaged over noise levels and noise draws that all classes share,

    err(c) = mean_{l, j} mean_pixels((eps_lj - eps_hat(x0 + sigma_l eps_lj, sigma_l, c))^2),

with ``eps_hat = (x - D(x, sigma, c)) / sigma`` read from any jaxdiff denoiser, so
``argmin_c err(c)`` estimates ``argmax_c p(x0 | c)`` (the error is the ELBO's term up to
weights). Sharing the draws across classes is what makes the comparison precise: the
classes' errors differ by their means, not by independent noise.

**Levels** (:func:`evaluation_levels`): upstream evaluates DDPM timesteps on a uniform
grid, i.e. uniformly in the distribution the model was trained on; here the analogue for
any formulation is the grid of quantiles ``(i + 1/2) / L`` of its training noise levels
(closed form for EDM's log-normal), ascending.

**Adaptive elimination** (the paper's Algorithm 2, upstream ``eval_prob_adaptive``): stage
``s`` evaluates ``n_samples[s]`` levels of that grid (evenly spaced through it, skipping
levels already done), adds their errors to each remaining class's running mean, and keeps
the ``to_keep[s]`` classes with the lowest means; the last stage keeps one, the prediction.
Each stage is one batch of ``images x classes x levels x trials`` denoiser calls, so it
shards over all four.

``antithetic=True`` (a jaxdiff option, off by default) pairs every draw ``eps`` with
``-eps``: for an exact Gaussian denoiser the class-dependent cross term then cancels and
the classifier is exactly Bayes-optimal with any number of draws (the tests use this).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion.formulation import Denoiser, Formulation, expand_to

QUANTILE_DRAWS = 1 << 16
"""Draws of a formulation's training levels whose quantiles give the grid (no closed form)."""


def evaluation_levels(formulation: Formulation, num: int) -> np.ndarray:
    """``num`` ascending noise levels evenly spaced in the formulation's training distribution.

    The ``(i + 1/2) / num`` quantiles of its ``sample_sigma``: exact for a log-normal
    (EDM's ``p_mean``, ``p_std``), else estimated from :data:`QUANTILE_DRAWS` seeded draws.

    Raises:
        ValueError: for ``num < 1``.
    """
    if num < 1:
        raise ValueError(f"num={num} levels: need at least 1")
    q = (np.arange(num) + 0.5) / num
    if hasattr(formulation, "p_mean") and hasattr(formulation, "p_std"):
        z = np.asarray(jax.scipy.special.ndtri(q), np.float64)
        return np.exp(formulation.p_mean + formulation.p_std * z).astype(np.float32)
    draws = np.asarray(formulation.sample_sigma(jax.random.key(0), (QUANTILE_DRAWS,)))
    return np.quantile(draws.astype(np.float64), q).astype(np.float32)


def stage_levels(num_levels: int, n_samples: Sequence[int]) -> list[np.ndarray]:
    """Indices into the level grid that each stage adds (upstream's subgrid rule).

    Stage ``s`` takes ``n = n_samples[s]`` evenly spaced grid points, starting half a
    stride in (``grid[L // n // 2 :: L // n][:n]``), minus those an earlier stage did.
    """
    done: set[int] = set()
    out = []
    for n in n_samples:
        stride = max(num_levels // n, 1)
        picked = [i for i in range(stride // 2, num_levels, stride)][:n]
        new = [i for i in picked if i not in done]
        done.update(new)
        out.append(np.asarray(new, np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class DiffusionClassifier:
    """The schedule of the zero-shot classifier (hashable: static under ``jit``).

    Attributes:
        n_samples: levels evaluated by the end of each stage (the grid has
            ``max(n_samples)`` levels); one stage ``(L,)`` is the plain classifier.
        to_keep: classes kept after each stage, decreasing, the last 1.
        trials: noise draws per level (shared by all classes).
        antithetic: pair each draw with its negative (``trials`` must be even).
    """

    n_samples: tuple[int, ...] = (25,)
    to_keep: tuple[int, ...] = (1,)
    trials: int = 1
    antithetic: bool = False

    def __post_init__(self) -> None:
        if len(self.n_samples) != len(self.to_keep) or not self.n_samples:
            raise ValueError(
                f"n_samples={self.n_samples} and to_keep={self.to_keep} need one entry per stage"
            )
        if any(n < 1 for n in self.n_samples) or self.to_keep[-1] != 1:
            raise ValueError(
                f"every stage needs n_samples >= 1 and the last keeps one class, got "
                f"n_samples={self.n_samples}, to_keep={self.to_keep}"
            )
        if any(a < b for a, b in zip(self.to_keep, self.to_keep[1:], strict=False)):
            raise ValueError(f"to_keep={self.to_keep} must not increase from stage to stage")
        if self.trials < 1 or (self.antithetic and self.trials % 2):
            raise ValueError(f"trials={self.trials} must be >= 1 (and even with antithetic=True)")

    @property
    def num_levels(self) -> int:
        """Levels of the grid: the largest ``n_samples``."""
        return max(self.n_samples)


def _noise(key: jax.Array, shape: tuple[int, ...], levels: int, cfg: DiffusionClassifier):
    """``[levels, trials, *shape]`` draws of one image (antithetic pairs if asked)."""
    draws = cfg.trials // 2 if cfg.antithetic else cfg.trials
    eps = jax.random.normal(key, (levels, draws, *shape), jnp.float32)
    return jnp.concatenate([eps, -eps], axis=1) if cfg.antithetic else eps


def classify(
    denoise: Denoiser,
    x0: jax.Array,
    keys: jax.Array,
    *,
    num_classes: int,
    levels: Any,
    cfg: DiffusionClassifier,
) -> dict[str, jax.Array]:
    """Classifies ``x0`` with a class-conditional denoiser (pure; jit and shard it).

    Args:
        denoise: ``denoise(x, sigma[N], labels[N]) -> x0_hat``.
        x0: ``[B, ...]`` clean images in the model's data range.
        keys: ``[B]`` per-image keys (e.g. ``fold_in(key(seed), image index)``), so an
            image's draws do not depend on its batch.
        num_classes: classes ``0..num_classes-1`` to choose from.
        levels: the ``cfg.num_levels`` ascending levels of :func:`evaluation_levels`.
        cfg: the schedule.

    Returns:
        ``{"pred": [B] int32, "errors": [B, num_classes]}``: each class's mean error over
        the levels it was evaluated at (``inf`` for none; eliminated classes keep the mean
        at their elimination).

    Raises:
        ValueError: if ``levels`` is not ``cfg.num_levels`` long, or a stage would keep
            more classes than there are.
    """
    levels = np.asarray(levels, np.float32).reshape(-1)
    if levels.size != cfg.num_levels:
        raise ValueError(f"got {levels.size} levels, the schedule needs {cfg.num_levels}")
    if cfg.to_keep[0] > num_classes:
        raise ValueError(f"to_keep={cfg.to_keep} keeps more than the {num_classes} classes")
    b, shape = x0.shape[0], x0.shape[1:]
    x0 = jnp.asarray(x0, jnp.float32)
    noise = jax.vmap(lambda k: _noise(k, shape, levels.size, cfg))(keys)  # [B, L, T, ...]
    cands = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (b, num_classes))
    sums = jnp.zeros((b, num_classes), jnp.float32)
    counts = 0
    errors = jnp.full((b, num_classes), jnp.inf, jnp.float32)
    rows = jnp.arange(b)[:, None]
    for idx, keep in zip(stage_levels(levels.size, cfg.n_samples), cfg.to_keep, strict=True):
        k, n, t = cands.shape[1], idx.size, cfg.trials
        if n:
            eps = noise[:, idx]  # [B, n, T, ...]
            sig = jnp.asarray(levels[idx])
            x = x0[:, None, None] + expand_to(sig[None, :, None], eps) * eps
            x_all = jnp.broadcast_to(x[:, None], (b, k, n, t, *shape)).reshape(-1, *shape)
            s_all = jnp.broadcast_to(sig[None, None, :, None], (b, k, n, t)).reshape(-1)
            c_all = jnp.broadcast_to(cands[:, :, None, None], (b, k, n, t)).reshape(-1)
            d = denoise(x_all, s_all, c_all).astype(jnp.float32)
            eps_hat = (x_all - d) / expand_to(s_all, x_all)
            e_all = jnp.broadcast_to(eps[:, None], (b, k, n, t, *shape)).reshape(x_all.shape)
            err = jnp.mean(((e_all - eps_hat) ** 2).reshape(b, k, n * t, -1), axis=-1)
            sums = sums + jnp.sum(err, axis=-1)
            counts += n * t
        means = sums / counts
        errors = errors.at[rows, cands].set(means)
        order = jnp.argsort(means, axis=1, stable=True)[:, :keep]
        cands = jnp.take_along_axis(cands, order, axis=1)
        sums = jnp.take_along_axis(sums, order, axis=1)
    return {"pred": cands[:, 0], "errors": errors}


__all__ = [
    "QUANTILE_DRAWS",
    "DiffusionClassifier",
    "classify",
    "evaluation_levels",
    "stage_levels",
]
