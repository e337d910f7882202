"""Latent diffusion end to end: image folder -> VAE latents -> 20 training steps -> images.

The VAE is the tiny diffusers golden (``tests/goldens/vae_tiny.npz``: 2x downsampling, 4
latent channels), converted with the real command, so the path is the one a user runs
with ``sd-vae-ft-mse`` at full size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import write_image_folder

from jaxdiff.experiment import load_run, train_and_evaluate
from jaxdiff.pretrained.convert import convert
from jaxdiff.pretrained.encode import encode_dataset
from train.configs.dit_b2_latents import get_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def latent_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latent")
    with np.load(ROOT / "tests" / "goldens" / "vae_tiny.npz") as z:
        state = {k[len("state/") :]: z[k] for k in z.files if k.startswith("state/")}
    np.savez(folder / "vae.npz", **state)
    vae = folder / "vae.safetensors"
    convert(str(folder / "vae.npz"), str(vae), overrides={"norm_num_groups": 4})
    images = write_image_folder(folder / "images", per_class=6)
    shards = folder / "latents"
    summary = encode_dataset(
        images, shards, vae_file=vae, image_size=16, batch_size=4, progress=False
    )
    assert tuple(summary.latent_shape) == (8, 8, 4) and summary.num_examples == 12
    return folder, vae, shards


def _config(shards, vae):
    config = get_config()
    config.data.name = "latents"
    config.data.path = str(shards)
    config.vae.path = str(vae)
    config.model.depth = 1
    config.model.hidden_size = 32
    config.model.num_heads = 2
    config.optim.learning_rate = 1e-2
    config.train.num_steps = 20
    config.train.batch_size = 8
    config.train.log_every = 5
    config.train.checkpoint_every = 20
    config.train.ema_rates = (0.9,)
    config.sample.steps = 2
    config.sample.grid_size = 4
    config.sample.grid_scale = 1
    return config


def test_encode_train_and_decode_a_grid(latent_setup):
    folder, vae, shards = latent_setup
    workdir = folder / "run"
    state = train_and_evaluate(_config(shards, vae), workdir)
    assert int(state.step) == 20
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 4 and all(np.isfinite(losses))
    with Image.open(workdir / "samples" / "step_000020.png") as im:
        # 4 decoded 16x16 RGB images, 2 per row, 1-pixel padding: not a latent preview.
        assert im.mode == "RGB" and im.size == (2 * 17 + 1, 2 * 17 + 1)
        assert np.asarray(im).std() > 0
    run = load_run(str(workdir))
    np.testing.assert_allclose(run.latent["scale"], [0.18215] * 4, rtol=1e-6)
    assert run.sample_shape == (8, 8, 4)

    # python -m sample decodes through the run's config.vae.path by default.
    out = folder / "sampled.png"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "sample", f"--workdir={workdir}", "--num=3", f"--out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = np.load(folder / "sampled.npz")
    assert written["samples"].shape == (3, 16, 16, 3) and written["latents"].shape == (3, 8, 8, 4)
    assert np.abs(written["samples"]).max() <= 1.0
