"""ImageFolderSource: layouts, ADM center crop, every image mode, corrupt files, pickling."""

import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import get_dataset
from jaxdiff.data.imagefolder import (
    CorruptImageError,
    ImageFolderSource,
    center_crop_arr,
    decode_image,
    list_image_folder,
)
from jaxdiff.errors import InvalidArgumentError


def _noise(rng, h, w, c=3):
    shape = (h, w) if c == 1 else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_tree(root, rng=None):
    """Three classes, JPEG/PNG/WebP, grey/RGBA/palette/CMYK/16-bit, odd sizes."""
    rng = rng or np.random.default_rng(0)
    (root / "ant").mkdir(parents=True)
    (root / "bee").mkdir()
    (root / "cat" / "nested").mkdir(parents=True)
    Image.fromarray(_noise(rng, 24, 40)).save(root / "ant" / "a1.JPG", quality=95)
    Image.fromarray(_noise(rng, 30, 12, 1), "L").save(root / "ant" / "a0.png")
    Image.fromarray(_noise(rng, 17, 33, 4), "RGBA").save(root / "bee" / "b0.png")
    Image.fromarray(_noise(rng, 20, 20)).quantize(16).save(root / "bee" / "b1.png")  # "P"
    Image.fromarray(_noise(rng, 40, 25)).save(root / "bee" / "b2.webp", lossless=True)
    Image.fromarray(_noise(rng, 18, 18, 1).astype(np.uint16) * 257).save(root / "cat" / "c0.png")
    Image.new("CMYK", (36, 24), (10, 200, 30, 0)).save(root / "cat" / "c1.jpeg")
    Image.fromarray(_noise(rng, 9, 14)).save(root / "cat" / "nested" / "c2.png")
    (root / "ant" / ".DS_Store").write_bytes(b"junk")  # hidden: ignored
    (root / "bee" / "notes.txt").write_text("not an image")  # other extension: ignored
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "images")


def _expected_crop(image, halvings, resized, size):
    """ADM's recipe re-derived by hand: explicit intermediate sizes per case."""
    for half in halvings:
        image = image.resize(half, Image.BOX)
    arr = np.asarray(image.resize(resized, Image.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


@pytest.mark.parametrize(
    "wh, size, halvings, resized",
    [
        ((40, 20), 8, [(20, 10)], (16, 8)),  # one BOX halving, then 10 -> 8
        ((7, 13), 8, [], (8, 15)),  # upsampled: round(13 * 8 / 7) = 15
        ((64, 64), 16, [(32, 32), (16, 16)], (16, 16)),  # halve while short side >= 32
        ((100, 37), 8, [(50, 18), (25, 9)], (22, 8)),  # 18 >= 16: halve again; 25*8/9
        ((33, 17), 16, [], (31, 16)),  # round(33 * 16 / 17) = round(31.06)
    ],
)
def test_center_crop_matches_adm_recipe(wh, size, halvings, resized):
    image = Image.fromarray(_noise(np.random.default_rng(1), wh[1], wh[0]))
    crop = center_crop_arr(image, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, _expected_crop(image, halvings, resized, size))


@pytest.mark.parametrize("w, h", [(40, 20), (20, 40), (30, 30)])
def test_center_crop_keeps_a_centered_pattern_centered(w, h):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4] = 255  # even sizes: exactly centered
    crop = center_crop_arr(Image.fromarray(arr), 8).astype(float)[..., 0]
    ys, xs = np.indices(crop.shape)
    assert np.isclose((crop * ys).sum() / crop.sum(), 3.5, atol=0.3)
    assert np.isclose((crop * xs).sum() / crop.sum(), 3.5, atol=0.3)
    np.testing.assert_allclose(crop, crop[:, ::-1], atol=1)


def test_class_layout_labels_and_shapes(tree):
    source = ImageFolderSource(tree, image_size=16)
    assert source.classes == ["ant", "bee", "cat"]
    assert source.files == [
        "ant/a0.png",
        "ant/a1.JPG",
        "bee/b0.png",
        "bee/b1.png",
        "bee/b2.webp",
        "cat/c0.png",
        "cat/c1.jpeg",
        "cat/nested/c2.png",
    ]
    assert source.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert source.info.num_classes == 3 and source.info.image_shape == (16, 16, 3)
    assert len(source) == source.info.num_examples == 8
    batch = source.get_batch(np.arange(8))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].tolist() == source.labels.tolist()
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    example = source[3]
    np.testing.assert_array_equal(example["image"], batch["image"][3])
    assert example["label"] == 1
    pixels = source.read_uint8(3)
    np.testing.assert_array_equal(example["image"], pixels.astype(np.float32) / 127.5 - 1)


def test_modes_become_rgb(tree):
    source = ImageFolderSource(tree, image_size=8)
    grey = source.read_uint8(source.files.index("ant/a0.png"))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    # 16-bit grey is scaled to 8 bits (Pillow's own conversion would clip it to white).
    wide = source.read_uint8(source.files.index("cat/c0.png"))
    assert 0 < wide.mean() < 250
    cmyk = source.read_uint8(source.files.index("cat/c1.jpeg"))
    assert cmyk.shape == (8, 8, 3) and cmyk.reshape(-1, 3).std(0).max() < 2  # stays uniform


