"""DINOv2 (FD-DINOv2) parity with the upstream PyTorch ViT and EDM2's preprocessing.

The golden (``tests/goldens/make_dinov2_golden.py``) holds a tiny random-weight upstream
ViT's state dict, uint8 images, EDM2's preprocessed tensors and the network's outputs;
``dinov2_tiny.pth`` is the same state dict written by ``torch.save``.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest

from jaxdiff.metrics import convert_dinov2, dinov2
from jaxdiff.pretrained.weights_io import WeightsError, read_weights, write_weights

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
GOLDEN = np.load(os.path.join(GOLDENS, "dinov2_tiny.npz"))
PTH = os.path.join(GOLDENS, "dinov2_tiny.pth")
META = json.loads(str(GOLDEN["config"][0]))
TINY = dinov2.DINOv2Config(
    embed_dim=META["model"]["embed_dim"],
    depth=META["model"]["depth"],
    num_heads=META["model"]["num_heads"],
    img_size=META["model"]["img_size"],
)
STATE = {k[3:]: GOLDEN[k] for k in GOLDEN.files if k.startswith("sd/")}
# (tag, network input size): a = upsampled 32 -> 56 (grid 4x4 from the native 5x5),
# b = 100x90 -> 42x70 (non-square 3x5 grid), c = 70 -> 70 (native grid, identity resize).
CASES = (("a", (56, 56)), ("b", (42, 70)), ("c", (70, 70)))


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def _params():
    from jaxdiff.utils.trees import unflatten_tree

    return unflatten_tree(convert_dinov2.convert_state_dict(STATE, TINY))


def _rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("tag,size", [c for c in CASES if c[0] != "c"])
def test_preprocess_matches_edm2(tag, size):
    got = dinov2.preprocess(_nhwc(GOLDEN[f"u_{tag}"]), size=size)
    np.testing.assert_allclose(got, _nhwc(GOLDEN[f"pre_{tag}"]), atol=1e-5, rtol=0)


def test_preprocess_at_224_up_and_down():
    # EDM2's real geometry: 64 -> 224 (upsampling) and 256 -> 224 (antialiased shrink),
    # checked on every 8th output pixel (what the golden keeps).
    u_d = GOLDEN["u_d"]
    for u, ref in ((u_d, GOLDEN["pre_d"]), (np.tile(u_d, (1, 1, 4, 4)), GOLDEN["pre_e"])):
        got = np.asarray(dinov2.preprocess(_nhwc(u)))
        assert got.shape == (1, 224, 224, 3)
        np.testing.assert_allclose(got[:, ::8, ::8], _nhwc(ref), atol=1e-5, rtol=0)


def test_preprocess_input_ranges_and_errors():
    u = _nhwc(GOLDEN["u_d"])[:, :14, :14]
    from_uint8 = dinov2.preprocess(u, size=7)
    from_float = dinov2.preprocess(
        u.astype(np.float32) / 127.5 - 1.0, input_range="minus_one_one", size=7
    )
    np.testing.assert_allclose(from_float, from_uint8, atol=1e-6)
    gray = dinov2.preprocess(u[..., :1], size=7)
    # Grayscale is repeated to RGB: the channels differ only by their normalisation.
    np.testing.assert_allclose(
        gray[..., 0] * 0.229 + 0.485, gray[..., 1] * 0.224 + 0.456, atol=1e-6
    )
    with pytest.raises(ValueError, match="input_range"):
        dinov2.preprocess(u, input_range="0_1")
    with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
        dinov2.preprocess(u[0])


def test_pos_embed_interpolation_published_geometry():
    # 518 native (37x37) to EDM2's 224 input (16x16), by upstream's own method.
    got = dinov2.interpolate_pos_embed(GOLDEN["pos37"], 16, 16)
    np.testing.assert_allclose(got, GOLDEN["pos37_16"], atol=1e-5, rtol=0)
    same = dinov2.interpolate_pos_embed(GOLDEN["pos37"], 37, 37)
    np.testing.assert_array_equal(same, GOLDEN["pos37"])


def test_features_match_upstream():
    # Jitted (one small compile per input size) is ~4x faster here than op-by-op.
    params = _params()
    for tag, size in CASES:
        run = jax.jit(functools.partial(dinov2.dinov2_features, config=TINY, size=size))
        got = run(params, _nhwc(GOLDEN[f"u_{tag}"]))
        assert got.shape == GOLDEN[f"out_{tag}"].shape
        # Seen: <= 6e-7 relative on CPU; the brief's bar is 1e-4.
        assert _rel_err(got, GOLDEN[f"out_{tag}"]) < 1e-5, tag


def test_convert_pth_round_trip(tmp_path, capsys):
    dst = str(tmp_path / "tiny.safetensors")
    config, count, digest = convert_dinov2.convert(PTH, dst, TINY)
    assert config == TINY
    assert count == sum(v.size for k, v in STATE.items() if k != "mask_token")
    tensors, meta = read_weights(dst)
    assert meta["jaxdiff.format"] == dinov2.FORMAT and meta["jaxdiff.sha256"] == digest
    params, loaded = dinov2.load_dinov2_params(dst)
    assert loaded == TINY
    jax.tree.map(np.testing.assert_array_equal, params, _params())
    # The CLI recognises only the published sizes: the tiny net needs an explicit config.
    assert convert_dinov2.main(["--src", PTH, "--dst", dst]) == 2
    assert "match no preset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("blocks.1.ls2.gamma"), "missing key 'blocks.1.ls2.gamma'"),
        (lambda sd: sd.update(extra=np.zeros(2)), r"unexpected keys \['extra'\]"),
        (
            lambda sd: sd.update({"norm.bias": np.zeros(5, np.float32)}),
            r"key 'norm.bias' has shape \(5,\), expected \(24,\)",
        ),
    ],
)
def test_convert_bad_keys(edit, match):
    sd = dict(STATE)
    edit(sd)
    with pytest.raises(WeightsError, match=f"my.pth: {match}"):
        convert_dinov2.convert_state_dict(sd, TINY, source="my.pth")


def test_infer_config_errors_and_presets():
    with pytest.raises(WeightsError, match="register-token"):
        convert_dinov2.infer_config({**STATE, "register_tokens": np.zeros((1, 4, 24))})
    with pytest.raises(WeightsError, match="not a DINOv2"):
        convert_dinov2.infer_config({"w": np.zeros(2)})
    fake = {"cls_token": np.zeros((1, 1, 1024))}
    fake.update({f"blocks.{i}.norm1.weight": np.zeros(1024) for i in range(24)})
    assert convert_dinov2.infer_config(fake) == dinov2.PRESETS["vitl14"]
    with pytest.raises(ValueError, match="unknown DINOv2 arch"):
        dinov2.get_config("vitg14")


def test_load_rejects_other_files(tmp_path):
    path = str(tmp_path / "other.safetensors")
    write_weights(path, {"w": np.zeros(2, np.float32)})
    with pytest.raises(WeightsError, match="not a converted DINOv2 file"):
        dinov2.load_dinov2_params(path)


def test_preset_param_counts():
    # Upstream's state dicts (counted in the golden script) also hold the unused mask_token
    # ([1, embed_dim]), which the converter drops.
    upstream = META["param_counts"]
    for arch, name in (("vits14", "vit_small"), ("vitb14", "vit_base"), ("vitl14", "vit_large")):
        cfg = dinov2.PRESETS[arch]
        shapes = dinov2.param_shapes(cfg)
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
        print(f"{arch}: {count:,} params (+{cfg.embed_dim} mask token = {upstream[name]:,})")
        assert count + cfg.embed_dim == upstream[name]
    assert upstream["vit_large"] == 304_368_640
    # EDM2's path end to end, shapes only: 64x64 uint8 -> 224 -> ViT-L/14 (16x16 grid).
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), np.uint8)
    out = jax.eval_shape(dinov2.dinov2_features, shapes, images)  # (vitl14 from the loop)
    assert out.shape == (2, 1024) and out.dtype == np.float32


def test_fd_dinov2_evaluator_statistics_and_errors(tmp_path, monkeypatch):
    """The "fd_dinov2" evaluator: reference statistics in its own space, FD ~0 on itself."""
    from jaxdiff.metrics import (
        ReferenceStatistics,
        evaluate_samples,
        get_evaluator,
        save_reference_statistics,
    )
    from jaxdiff.metrics.fd_dinov2 import DINOV2_WEIGHTS_ENV, dinov2_feature_name

    weights = str(tmp_path / "tiny.safetensors")
    convert_dinov2.convert(PTH, weights, TINY)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (12, 20, 20, 3)).astype(np.float32)
    stats_path = tmp_path / "ref.npz"
    digest = save_reference_statistics(
        "fd_dinov2", images, stats_path, batch_size=4, dinov2_weights=weights
    )
    stats = ReferenceStatistics.load(stats_path, expected_sha256=digest)
    assert stats.feature == dinov2_feature_name(TINY) and stats.mu.shape == (TINY.embed_dim,)
    ev = get_evaluator("fd_dinov2", reference_stats=stats_path, dinov2_weights=weights)
    assert evaluate_samples(ev, images)["fd_dinov2"] == pytest.approx(0.0, abs=1e-3)
    shifted = np.clip(images + 0.5, -1, 1)
    assert evaluate_samples(ev, shifted)["fd_dinov2"] > 1e-3
    wrong = tmp_path / "fid_like.npz"
    ReferenceStatistics(np.zeros(3), np.eye(3), feature="inception_v3_pool3").save(wrong)
    with pytest.raises(ValueError, match="'inception_v3_pool3' features"):
        get_evaluator("fd_dinov2", reference_stats=wrong, dinov2_weights=weights)
    monkeypatch.delenv(DINOV2_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="convert_dinov2"):
        get_evaluator("fd_dinov2", reference_stats=stats_path)
    monkeypatch.setenv(DINOV2_WEIGHTS_ENV, weights)  # the environment names the weights
    assert get_evaluator("fd_dinov2", reference_stats=stats_path).name == "fd_dinov2"
