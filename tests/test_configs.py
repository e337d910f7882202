"""Every shipped config builds; the toy config trains end to end and renders its samples."""

import importlib

import numpy as np
import pytest
from PIL import Image

from jaxdiff.experiment import build_experiment, train_and_evaluate


def _config(name):
    return importlib.import_module(f"train.configs.{name}").get_config()


@pytest.mark.parametrize("name", ["digits", "toy2d", "dit_b2_latents"])
def test_config_builds(name):
    exp = build_experiment(_config(name))
    assert exp.num_classes > 0
    assert exp.to_model_batch(next(exp.data))["image"].shape[1:] == exp.sample_shape


def test_cifar10_config_builds_on_mock_tfds(mock_tfds):
    config = _config("cifar10_edm")
    config.train.batch_size = 16
    exp = build_experiment(config)
    batch = next(exp.data)
    assert exp.sample_shape == (32, 32, 3) and exp.num_classes == 10
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    # EDM's augmentation pipe, with its labels for the network (augment_dim=9).
    labels = exp.to_model_batch(batch)["augment_label"]
    assert labels.shape == (16, 9)
    plain = batch["image"][~labels.any(axis=1)]  # untouched examples stay in [-1, 1]
    assert -1.0 <= plain.min() and plain.max() <= 1.0


def test_toy_config_trains_and_renders_points(tmp_path):
    config = _config("toy2d")
    config.model.features = 16
    config.model.depth = 1
    config.train.num_steps = 5
    config.train.batch_size = 64
    config.train.log_every = 5
    config.sample.steps = 3
    config.sample.grid_size = 256
    state = train_and_evaluate(config, tmp_path)
    assert int(state.step) == 5
    img = Image.open(tmp_path / "samples" / "step_000005.png")
    assert img.size == (130, 130)  # one 128x128 density image with 1-pixel padding


def _image_folder(root, classes=("cats", "dogs"), per_class=8):
    rng = np.random.default_rng(0)
    for c in classes:
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def _tiny_imagefolder(path, size="32"):
    config = importlib.import_module("train.configs.imagefolder").get_config(size)
    config.data.path = str(path)
    config.data.workers = 0
    config.model.ch = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.train.batch_size = 16
    config.train.num_steps = 2
    config.train.log_every = 1
    config.optim.warmup_steps = 0
    config.sample.steps = 2
    config.sample.grid_size = 4
    return config


def test_imagefolder_config_trains_on_a_class_folder(tmp_path):
    config = _tiny_imagefolder(_image_folder(tmp_path / "images"))
    exp = build_experiment(config)
    assert exp.num_classes == 2 and exp.sample_shape == (32, 32, 3)  # labelled: conditional
    state = train_and_evaluate(config, tmp_path / "run")
    assert int(state.step) == 2
    assert Image.open(tmp_path / "run" / "samples" / "step_000002.png").mode == "RGB"


def test_imagefolder_config_on_a_flat_folder_is_unconditional(tmp_path):
    config = _tiny_imagefolder(_image_folder(tmp_path / "flat", classes=("",)), size="64")
    exp = build_experiment(config)
    assert exp.num_classes == 0 and exp.sample_shape == (64, 64, 3)
    batch = next(exp.data)
    assert "label" not in exp.to_model_batch(batch)


def test_imagefolder_config_rejects_an_unknown_resolution():
    with pytest.raises(ValueError, match="resolution 48"):
        importlib.import_module("train.configs.imagefolder").get_config("48")
