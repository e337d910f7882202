"""NpySource: .npy files and folders, memory-mapped gathers, pickling, errors, gs:// paths."""

import pickle

import fakegcs
import numpy as np
import pytest

from jaxdiff.data import NpySource, get_dataset, make_iterator
from jaxdiff.errors import InvalidArgumentError


def _latents(n=12, shape=(4, 4, 3), dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *shape)) * 3).astype(dtype)


@pytest.fixture
def latent_dir(tmp_path):
    images = _latents()
    labels = np.arange(12) % 5
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels.astype(np.int64))
    return tmp_path, images, labels


def test_folder_with_labels_is_memory_mapped_and_float32_as_stored(latent_dir):
    path, images, labels = latent_dir
    src = NpySource(path)
    assert isinstance(src._images(), np.memmap)  # never loaded whole
    assert len(src) == 12 and src.info.image_shape == (4, 4, 3)
    assert src.info.num_classes == 5 and src.info.name == "npy"
    example = src[3]
    assert example["image"].dtype == np.float32 and example["label"].dtype == np.int32
    np.testing.assert_array_equal(example["image"], images[3].astype(np.float32))
    assert example["label"] == labels[3]


def test_get_batch_keeps_the_requested_order(latent_dir):
    path, images, labels = latent_dir
    src = NpySource(path)
    idx = np.array([7, 2, 11, 2, 0, 7])  # unsorted, with repeats (a batch across epochs)
    batch = src.get_batch(idx)
    assert batch["image"].shape == (6, 4, 4, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["image"], images[idx].astype(np.float32))
    np.testing.assert_array_equal(batch["label"], labels[idx])
    assert batch["label"].dtype == np.int32


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float64, np.bool_])
def test_single_file_any_dtype_and_shape(tmp_path, dtype):
    data = (np.arange(5 * 2 * 3) % 7).reshape(5, 2, 3).astype(dtype)
    np.save(tmp_path / "x.npy", data)
    src = NpySource(tmp_path / "x.npy", name="feats", split="test")
    assert src.info.num_classes is None and src.info.image_shape == (2, 3)
    assert (src.info.name, src.info.split) == ("feats", "test")
    batch = src.get_batch(np.array([4, 1]))
    assert set(batch) == {"image"}
    np.testing.assert_array_equal(batch["image"], data[[4, 1]].astype(np.float32))


def test_pickle_drops_the_mapping_and_reopens_it(latent_dir):
    path, images, _ = latent_dir
    src = NpySource(path)
    src.get_batch(np.arange(3))
    payload = pickle.dumps(src)
    assert len(payload) < images.nbytes  # the file name travels, not the data
    clone = pickle.loads(payload)
    assert clone._image is None
    np.testing.assert_array_equal(clone.get_batch(np.array([5]))["image"][0], images[5])
    assert isinstance(clone._image, np.memmap)


def test_get_dataset_npy_through_the_pipeline(latent_dir):
    path, images, _ = latent_dir
    src = get_dataset("npy", path=str(path))
    it = make_iterator(src, global_batch_size=8, seed=0, process_index=0, process_count=1)
    batch = next(it)
    assert batch["image"].shape == (8, 4, 4, 3) and batch["label"].shape == (8,)
    rows = {row.tobytes() for row in images.astype(np.float32)}
    assert all(row.tobytes() in rows for row in batch["image"])


def test_get_dataset_npy_without_path_names_the_flag():
    with pytest.raises(ValueError, match=r"--config\.data\.path"):
        get_dataset("npy")


def test_missing_files_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NpySource(tmp_path / "nope.npy")
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int32))
    with pytest.raises(FileNotFoundError, match=r"no images\.npy.*labels\.npy"):
        NpySource(tmp_path)


def test_bad_arrays_are_explained(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgumentError, match="object/pickled"):
        NpySource(tmp_path / "obj.npy")
    np.save(tmp_path / "str.npy", np.array([["a"], ["b"]]))
    with pytest.raises(InvalidArgumentError, match="dtype <U1"):
        NpySource(tmp_path / "str.npy")
    np.save(tmp_path / "flat.npy", np.zeros(4))
    with pytest.raises(InvalidArgumentError, match=r"shape \(4,\).*\[N, 1\]"):
        NpySource(tmp_path / "flat.npy")
    np.savez(tmp_path / "arch.npz", x=np.zeros((2, 2)))
    with pytest.raises(InvalidArgumentError, match="npz"):
        NpySource(tmp_path / "arch.npz")


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.arange(5), r"shape \(5,\) but the data has 12 examples"),
        (np.arange(12) - 1, r"negative labels \(min -1\)"),
        (np.arange(12, dtype=np.float32), "labels must be integers"),
    ],
)
def test_bad_labels_are_explained(tmp_path, labels, match):
    np.save(tmp_path / "images.npy", _latents())
    np.save(tmp_path / "labels.npy", labels)
    with pytest.raises(InvalidArgumentError, match=match):
        NpySource(tmp_path)


def test_cloud_folder_is_read_through_storage(fake_gcs):
    url = f"gs://{fakegcs.BUCKET}/latents"
    local = fake_gcs / fakegcs.BUCKET / "latents"
    local.mkdir(parents=True)
    images = _latents(n=6, dtype=np.float32)
    np.save(local / "images.npy", images)
    np.save(local / "labels.npy", np.array([0, 1, 2, 0, 1, 2]))
    src = get_dataset("npy", path=url)
    assert src.path == url and src.info.num_classes == 3
    np.testing.assert_array_equal(src.get_batch(np.array([5, 0]))["image"], images[[5, 0]])
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[2]["image"], images[2])
