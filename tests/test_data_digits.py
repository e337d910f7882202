import numpy as np
import pytest

from jaxdiff.data import digits as digits_mod
from jaxdiff.data import get_dataset, load_digits


@pytest.mark.parametrize("split, n", [("train", 1500), ("test", 297), ("all", 1797)])
def test_shapes_dtypes_range(split, n):
    images, labels = load_digits(split)
    assert images.shape == (n, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    assert set(np.unique(labels)) == set(range(10))


def test_splits_disjoint_and_cover_all():
    train = digits_mod.split_indices("train")
    test = digits_mod.split_indices("test")
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    all_images, all_labels = load_digits("all")
    test_images, test_labels = load_digits("test")
    np.testing.assert_array_equal(all_images[test], test_images)
    np.testing.assert_array_equal(all_labels[test], test_labels)


def test_test_split_is_stratified():
    _, labels = load_digits("test")
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 28 and counts.max() <= 31, counts


def test_values_match_sklearn_scaling():
    from sklearn.datasets import load_digits as sk_load

    raw = sk_load()
    images, labels = load_digits("all")
    np.testing.assert_allclose(images[..., 0], raw.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, raw.target)


def test_deterministic_and_safe_to_mutate():
    a_images, a_labels = load_digits("train")
    a_images[:] = 0.0  # must not corrupt the cache
    b_images, b_labels = load_digits("train")
    c_images, c_labels = load_digits("train")
    np.testing.assert_array_equal(b_images, c_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert b_images.max() == 1.0


def test_bad_split():
    with pytest.raises(ValueError, match="'val'"):
        load_digits("val")


def test_get_dataset_digits():
    source = get_dataset("digits", split="test")
    assert len(source) == 297
    assert source.info.image_shape == (8, 8, 1) and source.info.num_classes == 10
    example = source[0]
    assert example["image"].shape == (8, 8, 1) and example["label"].dtype == np.int32
