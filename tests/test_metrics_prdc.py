"""Precision/recall and density/coverage on cases with known answers."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from jaxdiff.metrics import density_coverage, prdc, precision_recall
from jaxdiff.metrics.prdc import knn_radii, pairwise_distances


def _naive(real, fake, k_pr, k_dc):
    drr, dff, dfr = cdist(real, real), cdist(fake, fake), cdist(fake, real)
    r_pr = np.sort(drr, 1)[:, k_pr]
    f_pr = np.sort(dff, 1)[:, k_pr]
    r_dc = np.sort(drr, 1)[:, k_dc]
    return {
        "precision": np.mean((dfr <= r_pr[None]).any(1)),
        "recall": np.mean((dfr.T <= f_pr[None]).any(1)),
        "density": (dfr <= r_dc[None]).sum() / (k_dc * len(fake)),
        "coverage": np.mean(dfr.min(0) <= r_dc),
    }


def test_matches_a_brute_force_reference_with_small_chunks():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((120, 5)), rng.standard_normal((90, 5)) * 1.3 + 0.2
    got = prdc(real, fake, k_pr=3, k_dc=5, chunk_size=17)
    for name, value in _naive(real, fake, 3, 5).items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    np.testing.assert_allclose(pairwise_distances(real, fake, 7), cdist(real, fake), atol=1e-10)
    np.testing.assert_allclose(knn_radii(real, 2, 13), np.sort(cdist(real, real), 1)[:, 2])


def test_identical_sets():
    x = np.random.default_rng(1).standard_normal((300, 4))
    out = prdc(x, x.copy())
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0
    assert out["density"] >= 1.0  # every sample sits at its own ball's centre


def test_far_apart_sets_score_zero():
    rng = np.random.default_rng(2)
    real, fake = rng.standard_normal((200, 3)), rng.standard_normal((150, 3)) + 100.0
    assert prdc(real, fake) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_subset_relations():
    real = np.random.default_rng(3).standard_normal((400, 2))
    sub = real[real[:, 0] < -0.5]  # a subset (one region) only looks real...
    pr = precision_recall(real, sub)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.6
    pr = precision_recall(sub, real)  # ...and a superset covers all of the real set
    assert pr["recall"] == 1.0 and pr["precision"] < 1.0
    assert density_coverage(real, sub)["coverage"] < 0.5


def test_same_distribution_density_near_one_coverage_near_paper_value():
    rng = np.random.default_rng(4)
    out = density_coverage(rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8)))
    assert out["density"] == pytest.approx(1.0, abs=0.08)
    # Naeem et al.: for identical distributions and N = M, E[coverage] ~ 1 - 2^-k.
    assert out["coverage"] == pytest.approx(1 - 0.5**5, abs=0.015)


def test_bad_inputs():
    with pytest.raises(ValueError, match="k < number of points"):
        knn_radii(np.zeros((3, 2)), 3)
    with pytest.raises(ValueError, match=r"\[N > 0, D\]"):
        prdc(np.zeros((5,)), np.zeros((5, 1)))
