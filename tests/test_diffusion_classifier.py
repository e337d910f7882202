"""The zero-shot diffusion classifier on an exact class-conditional Gaussian mixture.

Class ``c`` is ``N(mu_c, S^2 I)`` with equal priors, so the Bayes classifier picks the
nearest mean, and the exact conditional denoiser is ``mu_c + S^2 / (S^2 + sigma^2)
(x - mu_c)``. With antithetic draws the class-dependent noise term cancels exactly, so
the diffusion classifier must *be* the Bayes classifier, through every elimination stage.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import EDM, get_formulation
from jaxdiff.metrics.diffusion_classifier import (
    DiffusionClassifier,
    _noise,
    classify,
    evaluation_levels,
    stage_levels,
)
from jaxdiff.parallel import batch_sharding, make_mesh, replicated
from jaxdiff.utils.rng import per_sample_keys

S = 0.6
MEANS = np.asarray(
    [[0.0, 0.0, 0.5], [1.0, 0.2, -0.3], [-0.8, 0.9, 0.1], [0.3, -1.0, 0.8], [0.9, 0.9, 0.9]],
    np.float32,
)


def exact_denoiser(x, sigma, labels):
    mu = jnp.asarray(MEANS)[labels]
    a = S**2 / (S**2 + sigma[:, None] ** 2)
    return mu + a * (x - mu)


def mixture(n, key=0):
    rng = np.random.default_rng(key)
    labels = rng.integers(0, len(MEANS), n)
    return (MEANS[labels] + S * rng.standard_normal((n, 3))).astype(np.float32), labels


def bayes(x):
    return np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)


def test_stage_levels_follow_the_upstream_subgrid_rule():
    assert [s.tolist() for s in stage_levels(8, (2, 8))] == [[2, 6], [0, 1, 3, 4, 5, 7]]
    assert [s.tolist() for s in stage_levels(12, (3, 6, 12))] == [
        [2, 6, 10],
        [1, 3, 5, 7, 9, 11],
        [0, 4, 8],
    ]
    levels = evaluation_levels(EDM(), 5)  # quantiles of the log-normal, ascending
    np.testing.assert_allclose(levels[2], np.exp(-1.2), rtol=1e-6)
    assert np.all(np.diff(levels) > 0)
    vp = evaluation_levels(get_formulation("vp"), 7)
    assert vp.shape == (7,) and np.all(np.diff(vp) > 0)
    with pytest.raises(ValueError, match="last keeps one class"):
        DiffusionClassifier(n_samples=(4, 8), to_keep=(3, 2))
    with pytest.raises(ValueError, match="even with antithetic"):
        DiffusionClassifier(trials=3, antithetic=True)


@pytest.mark.parametrize(
    "cfg",
    [
        DiffusionClassifier(n_samples=(6,), to_keep=(1,), trials=2, antithetic=True),
        DiffusionClassifier(n_samples=(2, 4, 8), to_keep=(3, 2, 1), trials=2, antithetic=True),
    ],
    ids=["one_stage", "adaptive"],
)
def test_antithetic_classifier_is_the_bayes_classifier(cfg):
    x, _ = mixture(400)
    levels = evaluation_levels(EDM(), cfg.num_levels)
    keys = per_sample_keys(jax.random.key(1), len(x))
    run = jax.jit(
        lambda x, k: classify(exact_denoiser, x, k, num_classes=5, levels=levels, cfg=cfg)
    )
    out = run(x, keys)
    np.testing.assert_array_equal(out["pred"], bayes(x))
    # Every class was scored at the first stage; the winner has the lowest final mean.
    assert np.isfinite(np.asarray(out["errors"])).all()


def test_errors_equal_a_float64_reference_and_shard():
    cfg = DiffusionClassifier(n_samples=(3,), to_keep=(1,), trials=2)
    x, _ = mixture(16, key=2)
    levels = evaluation_levels(EDM(), 3)
    keys = per_sample_keys(jax.random.key(3), len(x))
    out = classify(exact_denoiser, x, keys, num_classes=5, levels=levels, cfg=cfg)
    eps = np.stack([np.asarray(_noise(k, (3,), 3, cfg), np.float64) for k in keys])  # [B,L,T,3]
    sig = levels.astype(np.float64)[None, :, None, None]
    xn = x[:, None, None].astype(np.float64) + sig * eps
    want = np.zeros((len(x), 5))
    for c in range(5):
        a = S**2 / (S**2 + sig**2)
        d = MEANS[c] + a * (xn - MEANS[c])
        want[:, c] = (((xn - d) / sig - eps) ** 2).mean(-1).mean((1, 2))
    np.testing.assert_allclose(out["errors"], want, rtol=2e-5)
    np.testing.assert_array_equal(out["pred"], want.argmin(1))
    # Images split over the 8 test devices give the same answer.
    mesh = make_mesh()
    run = jax.jit(
        lambda x, k: classify(exact_denoiser, x, k, num_classes=5, levels=levels, cfg=cfg),
        in_shardings=(batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
    sharded = run(x, keys)
    np.testing.assert_array_equal(sharded["pred"], out["pred"])
    np.testing.assert_allclose(sharded["errors"], out["errors"], rtol=1e-6)
