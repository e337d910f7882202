"""Frechet distance against closed forms, statistics, and the .npz statistics files."""

import numpy as np
import pytest
import scipy.linalg

from jaxdiff.metrics import (
    ChecksumMismatchError,
    feature_statistics,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from jaxdiff.metrics.weights import file_sha256


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def _commuting(d, seed, l1, l2):
    q = _rotation(d, seed)
    return (q * l1) @ q.T, (q * l2) @ q.T


def _closed_form(mu1, mu2, l1, l2):
    return np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)


def test_commuting_covariances_match_the_closed_form():
    rng = np.random.default_rng(0)
    d = 32
    l1, l2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    s1, s2 = _commuting(d, 1, l1, l2)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    fd = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(fd, _closed_form(mu1, mu2, l1, l2), rtol=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-10)


def test_identical_statistics_give_zero():
    feats = np.random.default_rng(0).standard_normal((500, 64)) @ _rotation(64, 2)
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_general_case_agrees_with_scipy_sqrtm():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((16, 16)), rng.standard_normal((16, 16))
    s1, s2 = a @ a.T + 0.1 * np.eye(16), b @ b.T + 0.1 * np.eye(16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    ref = (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    )
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-9)


@pytest.mark.parametrize("tiny", [0.0, 1e-14, 1e-9])
def test_rank_deficient_and_near_singular_covariances(tiny):
    d = 24
    l1 = np.r_[np.linspace(0.5, 2.0, 12), np.full(12, tiny)]
    l2 = np.r_[np.linspace(1.0, 3.0, 8), np.full(16, tiny)]
    s1, s2 = _commuting(d, 4, l1, l2)
    mu = np.zeros(d)
    fd = frechet_distance(mu, s1, mu + 0.5, s2)
    assert np.isfinite(fd) and fd >= 0
    np.testing.assert_allclose(fd, _closed_form(mu, mu + 0.5, l1, l2), rtol=1e-8, atol=1e-6)


def test_singular_and_definite_mixed_use_either_factor():
    d = 10
    l1 = np.r_[np.ones(4), np.zeros(6)]  # singular
    l2 = np.linspace(0.5, 2.0, d)  # positive definite
    s1, s2 = _commuting(d, 6, l1, l2)
    want = _closed_form(np.zeros(d), np.zeros(d), l1, l2)
    # Round-off puts the zero eigenvalues at ~1e-16, whose square roots are ~1e-8.
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(want, rel=1e-7)
    assert frechet_distance(np.zeros(d), s2, np.zeros(d), s1) == pytest.approx(want, rel=1e-7)


def test_fewer_samples_than_dimensions_is_finite_and_nonnegative():
    rng = np.random.default_rng(5)
    f1, f2 = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.1
    s1, s2 = feature_statistics(f1), feature_statistics(f2)
    fd = frechet_distance(*s1, *s2)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(*s1, *s1) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_are_float64_and_unbiased():
    f = np.random.default_rng(0).standard_normal((50, 5)).astype(np.float32)
    mu, sigma = feature_statistics(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(f[:1])


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_statistics_file_round_trip_and_pytorch_fid_layout(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = feature_statistics(rng.standard_normal((20, 6)))
    path = tmp_path / "stats.npz"
    digest = save_statistics(path, mu, sigma)
    assert digest == file_sha256(path)
    assert save_statistics(tmp_path / "again.npz", mu, sigma) == digest  # deterministic bytes
    with np.load(path) as data:  # readable by plain numpy; mu / sigma plus metadata
        assert {"mu", "sigma", "version"} <= set(data.files)
        np.testing.assert_array_equal(data["mu"], mu)
    mu2, sigma2 = load_statistics(path, expected_sha256=digest)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # A file written by np.savez (pytorch-fid's --save-stats) loads too.
    np.savez(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma)
    assert load_statistics(tmp_path / "theirs.npz")[0].dtype == np.float64
    with pytest.raises(ChecksumMismatchError, match=digest):
        load_statistics(path, expected_sha256="0" * 64)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(KeyError, match="mu"):
        load_statistics(tmp_path / "bad.npz")


def test_corrupt_statistics_files_are_named_and_never_used(tmp_path):
    from jaxdiff.metrics import ChecksumMismatchError

    nan = tmp_path / "nan.npz"
    np.savez(nan, mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(ChecksumMismatchError, match=r"nan.npz.*'mu' holds NaN"):
        load_statistics(nan)
    garbled = tmp_path / "garbled.npz"
    np.savez(garbled, mu=np.zeros(2), sigma=np.eye(2))
    data = bytearray(garbled.read_bytes())
    data[:64] = bytes(64)  # same size, zip header destroyed
    garbled.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="garbled.npz.*unreadable"):
        load_statistics(garbled)
