"""The latent DiT config trains end to end on .npy latents and renders 4-channel grids."""

import json
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import write_arrays
from jaxdiff.experiment import build_experiment, train_and_evaluate
from train.configs.dit_b2_latents import get_config


def _write_latents(folder, n=64, shape=(8, 8, 4), classes=4):
    # Latents with structure (a per-class mean image plus small noise) so that the loss
    # can fall within a few steps; scaled like VAE latents, i.e. well outside [-1, 1].
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    means = rng.standard_normal((classes, *shape)) * 1.5
    latents = means[labels] + 0.1 * rng.standard_normal((n, *shape))
    folder.mkdir()
    np.save(folder / "images.npy", latents.astype(np.float32))
    np.save(folder / "labels.npy", labels)
    return folder


def _tiny(config, data_dir):
    config.data.name = "npy"
    config.data.path = str(data_dir)
    # The smallest DiT that still exercises every block type: one block, 2 heads of 16.
    config.model.depth = 1
    config.model.hidden_size = 32
    config.model.num_heads = 2
    config.optim.learning_rate = 1e-2
    config.train.num_steps = 20
    config.train.batch_size = 16  # two examples on each of the 8 test devices
    config.train.log_every = 5
    config.train.checkpoint_every = 20
    config.train.ema_rates = (0.9,)
    config.sample.steps = 2
    config.sample.grid_size = 8
    config.sample.grid_scale = 2
    return config


@pytest.mark.parametrize("fmt", ["npy", "arrayrecord"])
def test_latent_config_reads_latents_as_stored(tmp_path, fmt):
    data_dir = _write_latents(tmp_path / "latents")
    config = _tiny(get_config(), data_dir)
    if fmt == "arrayrecord":  # the same latents as shards, the format for large sets
        images, labels = np.load(data_dir / "images.npy"), np.load(data_dir / "labels.npy")
        config.data.name = "arrayrecord"
        config.data.path = write_arrays(tmp_path / "shards", images, labels, num_shards=2)
    exp = build_experiment(config)
    assert exp.sample_shape == (8, 8, 4) and exp.num_classes == 4
    batch = next(exp.data)
    assert batch["image"].dtype == np.float32 and np.abs(batch["image"]).max() > 1.0
    stored = {row.tobytes() for row in np.load(data_dir / "images.npy")}
    assert all(row.tobytes() in stored for row in batch["image"])


def test_latent_config_trains_on_npy_latents_and_writes_a_grid(tmp_path, caplog):
    data_dir = _write_latents(tmp_path / "latents")
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        state = train_and_evaluate(_tiny(get_config(), data_dir), run)
    # The grid notes that it previews raw channels: as a UserWarning from save_image_grid,
    # or logged by the grid hook if it calls jaxdiff.utils.displayable itself.
    notes = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert any("4-channel samples: no decoder configured; showing" in n for n in notes)
    assert int(state.step) == 20
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    # Flow matching on unit-scale latents starts near E|eps - x|^2 ~ 3; 20 steps of a
    # one-block DiT bring it down steadily (about 15%), not to convergence.
    assert len(losses) == 4 and losses[-1] < 0.95 * losses[0], losses
    with Image.open(run / "samples" / "step_000020.png") as im:
        # 8 samples, 3 per row: 3 rows of 8x8 tiles with 1-pixel padding, scaled by 2.
        assert im.mode == "RGB" and im.size == (2 * (3 * 9 + 1), 2 * (3 * 9 + 1))
        assert np.asarray(im).std() > 0  # a preview of the latents, not a blank image
