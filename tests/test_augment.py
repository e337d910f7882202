"""Host augmentations: keyed determinism, EDM's transforms, labels and probabilities."""

import dataclasses
import math
import pickle

import numpy as np
import pytest

from jaxdiff.data.augment import AUGMENT_LABEL, EdmAugment, random_flip, translate_int

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)
KEYS = np.array([3, 1 << 40, 7, 2**64 - 1, 0, 12345], np.uint64)
OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
"""EdmAugment multipliers that switch every default transform off."""


def batch(images=IMAGES):
    return {"image": images, "label": np.arange(len(images), dtype=np.int32)}


def only(**kwargs):
    """An EdmAugment with p=1 and only the named transforms on."""
    return EdmAugment(**{"p": 1.0, **OFF, **kwargs})


def blob(size=32, x=0.0, y=0.0, sigma=2.5):
    """A [size, size, 1] Gaussian blob centred (x, y) pixels right/below the image centre."""
    c = np.arange(size) - (size - 1) / 2
    img = np.exp(-((c[None, :] - x) ** 2 + (c[:, None] - y) ** 2) / (2 * sigma**2))
    return (2 * img - 1).astype(np.float32)[..., None]


def centroid(img):
    """(x, y) centre of mass of a blob image, in pixels from the image centre."""
    m = img[..., 0] + 1
    c = np.arange(img.shape[0]) - (img.shape[0] - 1) / 2
    return (m * c[None, :]).sum() / m.sum(), (m * c[:, None]).sum() / m.sum()


@pytest.mark.parametrize("augment", [EdmAugment(p=1.0), random_flip], ids=["edm", "flip"])
def test_keys_alone_determine_each_example(augment):
    out = augment(batch(), KEYS)
    again = augment(batch(), KEYS.copy())
    for k in out:
        np.testing.assert_array_equal(out[k], again[k])
    np.testing.assert_array_equal(out["label"], batch()["label"])  # other entries pass
    # Example i depends on (image i, key i) only: alone, reordered or among other
    # neighbours it comes out bit-identical.
    perm = np.array([4, 2, 0, 5, 1, 3])
    shuffled = augment(batch(IMAGES[perm]), KEYS[perm])
    for k in ("image", AUGMENT_LABEL) if AUGMENT_LABEL in out else ("image",):
        np.testing.assert_array_equal(shuffled[k], out[k][perm])
        alone = augment(batch(IMAGES[2:3]), KEYS[2:3])
        np.testing.assert_array_equal(alone[k][0], out[k][2])
    other = augment(batch(IMAGES), KEYS + np.uint64(1))
    assert not np.array_equal(other["image"], out["image"])


def test_random_flip_mirrors_about_half():
    keys = np.arange(2000, dtype=np.uint64)
    images = np.broadcast_to(IMAGES[:1], (2000, 8, 8, 3))
    out = random_flip({"image": images}, keys)["image"]
    flipped = np.all(out == IMAGES[0, :, ::-1], axis=(1, 2, 3))
    assert np.all(flipped | np.all(out == IMAGES[0], axis=(1, 2, 3)))
    assert 0.45 < flipped.mean() < 0.55


def test_p0_is_identity_with_zero_labels():
    out = EdmAugment(p=0.0, rotate_int=1, translate_int=1)(batch(), KEYS)
    np.testing.assert_array_equal(out["image"], IMAGES)
    assert out[AUGMENT_LABEL].shape == (6, 13) and out[AUGMENT_LABEL].dtype == np.float32
    np.testing.assert_array_equal(out[AUGMENT_LABEL], 0.0)


def test_default_label_layout_is_edms():
    from jaxdiff.training import step

    assert step.AUGMENT_LABEL == AUGMENT_LABEL  # the train step reads what we write
    aug = EdmAugment()
    assert aug.label_dim == 9
    assert aug.label_names == (
        "xflip",
        "yflip",
        "scale",
        "rotate_cos_minus_1",
        "rotate_sin",
        "aniso_cos",
        "aniso_sin",
        "translate_frac_x",
        "translate_frac_y",
    )
    full = EdmAugment(rotate_int=1, translate_int=1).label_names
    assert full[:6] == ("xflip", "yflip", "rotate_int_x", "rotate_int_y") + (
        "translate_int_x",
        "translate_int_y",
    )
    labels = EdmAugment(p=1.0)(batch(), KEYS)[AUGMENT_LABEL]
    assert set(np.unique(labels[:, :2])) <= {0.0, 1.0}
    # Rotation columns are (cos - 1, sin) of one angle.
    np.testing.assert_allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, 1.0, rtol=1e-6)


def test_xflip_mirrors_iff_label():
    aug = only(xflip=1)
    out = aug(batch(), KEYS)
    bits = out[AUGMENT_LABEL][:, 0]
    assert aug.label_dim == 1 and 0 < bits.sum() < len(bits)
    for img, src, bit in zip(out["image"], IMAGES, bits, strict=True):
        np.testing.assert_array_equal(img, src[:, ::-1] if bit == 1 else src)


