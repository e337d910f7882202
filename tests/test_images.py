import fakegcs
import numpy as np
import pytest
from PIL import Image

from jaxdiff.utils import displayable, make_grid, save_image_grid, upscale


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
    with pytest.raises(ValueError, match=r"C >= 1"):
        make_grid(np.zeros((2, 4, 4, 0)))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        make_grid(np.zeros((2, 4)))
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


def _latents(c, n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 3, c)).astype(np.float32) * 4


def test_displayable_keeps_grey_and_rgb():
    for c in (1, 3):
        images = _latents(c) / 8
        shown, note = displayable(images)
        assert note is None and shown is images
    shown, note = displayable(np.zeros((2, 5, 5)))
    assert note is None and shown.shape == (2, 5, 5, 1)


@pytest.mark.parametrize("c, kept, which", [(2, 1, "channel 0 as grey"), (4, 3, "channels 0-2")])
def test_displayable_previews_raw_channels_without_a_decoder(c, kept, which):
    latents = _latents(c)
    shown, note = displayable(latents)
    assert shown.shape == (4, 3, 3, kept)
    assert note.startswith(f"{c}-channel samples: no decoder configured; showing {which}")
    # Each shown channel is its own channel, rescaled over the batch to exactly [-1, 1].
    for k in range(kept):
        x = latents[..., k]
        expected = (x - x.min()) / (x.max() - x.min()) * 2 - 1
        np.testing.assert_allclose(shown[..., k], expected, atol=1e-5)


def test_displayable_constant_and_nan_channels_are_grey():
    latents = np.zeros((2, 2, 2, 5), np.float32)
    latents[0, 0, 0, 1] = np.nan
    shown, _ = displayable(latents)
    assert np.isfinite(shown[..., 0]).all() and (shown[..., 0] == 0).all()
    with pytest.warns(UserWarning, match="5-channel"):
        assert make_grid(latents[:1], padding=0)[1, 1, 1] == 128


def test_decoder_is_used_for_other_channel_counts():
    seen = []

    def decode(z):
        seen.append(z.shape)
        return np.tanh(z[..., :3]).repeat(2, axis=1).repeat(2, axis=2)  # a 2x "VAE"

    latents = _latents(4)
    shown, note = displayable(latents, decode)
    assert note is None and seen == [(4, 3, 3, 4)] and shown.shape == (4, 6, 6, 3)
    grid = make_grid(latents, nrow=4, padding=0, decode=decode)
    assert grid.shape == (6, 24, 3)
    with pytest.raises(ValueError, match=r"decode turned 4-channel.*\[4, H, W, 1 or 3\]"):
        displayable(latents, lambda z: z)


def test_make_grid_warns_with_the_channel_count():
    with pytest.warns(
        UserWarning, match="4-channel samples: no decoder configured; showing channels 0-2"
    ):
        grid = make_grid(_latents(4), nrow=2, padding=1)
    assert grid.shape == (2 * 4 + 1, 2 * 4 + 1, 3)


def test_save_image_grid_writes_latent_previews_to_gcs(fake_gcs):
    url = f"gs://{fakegcs.BUCKET}/run/samples/step_000010.png"
    with pytest.warns(UserWarning, match="8-channel"):
        path = save_image_grid(url, _latents(8), nrow=2, scale=3)
    assert path == url
    with Image.open(fakegcs.local_path(fake_gcs, url)) as im:
        assert im.format == "PNG" and im.size == (3 * 9, 3 * 9)
