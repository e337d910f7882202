"""Inception Score, KID, ADM-form precision/recall and the ADM .npz batch layout."""

import math
import zipfile

import numpy as np
import pytest

from jaxdiff.metrics.adm_batches import (
    ADM_POOL_FEATURE,
    AdmBatch,
    load_adm_reference,
    save_adm_reference,
)
from jaxdiff.metrics.prdc import precision_recall
from jaxdiff.metrics.scores import (
    adm_spatial_features,
    inception_score,
    inception_score_splits,
    kid,
    mmd2_unbiased,
)

# ---------------------------------------------------------------- Inception Score


def test_is_uniform_predictions_score_one():
    assert inception_score(probs=np.full((6, 5), 0.2)) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.zeros((6, 5))) == pytest.approx(1.0, abs=1e-12)  # logits


def test_is_one_hot_distinct_classes_score_the_class_count():
    assert inception_score(probs=np.eye(7)) == pytest.approx(7.0, rel=1e-12)
    # Zero probabilities contribute 0 log 0 = 0, not NaN.
    assert math.isfinite(inception_score(probs=np.eye(3)[[0, 0, 1]]))


def test_is_two_class_hand_computed():
    # p = (3/4, 1/4) and (1/4, 3/4): marginal (1/2, 1/2), each KL = 3/4 log 3 - log 2,
    # so IS = 3^(3/4) / 2.
    logits = np.log([[3.0, 1.0], [1.0, 3.0]])
    assert inception_score(logits) == pytest.approx(3**0.75 / 2, rel=1e-12)
    assert inception_score(probs=[[0.75, 0.25], [0.25, 0.75]]) == pytest.approx(3**0.75 / 2)


def test_is_splits_as_adm_and_improved_gan():
    probs = np.eye(3)[[0, 1, 2, 2]]
    # ADM: consecutive chunks of split_size, the last keeps the remainder: [0,1,2] -> 3, [2] -> 1.
    np.testing.assert_allclose(inception_score_splits(probs=probs, split_size=3), [3.0, 1.0])
    assert inception_score(probs=probs, split_size=3) == pytest.approx(2.0)
    # Default split size 5000: one split of all four samples.
    expected = math.exp(2 * 0.25 * math.log(4) + 0.5 * math.log(2))  # marginal (1/4,1/4,1/2)
    assert inception_score(probs=probs) == pytest.approx(expected)
    # improved-gan: n near-equal parts: [0,1] -> 2, [2,2] -> 1.
    np.testing.assert_allclose(inception_score_splits(probs=probs, splits=2), [2.0, 1.0])


def test_is_equals_adm_formula_on_random_logits():
    logits = np.random.default_rng(5).standard_normal((23, 6)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []  # evaluator.py compute_inception_score, verbatim in float64
    for i in range(0, len(probs), 10):
        part = probs[i : i + 10]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-12)


def test_is_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        inception_score(np.zeros((2, 3)), probs=np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="sums to"):
        inception_score(probs=[[0.5, 0.6]])
    with pytest.raises(ValueError, match="not both"):
        inception_score(np.zeros((4, 3)), split_size=2, splits=2)
    with pytest.raises(ValueError, match="shape"):
        inception_score(np.zeros(3))


# ---------------------------------------------------------------- KID


