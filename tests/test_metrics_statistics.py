"""The float64 streaming accumulator and the reference-statistics file format."""

import numpy as np
import pytest

from jaxdiff.metrics import (
    FORMAT_VERSION,
    ChecksumMismatchError,
    ReferenceStatistics,
    RunningStatistics,
    load_statistics,
    save_statistics,
)
from jaxdiff.metrics.weights import file_sha256

KEYS = ["evaluator", "feature", "image_shape", "mu", "num", "sigma", "source", "version"]


def _features(n=53, d=7, seed=0, offset=1e4):
    # A large common offset: a sum-of-squares formula would lose ~8 digits here.
    rng = np.random.default_rng(seed)
    return offset + rng.standard_normal((n, d)) @ rng.standard_normal((d, d))


def _assert_exact(mu, sigma, feats):
    np.testing.assert_allclose(mu, np.mean(feats, axis=0), rtol=1e-12)
    want = np.cov(feats, rowvar=False)
    np.testing.assert_allclose(sigma, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("splits", [[53], [1, 52], [10, 10, 10, 23], [3] * 17 + [2]])
def test_running_statistics_equal_numpy_for_any_split(splits):
    feats = _features()
    acc = RunningStatistics()
    for part in np.split(feats, np.cumsum(splits)[:-1]):
        acc.update(part)
    acc.update(feats[:0])  # an empty batch changes nothing
    assert acc.num == 53
    _assert_exact(acc.mean(), acc.covariance(), feats)


def test_merging_accumulators_equals_one_pass():
    feats = _features(n=40, seed=1)
    a, b, whole = RunningStatistics(), RunningStatistics(), RunningStatistics()
    a.update(feats[:15])
    b.update(feats[15:])
    a.merge(b)
    a.merge(RunningStatistics())  # merging nothing is a no-op
    whole.update(feats)
    _assert_exact(a.mean(), a.covariance(), feats)
    _assert_exact(whole.mean(), whole.covariance(), feats)


def test_running_statistics_errors_are_clear():
    acc = RunningStatistics()
    with pytest.raises(ValueError, match="empty"):
        acc.mean()
    acc.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        acc.covariance()
    with pytest.raises(ValueError, match="feature size changed from 3 to 4"):
        acc.update(np.zeros((2, 4)))


def test_file_round_trip_keeps_every_field(tmp_path):
    feats = _features(n=20, d=4)
    stats = ReferenceStatistics.from_features(
        feats,
        evaluator="fid",
        feature="inception_v3_pool3",
        image_shape=(32, 32, 3),
        source="cifar10 split=train",
    )
    path = tmp_path / "stats.npz"
    digest = stats.save(path)
    assert digest == file_sha256(path)
    assert stats.save(tmp_path / "again.npz") == digest  # deterministic bytes
    with np.load(path) as data:  # plain numpy, no pickle
        assert sorted(data.files) == KEYS
        assert data["version"] == FORMAT_VERSION and str(data["feature"]) == "inception_v3_pool3"
    back = ReferenceStatistics.load(path, expected_sha256=digest)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.num, back.evaluator, back.feature, back.image_shape, back.source) == (
        20,
        "fid",
        "inception_v3_pool3",
        (32, 32, 3),
        "cifar10 split=train",
    )
    _assert_exact(back.mu, back.sigma, feats)
    mu, sigma = load_statistics(path)
    np.testing.assert_array_equal(mu, stats.mu)
    with pytest.raises(ChecksumMismatchError, match=digest):
        ReferenceStatistics.load(path, expected_sha256="0" * 64)


def test_foreign_files_load_with_unknown_metadata(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu.astype(np.float32), sigma=sigma)
    stats = ReferenceStatistics.load(tmp_path / "pytorch_fid.npz")
    assert stats.mu.dtype == np.float64 and stats.num == 0 and stats.feature == ""
    assert stats.image_shape == () and stats.version == FORMAT_VERSION
    save_statistics(tmp_path / "minimal.npz", mu, sigma)  # metadata is optional
    assert ReferenceStatistics.load(tmp_path / "minimal.npz").evaluator == ""


def test_bad_statistics_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\]"):
        ReferenceStatistics(np.zeros(3), np.eye(2))
    np.savez(tmp_path / "future.npz", mu=np.zeros(2), sigma=np.eye(2), version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="upgrade jaxdiff"):
        ReferenceStatistics.load(tmp_path / "future.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ReferenceStatistics.load(tmp_path / "missing.npz")
    stats = ReferenceStatistics(np.zeros(2), np.eye(2), feature="digits_classifier:abc")
    with pytest.raises(ValueError, match="'digits_classifier:abc' features.*python -m"):
        stats.check_compatible("inception_v3_pool3", hint="python -m ...")
    with pytest.raises(ValueError, match="2-d features.*2048-d"):
        ReferenceStatistics(np.zeros(2), np.eye(2)).check_compatible("x", 2048)
    stats.check_compatible("digits_classifier:abc", 2)  # the right space passes
