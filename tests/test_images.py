import numpy as np
import pytest
from PIL import Image

from jaxdiff.utils import make_grid, save_image_grid, upscale


def test_grid_shape_n10_nrow4():
    grid = make_grid(np.zeros((10, 8, 8, 1), np.float32), nrow=4, padding=1)
    # 4 per row -> 3 rows; each tile 8 px plus 1 px padding, plus the outer border.
    assert grid.shape == (3 * 9 + 1, 4 * 9 + 1, 3)
    assert grid.dtype == np.uint8


def test_default_nrow_is_near_square():
    assert make_grid(np.zeros((10, 4, 5, 3)), padding=0).shape == (3 * 4, 4 * 5, 3)
    assert make_grid(np.zeros((2, 4, 4, 3)), nrow=8, padding=0).shape == (4, 8, 3)


def test_value_mapping_and_clipping():
    images = np.stack([np.full((2, 2, 1), v, np.float32) for v in (-1.0, 1.0, -3.0, 5.0)])
    grid = make_grid(images, nrow=4, padding=1, pad_value=-1.0)
    tiles = [grid[1:3, 1 + 3 * i : 3 + 3 * i] for i in range(4)]
    assert (tiles[0] == 0).all() and (tiles[1] == 255).all()
    assert (tiles[2] == 0).all() and (tiles[3] == 255).all()
    assert (grid[0] == 0).all()  # padding in pad_value's colour (-1 -> black)
    assert make_grid(np.zeros((1, 1, 1, 1)), padding=0)[0, 0, 0] == 128


def test_rgb_channels_kept():
    img = np.zeros((1, 2, 2, 3), np.float32)
    img[..., 0] = 1.0
    grid = make_grid(img, padding=0)
    np.testing.assert_array_equal(grid[0, 0], [255, 127 + 1, 127 + 1])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="C in"):
        make_grid(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match="empty"):
        make_grid(np.zeros((0, 4, 4, 1)))
    with pytest.raises(ValueError, match="factor"):
        upscale(np.zeros((2, 2)), 0)


def test_upscale_nearest():
    img = np.arange(4, dtype=np.uint8).reshape(2, 2)
    up = upscale(img, 3)
    assert up.shape == (6, 6) and up.dtype == np.uint8
    np.testing.assert_array_equal(up[:3, :3], 0)
    np.testing.assert_array_equal(up[3:, 3:], 3)
    assert upscale(np.zeros((2, 3, 3)), 2).shape == (4, 6, 3)


def test_save_image_grid_png(tmp_path):
    images = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 1))
    path = save_image_grid(tmp_path / "nested" / "dir" / "grid.png", images, nrow=4, scale=4)
    assert path == str(tmp_path / "nested" / "dir" / "grid.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (4 * (4 * 9 + 1), 4 * (3 * 9 + 1))  # (width, height)
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels, upscale(make_grid(images, nrow=4), 4))
