import numpy as np
import pytest

from jaxdiff.data import (
    DatasetNotPreparedError,
    TfdsSource,
    TfdsSpec,
    get_dataset,
    load_tfds,
    make_iterator,
)


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


class _Records:
    """A data source like tfds's, over in-memory records; counts the reads it serves."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.single_reads = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.single_reads += 1
        return {"image": self.images[i], "label": self.labels[i]}


class _BatchedRecords(_Records):
    """Also implements ``__getitems__``, as TFDS ArrayRecord data sources do."""

    def __init__(self, images, labels):
        super().__init__(images, labels)
        self.batch_calls = []

    def __getitems__(self, keys):
        assert all(type(k) is int for k in keys)  # ArrayRecord wants plain ints
        self.batch_calls.append(list(keys))
        return [{"image": self.images[k], "label": self.labels[k]} for k in keys]


def _float_latents(n=10):
    return np.random.default_rng(0).standard_normal((n, 4, 4, 4)).astype(np.float16) * 5


@pytest.mark.parametrize("records_cls", [_Records, _BatchedRecords])
def test_float_image_feature_is_kept_as_stored(records_cls):
    latents, labels = _float_latents(), np.arange(10) % 3
    source = TfdsSource(
        records_cls(latents, labels), name="latents", split="train", spec=TfdsSpec(num_classes=3)
    )
    assert source.info.image_shape == (4, 4, 4) and source.info.num_classes == 3
    np.testing.assert_array_equal(source[2]["image"], latents[2].astype(np.float32))
    batch = source.get_batch(np.array([9, 0, 9]))
    assert batch["image"].dtype == np.float32 and np.abs(batch["image"]).max() > 1.0
    np.testing.assert_array_equal(batch["image"], latents[[9, 0, 9]].astype(np.float32))
    np.testing.assert_array_equal(batch["label"], labels[[9, 0, 9]])


def test_get_batch_reads_all_indices_in_one_call():
    images = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 2, 2)
    records = _BatchedRecords(images, np.arange(6))
    source = TfdsSource(records, name="fake", split="train", spec=TfdsSpec(num_classes=6))
    reads_at_init = records.single_reads
    batch = source.get_batch(np.array([5, 1, 3], dtype=np.int64))
    assert records.batch_calls == [[5, 1, 3]] and records.single_reads == reads_at_init
    assert batch["image"].shape == (3, 2, 2, 1)
    np.testing.assert_allclose(batch["image"], images[[5, 1, 3], ..., None] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], [5, 1, 3])


def test_get_batch_uses_tfds_getitems(mock_tfds, monkeypatch):
    source = get_dataset("mnist")
    calls = []
    getitems = source._source.__getitems__

    def spy(keys):
        calls.append(list(keys))
        return getitems(keys)

    monkeypatch.setattr(source._source, "__getitems__", spy, raising=False)
    idx = np.array([3, 7, 0, 7])
    batch = source.get_batch(idx)
    assert calls == [[3, 7, 0, 7]]
    for row, i in zip(batch["image"], idx, strict=True):
        np.testing.assert_array_equal(row, source[int(i)]["image"])


def test_non_numeric_image_feature_is_explained():
    records = _Records(np.array([[b"png bytes"]] * 2), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"feature 'image' has dtype \|S9.*must be numeric"):
        TfdsSource(records, name="encoded", split="train", spec=TfdsSpec(num_classes=1))
