"""Every shipped config builds; the toy config trains end to end and renders its samples."""

import importlib

import numpy as np
import pytest
from PIL import Image
from tiny import tiny_imagefolder_config, write_image_folder

from jaxdiff.experiment import build_experiment, train_and_evaluate


def _config(name):
    return importlib.import_module(f"train.configs.{name}").get_config()


@pytest.mark.parametrize("name", ["digits", "toy2d", "dit_b2_latents", "edm2_digits", "dit_digits"])
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


def test_imagefolder_config_on_a_flat_folder_is_unconditional(tmp_path):
    folder = write_image_folder(tmp_path / "flat", classes=("",))
    config = tiny_imagefolder_config(folder, size="64")
    exp = build_experiment(config)
    assert exp.num_classes == 0 and exp.sample_shape == (64, 64, 3)
    batch = next(exp.data)
    assert "label" not in exp.to_model_batch(batch)


def test_imagefolder_config_rejects_an_unknown_resolution():
    with pytest.raises(ValueError, match="resolution 48"):
        importlib.import_module("train.configs.imagefolder").get_config("48")


@pytest.mark.parametrize(
    "data, model, match",
    [
        (dict(augment="mixup"), {}, "unknown config.data.augment='mixup'"),
        (dict(augment="edm", random_flip=True), dict(augment_dim=9), "already flips"),
        (dict(augment="edm"), {}, "--config.model.augment_dim=9"),
        (dict(workers=-1), {}, "config.data.workers=-1"),
    ],
)
def test_bad_data_settings_name_the_flag(data, model, match):
    from jaxdiff.errors import InvalidArgumentError
    from jaxdiff.experiment.builders import build_data

    config = _config("digits")
    config.data.update(data)
    config.model.update(model)
    with pytest.raises(InvalidArgumentError, match=match):
        build_data(config)
