import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxdiff.data import (  # noqa: E402
    DatasetNotPreparedError,
    TfdsSpec,
    get_dataset,
    load_tfds,
    make_iterator,
)


@pytest.fixture
def mock_tfds():
    # USE_CODE: fake examples generated from the builders' feature specs; needs no
    # metadata files, no TensorFlow and no network.
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("tfds:cifar100", (32, 32, 3), 100),
        ("imagenet32", (32, 32, 3), 1000),
    ],
)
def test_mock_dataset_through_pipeline(mock_tfds, name, shape, classes):
    source = get_dataset(name)
    assert source.info.image_shape == shape and source.info.num_classes == classes
    assert len(source) == 24
    it = make_iterator(source, global_batch_size=8, seed=0, process_index=1, process_count=2)
    batch = next(it)
    assert batch["image"].shape == (4, *shape) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert ((batch["label"] >= 0) & (batch["label"] < classes)).all()
    # Images are exactly the mock uint8 pixels mapped by x / 127.5 - 1.
    np.testing.assert_allclose(
        (batch["image"] + 1) * 127.5, np.round((batch["image"] + 1) * 127.5), atol=1e-4
    )


def test_mock_iterator_restores_with_prefetch_threads(mock_tfds):
    # TFDS sources are read with grain prefetch threads; state must still be exact.
    source = get_dataset("mnist")
    kwargs = dict(global_batch_size=6, seed=1, process_index=0, process_count=1)
    it = make_iterator(source, **kwargs)
    reference = [next(it) for _ in range(6)]
    again = next(make_iterator(source, **kwargs))
    np.testing.assert_array_equal(again["image"], reference[0]["image"])
    it = make_iterator(source, **kwargs)
    next(it), next(it)
    fresh = make_iterator(source, **kwargs)
    fresh.set_state(it.get_state())
    for expected in reference[2:]:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


def test_unknown_name_with_default_spec_drops_missing_label(mock_tfds):
    source = get_dataset("tfds:celeb_a")  # has "image" but no "label" feature
    assert source.info.num_classes is None
    assert set(source[0]) == {"image"}


def test_wrong_feature_key_is_explained(mock_tfds):
    with pytest.raises(ValueError, match=r"no feature 'img'.*features are"):
        load_tfds("mnist", spec=TfdsSpec(image_key="img"))


def test_missing_dataset_gives_clear_error(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as info:
        get_dataset("cifar10", data_dir=str(tmp_path))
    message = str(info.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert "tfds build cifar10 --file_format=array_record" in message
    assert "download_and_prepare" in message and "TFDS_DATA_DIR" in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_missing_dataset_respects_tfds_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    with pytest.raises(DatasetNotPreparedError, match="env_dir"):
        get_dataset("mnist")


def test_unknown_tfds_name(tmp_path):
    with pytest.raises(ValueError, match="TFDS has no dataset named 'no_such_dataset_xyz'"):
        get_dataset("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