def test_integer_translation_moves_pixels_by_label():
    aug = only(translate_int=1, translate_int_max=0.25)
    out = aug(batch(), KEYS)
    shifts = out[AUGMENT_LABEL] * 8 * 0.25  # label = t / (size * translate_int_max)
    np.testing.assert_array_equal(shifts, np.round(shifts))
    assert np.abs(shifts).max() > 0
    pad = np.pad(IMAGES, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for i, (tx, ty) in enumerate(shifts.astype(int)):
        # EDM's convention: output (y, x) reads input (y + ty, x - tx), mirrored.
        np.testing.assert_array_equal(out["image"][i], pad[i, 2 + ty : 10 + ty, 2 - tx : 10 - tx])
    # Away from the borders a translation is a roll.
    np.testing.assert_array_equal(
        translate_int(IMAGES[0], 1, -2)[2:6, 2:6], np.roll(IMAGES[0], (2, 1), (0, 1))[2:6, 2:6]
    )


def test_geometric_transforms_follow_labels():
    # Fractional translation moves content by (w_x, w_y) * size * std, x right, y down.
    img = blob()[None]
    keys = np.arange(4, dtype=np.uint64)
    out = only(translate_frac=1, translate_frac_std=0.05)({"image": np.repeat(img, 4, 0)}, keys)
    for moved, (wx, wy) in zip(out["image"], out[AUGMENT_LABEL], strict=True):
        np.testing.assert_allclose(centroid(moved), (wx * 32 * 0.05, wy * 32 * 0.05), atol=0.05)
    # Rotation by theta sends a point at (5, 0) to (5 cos theta, -5 sin theta). (Small blobs
    # near the centre: reflect padding would add mirror images of wide or far ones.)
    img = blob(x=5.0, sigma=1.5)[None]
    out = only(rotate_frac=1)({"image": np.repeat(img, 4, 0)}, keys)
    for moved, (cos_m1, sin) in zip(out["image"], out[AUGMENT_LABEL], strict=True):
        np.testing.assert_allclose(centroid(moved), (5 * (cos_m1 + 1), -5 * sin), atol=0.05)
    # Isotropic scaling by 2^(w * scale_std) moves an off-centre blob outwards by that factor.
    img = blob(x=4.0, y=-3.0, sigma=1.5)[None]
    out = only(scale=1, scale_std=0.5)({"image": np.repeat(img, 4, 0)}, keys)
    for moved, (w,) in zip(out["image"], out[AUGMENT_LABEL], strict=True):
        np.testing.assert_allclose(centroid(moved), np.multiply((4, -3), 2 ** (w * 0.5)), atol=0.1)


def test_probabilities_match_p():
    n = 2000
    images = np.zeros((n, 2, 2, 1), np.float32)
    labels = EdmAugment()({"image": images}, np.arange(n, dtype=np.uint64))[AUGMENT_LABEL]
    frac = (labels != 0).mean(0)
    # xflip's multiplier 1e8 saturates: every example draws its bit. y-flip draws a bit
    # with probability p; the others apply with probability p. Bounds are >= 4 sigma.
    np.testing.assert_allclose(frac[0], 0.5, atol=0.05)
    np.testing.assert_allclose(frac[1], 0.06, atol=0.025)
    np.testing.assert_allclose(frac[[2, 4, 5, 7, 8]], 0.12, atol=0.03)
    # Raising p only adds transforms, with the same parameters (parameters drawn first).
    more = EdmAugment(p=0.5)({"image": images[:400]}, np.arange(400, dtype=np.uint64))
    more, less = more[AUGMENT_LABEL][:, 2], labels[:400, 2]
    np.testing.assert_array_equal(more[less != 0], less[less != 0])
    assert (more != 0).mean() > 0.4


def test_pickles_and_untouched_examples_are_exact():
    aug = EdmAugment(p=0.3)
    clone = pickle.loads(pickle.dumps(aug))
    assert clone == aug
    out, again = aug(batch(), KEYS), clone(batch(), KEYS)
    np.testing.assert_array_equal(out["image"], again["image"])
    untouched = ~out[AUGMENT_LABEL].any(1)
    np.testing.assert_array_equal(out["image"][untouched], IMAGES[untouched])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(p=1.5), r"p=1\.5.*\[0, 1\]"),
        (dict(scale=-1), "scale=-1.*>= 0"),
        (dict(aniso_std=math.inf), "aniso_std=inf"),
        (dict(translate_int_max=0.0), "translate_int_max"),
        (dict(order=7), "order=7"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EdmAugment(**kwargs)


def test_bad_inputs():
    aug = EdmAugment()
    with pytest.raises(ValueError, match=r"\[B, H, W, C\].*\(6, 8\)"):
        aug({"image": np.zeros((6, 8))}, KEYS)
    with pytest.raises(ValueError, match=r"keys must be an integer array of shape \(6,\)"):
        random_flip(batch(), KEYS[:3])
    with pytest.raises(ValueError, match="keys must be an integer"):
        aug(batch(), KEYS.astype(np.float64))
    with pytest.raises(ValueError, match="square"):
        dataclasses.replace(aug, rotate_int=1)({"image": np.zeros((1, 4, 8, 1))}, KEYS[:1])
