"""EDM2's recipe trains through the shared loop: forced weight norm, power EMA, snapshots."""

import importlib

import jax
import numpy as np
import pytest

from jaxdiff.experiment import build_experiment, load_run, train_and_evaluate
from jaxdiff.models import EDM2UNet


def _config():
    config = importlib.import_module("train.configs.edm2_digits").get_config()
    config.model.model_channels = 16
    config.train.num_steps = 3
    config.train.batch_size = 16
    config.train.log_every = 3
    config.train.checkpoint_every = 3
    config.train.phema_every = 3
    config.optim.warmup_steps = 1
    config.optim.decay_steps = 2
    config.sample.steps = 1
    config.sample.grid_size = 4
    return config


def _weight_rms(params):
    """Per-output-channel RMS of every MPConv weight (HWIO or [in, out]: output last)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("weight"):
            w = np.asarray(leaf, np.float64)
            out[name] = np.sqrt(np.mean(w.reshape(-1, w.shape[-1]) ** 2, axis=0))
    return out


def test_edm2_config_builds_with_the_mp_unet():
    exp = build_experiment(_config())
    assert isinstance(exp.model, EDM2UNet) and exp.sample_shape == (8, 8, 1)


# 84 s: the EDM2 recipe end to end; its parts are tested in test_models_edm2, test_phema.
@pytest.mark.slow
def test_edm2_recipe_keeps_weights_normalised_and_snapshots_profiles(tmp_path):
    state = train_and_evaluate(_config(), tmp_path)
    assert int(state.step) == 3 and set(state.ema) == {"std0.050", "std0.100"}
    rms = _weight_rms(state.params)
    assert rms, "no MPConv weights found"
    for name, values in rms.items():
        # Forced weight normalisation after every Adam step: unit RMS per output channel
        # (EDM2's fixed point is 1 - 1e-4), although lr 1e-2 moved every weight.
        np.testing.assert_allclose(values, 1.0, atol=1e-3, err_msg=name)
    assert sorted(p.name for p in (tmp_path / "phema").glob("snapshot-*")) == [
        "snapshot-00000003.safetensors"
    ]
    run = load_run(str(tmp_path))
    assert run.which == "std0.050" and isinstance(run.model, EDM2UNet)
