import numpy as np
import pytest

from jaxdiff.data import (
    GaussianMixture,
    checkerboard_log_prob,
    gaussian_mixture_log_prob,
    get_dataset,
    ring_gaussian_mixture,
    sample_checkerboard,
    sample_gaussian_mixture,
    sample_two_moons,
)

SAMPLERS = [sample_gaussian_mixture, sample_two_moons, sample_checkerboard]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_shapes_dtypes_and_seed_determinism(sampler):
    x, y = sampler(1000, 3)
    assert x.shape == (1000, 2) and x.dtype == np.float32
    assert y.shape == (1000,) and y.dtype == np.int32
    x2, y2 = sampler(1000, np.random.default_rng(3))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = sampler(1000, 4)
    assert not np.array_equal(x, x3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_seed_must_be_explicit_type(sampler):
    with pytest.raises(TypeError, match="rng"):
        sampler(10, None)


def test_ring_mixture_parameters():
    gmm = ring_gaussian_mixture(num_components=8, radius=2.0, std=0.2)
    assert gmm.means.shape == (8, 2) and gmm.num_components == 8 and gmm.dim == 2
    np.testing.assert_allclose(np.linalg.norm(gmm.means, axis=1), 2.0)
    np.testing.assert_allclose(gmm.means[0], [2.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(gmm.weights, 1 / 8)
    np.testing.assert_allclose(gmm.stds, 0.2)


def test_gmm_samples_follow_components():
    gmm = ring_gaussian_mixture()
    x, y = gmm.sample(80_000, 0)
    assert set(np.unique(y)) == set(range(8))
    np.testing.assert_allclose(np.bincount(y) / len(y), 1 / 8, atol=0.01)
    for k in range(8):
        xk = x[y == k].astype(np.float64)
        np.testing.assert_allclose(xk.mean(0), gmm.means[k], atol=0.02)
        np.testing.assert_allclose(xk.std(0), gmm.stds[k], rtol=0.05)


def _direct_log_prob(x, means, stds, weights):
    x = np.asarray(x, np.float64)
    density = np.zeros(len(x))
    for mu, s, w in zip(means, stds, weights, strict=True):
        sq = np.sum((x - mu) ** 2, axis=1)
        density += w * np.exp(-sq / (2 * s**2)) / (2 * np.pi * s**2) ** (x.shape[1] / 2)
    return np.log(density)


def test_gmm_log_prob_matches_direct_computation():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 2))
    stds = np.array([0.5, 1.0, 2.0])
    weights = np.array([0.2, 0.3, 0.5])
    x = rng.normal(size=(50, 2)) * 2
    got = gaussian_mixture_log_prob(x, means, stds, weights)
    np.testing.assert_allclose(got, _direct_log_prob(x, means, stds, weights), rtol=1e-10)
    gmm = GaussianMixture(means, stds, weights)
    np.testing.assert_allclose(gmm.log_prob(x), got)
    # Scalar std and default uniform weights.
    np.testing.assert_allclose(
        gaussian_mixture_log_prob(x, means, 0.7), _direct_log_prob(x, means, [0.7] * 3, [1 / 3] * 3)
    )


def test_gmm_log_prob_is_stable_far_away_and_in_higher_dims():
    gmm = ring_gaussian_mixture(std=0.05)
    assert np.isfinite(gmm.log_prob(np.array([[50.0, 50.0]]))).all()
    x = np.zeros((4, 5))
    got = gaussian_mixture_log_prob(x, np.zeros((1, 5)), 1.0)
    np.testing.assert_allclose(got, -2.5 * np.log(2 * np.pi))


def test_gmm_density_integrates_to_one():
    gmm = ring_gaussian_mixture()
    grid = np.linspace(-4, 4, 401)
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(gmm.log_prob(np.stack([xx.ravel(), yy.ravel()], 1)))
    assert abs(density.sum() * (grid[1] - grid[0]) ** 2 - 1.0) < 1e-3


def test_gmm_bad_parameters():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(np.zeros((2, 2)), 1.0, np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture(np.zeros((2, 2)), 0.0, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="last dimension"):
        gaussian_mixture_log_prob(np.zeros((3, 3)), np.zeros((2, 2)), 1.0)


def test_two_moons_geometry_and_labels():
    x, y = sample_two_moons(5000, 0, noise=0.0)
    assert set(np.unique(y)) == {0, 1}
    p = x.astype(np.float64) + [0.5, 0.25]
    np.testing.assert_allclose(np.linalg.norm(p[y == 0], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(p[y == 1] - [1.0, 0.5], axis=1), 1.0, atol=1e-5)
    assert (p[y == 0, 1] >= -1e-6).all() and (p[y == 1, 1] <= 0.5 + 1e-6).all()


def test_checkerboard_support_labels_and_density():
    x, y = sample_checkerboard(20_000, 0)
    assert np.isfinite(checkerboard_log_prob(x)).all()
    assert set(np.unique(y)) == {0, 1}
    col = np.floor(x[:, 0] + 2.0).astype(int)
    np.testing.assert_array_equal(y, col % 2)
    assert np.abs(x).max() <= 2.0
    # Uniform on 8 unit cells: density 1/8 on the black cells, integrates to 1.
    grid = np.linspace(-2.5, 2.5, 501)[:-1] + 0.005
    xx, yy = np.meshgrid(grid, grid)
    density = np.exp(checkerboard_log_prob(np.stack([xx.ravel(), yy.ravel()], 1)))
    np.testing.assert_allclose(np.unique(density), [0.0, 1 / 8], rtol=1e-12)
    assert abs(density.sum() * 0.01**2 - 1.0) < 1e-9


@pytest.mark.parametrize(
    "name, classes", [("toy_gmm", 8), ("gmm", 8), ("moons", 2), ("checkerboard", 2)]
)
def test_get_dataset_toys(name, classes):
    train, test = get_dataset(name), get_dataset(name, split="test")
    assert (len(train), len(test)) == (100_000, 10_000)
    assert train.info.image_shape == (2,) and train.info.num_classes == classes
    assert train[0]["image"].shape == (2,) and train[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(train[5]["image"], get_dataset(name)[5]["image"])
    assert not np.array_equal(train[0]["image"], test[0]["image"])
    with pytest.raises(ValueError, match="'valid'"):
        get_dataset(name, split="valid")