def test_flat_folder_is_unlabelled(tmp_path):
    rng = np.random.default_rng(2)
    for i, size in enumerate([(12, 20), (30, 9), (16, 16)]):
        Image.fromarray(_noise(rng, *size)).save(tmp_path / f"{i}.png")
    (tmp_path / "empty_subfolder").mkdir()  # holds no images: not a class
    source = ImageFolderSource(tmp_path, image_size=8, name="flat")
    assert source.classes is None and source.labels is None and source.info.num_classes is None
    assert set(source[0]) == {"image"} and set(source.get_batch([0, 2])) == {"image"}
    assert source.get_batch([0, 2])["image"].shape == (2, 8, 8, 3)


def test_layout_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        list_image_folder(tmp_path / "missing")
    with pytest.raises(InvalidArgumentError, match="no images"):
        list_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "top.png")
    with pytest.raises(InvalidArgumentError, match="mixes images at the top level.*top.png"):
        list_image_folder(tmp_path)
    (tmp_path / "top.png").unlink()
    (tmp_path / "b").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"\['b'\].*contain no images"):
        list_image_folder(tmp_path)
    with pytest.raises(InvalidArgumentError, match="image_size"):
        ImageFolderSource(tmp_path / "a", image_size=0)


def _corrupt_files(folder):
    good = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "garbage.png").write_bytes(b"\x89PNG not really" * 10)
    (folder / "zero.webp").write_bytes(b"")
    return ["garbage.png", "truncated.jpg", "zero.webp"]


def test_corrupt_files_raise_naming_the_file(tmp_path):
    Image.fromarray(_noise(np.random.default_rng(3), 32, 32)).save(tmp_path / "ok.jpg")
    bad = _corrupt_files(tmp_path)
    source = ImageFolderSource(tmp_path, image_size=8)
    for name in bad:
        index = source.files.index(name)
        with pytest.raises(CorruptImageError, match="skip_corrupt=True") as info:
            source[index]
        assert name in str(info.value) and info.value.path.endswith(name)
    with pytest.raises(ValueError, match="not a JPEG/PNG/WebP"):  # a ValueError subclass
        decode_image(b"", 8, name="empty.png")


def test_skip_corrupt_replaces_with_next_readable(tmp_path, caplog):
    rng = np.random.default_rng(4)
    Image.fromarray(_noise(rng, 32, 32)).save(tmp_path / "ok.jpg")
    Image.fromarray(_noise(rng, 20, 10)).save(tmp_path / "a_first.png")
    _corrupt_files(tmp_path)  # sorted: a_first, garbage, ok, truncated, zero
    source = ImageFolderSource(tmp_path, image_size=8, skip_corrupt=True)
    assert source.files == ["a_first.png", "garbage.png", "ok.jpg", "truncated.jpg", "zero.webp"]
    with caplog.at_level(logging.WARNING, logger="jaxdiff.data.imagefolder"):
        batch = source.get_batch(np.arange(5))
        source.get_batch(np.arange(5))  # a second pass logs nothing new
    assert len(source) == 5 and batch["image"].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(batch["image"][1], batch["image"][2])  # garbage -> ok
    np.testing.assert_array_equal(batch["image"][3], batch["image"][0])  # wraps to a_first
    np.testing.assert_array_equal(batch["image"][4], batch["image"][0])
    assert source.num_skipped == 3
    assert [p.rsplit("/", 1)[-1] for p in source.skipped_files] == [
        "garbage.png",
        "truncated.jpg",
        "zero.webp",
    ]
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 3 and any("zero.webp" in w for w in warnings)
    with pytest.raises(CorruptImageError):  # the raw reader never replaces
        source.read_uint8(1)


def test_pickles_without_decoding_state(tree):
    source = ImageFolderSource(tree, image_size=8, skip_corrupt=True)
    clone = pickle.loads(pickle.dumps(source))
    assert clone.files == source.files and clone.info == source.info
    np.testing.assert_array_equal(clone[5]["image"], source[5]["image"])
    assert clone.num_skipped == 0


def test_get_dataset_imagefolder(tree):
    source = get_dataset("imagefolder", path=str(tree), image_size=8, skip_corrupt=True)
    assert isinstance(source, ImageFolderSource) and source.skip_corrupt
    assert source.info.num_classes == 3
    with pytest.raises(ValueError, match="--config.data.path"):
        get_dataset("imagefolder", image_size=8)
    with pytest.raises(ValueError, match="--config.data.image_size"):
        get_dataset("imagefolder", path=str(tree))


def test_gs_folder(fake_gcs):
    import fakegcs

    make_tree(fake_gcs / fakegcs.BUCKET / "images")
    source = ImageFolderSource(f"gs://{fakegcs.BUCKET}/images", image_size=8)
    assert source.classes == ["ant", "bee", "cat"] and len(source) == 8
    assert source.file_path(0) == f"gs://{fakegcs.BUCKET}/images/ant/a0.png"
    assert source[0]["image"].shape == (8, 8, 3)


def test_all_corrupt_and_error_pickling(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"xx")
    source = ImageFolderSource(tmp_path, image_size=8, skip_corrupt=True)
    with pytest.raises(InvalidArgumentError, match="none of the 2 images"):
        source[1]
    with pytest.raises(CorruptImageError) as info:
        source.read_uint8(0)
    clone = pickle.loads(pickle.dumps(info.value))  # crosses prepare's process boundary
    assert str(clone) == str(info.value) and clone.path == info.value.path