def _mmd2_direct(x, y):
    """Unbiased MMD^2 written out term by term (float64 loops over pairs)."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 3)), rng.standard_normal((7, 3)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_direct(x, y), rel=1e-12)
    # Subsets as large as both sets are permutations, so every subset gives the full value.
    real, fake = x[:7], y
    out = kid(real, fake, num_subsets=3, subset_size=1000)
    assert out["kid"] == pytest.approx(_mmd2_direct(fake, real), rel=1e-12)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_same_distribution_positive_for_shifted():
    rng = np.random.default_rng(1)
    real, same = rng.standard_normal((1500, 8)), rng.standard_normal((1500, 8))
    out = kid(real, same, num_subsets=10, subset_size=500)
    assert abs(out["kid"]) < 0.02
    shifted = kid(real, same + 0.5, num_subsets=10, subset_size=500)
    assert shifted["kid"] > 0.2 and shifted["kid"] > 10 * abs(out["kid"])
    assert kid(real, same, num_subsets=10, subset_size=500) == out  # seeded


def test_kid_bad_input():
    with pytest.raises(ValueError, match="feature sizes differ"):
        kid(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="subset_size"):
        kid(np.zeros((4, 3)), np.zeros((4, 3)), subset_size=1)


# ---------------------------------------------------------------- precision/recall


def _adm_precision_recall(ref, sample, k=3):
    """ADM ManifoldEstimator in float64: squared distances, partition column k of each
    row (the point itself sits at column 0), closed balls (``<=``)."""

    def sq(a, b):
        d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
        return np.maximum(d, 0.0)

    r_ref = np.partition(sq(ref, ref), k, axis=1)[:, k]
    r_sample = np.partition(sq(sample, sample), k, axis=1)[:, k]
    d = sq(ref, sample)
    precision = np.mean((d <= r_ref[:, None]).any(0))
    recall = np.mean((d <= r_sample[None, :]).any(1))
    return precision, recall


def test_precision_recall_hand_computed_adm_form():
    # Unit-square corners: each one's 3rd nearest other corner is the diagonal, radius sqrt 2.
    real = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1]])
    # Inside; exactly on the ball of (1, 1) (closed: counts); 2 from (1, 0); far away.
    fake = np.array([[0.5, 0.5], [2, 2], [3, 0], [10, 10]])
    assert precision_recall(real, fake)["precision"] == 0.5
    assert _adm_precision_recall(real, fake)[0] == 0.5
    # A tight cluster (radius sqrt 0.02) at the origin covers only the real corner there.
    cluster = np.array([[0.0, 0], [0.1, 0], [0, 0.1], [0.1, 0.1]])
    assert precision_recall(real, cluster) == {"precision": 1.0, "recall": 0.25}
    assert _adm_precision_recall(real, cluster) == (1.0, 0.25)


def test_precision_recall_equals_adm_form_on_random_sets_with_duplicates():
    rng = np.random.default_rng(2)
    real = np.round(rng.standard_normal((60, 3)), 1)  # rounding makes ties and duplicates
    fake = np.round(rng.standard_normal((50, 3)) * 1.2 + 0.3, 1)
    got = precision_recall(real, fake, k=3, chunk_size=16)
    assert (got["precision"], got["recall"]) == _adm_precision_recall(real, fake)


# ---------------------------------------------------------------- ADM .npz batches


def _stats(rng, d):
    x = rng.standard_normal((d + 3, d))
    return x.mean(0), np.cov(x, rowvar=False)


def test_adm_round_trip_images_labels_and_statistics(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    (mu, sigma), (mu_s, sigma_s) = _stats(rng, 6), _stats(rng, 4)
    path = tmp_path / "ref.npz"
    sha = save_adm_reference(
        path, images, labels=[0, 1, 2, 3, 4], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s
    )
    assert len(sha) == 64
    # The layout the ADM evaluator reads: arr_0.npy ... members of a plain .npz.
    with np.load(path) as raw:
        assert sorted(raw.files) == ["arr_0", "arr_1", "mu", "mu_s", "sigma", "sigma_s"]
        assert raw["arr_0"].dtype == np.uint8
    # ADM streams arr_0 from the zip member: it needs a 1.0/2.0 header in C order.
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        assert np.lib.format.read_magic(f) == (1, 0)
        assert np.lib.format.read_array_header_1_0(f) == ((5, 4, 4, 3), False, np.uint8)
    batch = load_adm_reference(path)
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.labels, np.arange(5))
    for name, want in dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s).items():
        np.testing.assert_array_equal(getattr(batch, name), want)
    stats = batch.statistics()
    assert stats.feature == ADM_POOL_FEATURE and stats.mu.shape == (6,)
    assert batch.spatial_statistics().sigma.shape == (4, 4)
    assert load_adm_reference(path, images=False).images is None


def test_adm_reads_files_written_like_guided_diffusion(tmp_path):
    # image_sample.py: np.savez(out_path, arr, label_arr) -> arr_0, arr_1; float32 stats.
    images = np.zeros((3, 2, 2, 3), np.uint8)
    path = tmp_path / "samples.npz"
    np.savez(path, images, np.array([7, 8, 9], np.int32))
    batch = load_adm_reference(path)
    assert batch.images.shape == (3, 2, 2, 3) and batch.labels.tolist() == [7, 8, 9]
    assert batch.mu is None
    with pytest.raises(ValueError, match="holds no 'mu'"):
        batch.statistics()
    stats_only = tmp_path / "stats.npz"
    np.savez(stats_only, mu=np.zeros(2, np.float32), sigma=np.eye(2, dtype=np.float32))
    assert load_adm_reference(stats_only).sigma.dtype == np.float64
    assert isinstance(load_adm_reference(stats_only), AdmBatch)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"arr_0": np.zeros((2, 4, 4, 3), np.float32)}, "must be uint8"),
        ({"arr_0": np.zeros((2, 4, 4), np.uint8)}, "must be uint8"),
        ({"labels": np.zeros(2)}, "neither images 'arr_0' nor statistics"),
        ({"mu": np.zeros(3)}, "has 'mu' but lacks 'sigma'"),
        ({"mu": np.zeros(3), "sigma": np.eye(2)}, "expected 'mu' \\[D\\]"),
        ({"mu": np.array([np.nan]), "sigma": np.eye(1)}, "NaN or inf"),
        ({"arr_0": np.zeros((2, 1, 1, 3), np.uint8), "arr_1": np.zeros(3, int)}, "3 labels"),
    ],
)
def test_adm_mismatched_files_name_the_file(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        load_adm_reference(path)
    assert str(path) in str(e.value)


def test_adm_corrupt_files_name_the_file(tmp_path):
    not_zip = tmp_path / "not_zip.npz"
    not_zip.write_bytes(b"hello, not an archive")
    with pytest.raises(ValueError, match="not an .npz") as e:
        load_adm_reference(not_zip)
    assert str(not_zip) in str(e.value)
    good = tmp_path / "good.npz"
    save_adm_reference(good, np.zeros((2, 2, 2, 3), np.uint8))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="corrupt") as e:
        load_adm_reference(truncated)
    assert str(truncated) in str(e.value)
    pickled = tmp_path / "pickled.npz"
    with zipfile.ZipFile(pickled, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled.npz"):
        load_adm_reference(pickled)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_adm_reference(tmp_path / "missing.npz")


def test_adm_save_refuses_incomplete_statistics(tmp_path):
    images = np.zeros((2, 2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="give all or none") as e:
        save_adm_reference(tmp_path / "x.npz", images, mu=np.zeros(2), sigma=np.eye(2))
    assert "x.npz" in str(e.value) and not (tmp_path / "x.npz").exists()
    with pytest.raises(ValueError, match="must be uint8"):
        save_adm_reference(tmp_path / "x.npz", images.astype(np.float32))


def test_adm_spatial_features_layout():
    acts = np.arange(2 * 3 * 3 * 9, dtype=np.float32).reshape(2, 3, 3, 9)
    feats = adm_spatial_features(acts)
    assert feats.shape == (2, 3 * 3 * 7)
    np.testing.assert_array_equal(feats[1, :8], [81, 82, 83, 84, 85, 86, 87, 90])  # H, W, C
    with pytest.raises(ValueError, match="NHWC"):
        adm_spatial_features(np.zeros((2, 9, 3, 3)))
