"""EDM2's recipe on the bundled digits: the magnitude-preserving U-Net, its training rules.

* network: ``EDM2UNet`` (forced weight normalisation after every update, applied by the
  trainer through the model's ``project_params``);
* ``EDM(sigma_data=0.5)`` with EDM2's ImageNet-64 noise distribution (P_mean -0.8,
  P_std 1.6);
* Adam with ``b2=0.99`` and EDM2's inverse-square-root learning rate (``t_ref`` = 1000
  steps here; EDM2 uses 35000-70000 steps at batch 2048);
* two power-function EMA profiles (sigma_rel 0.05 and 0.10) snapshotted every 500 steps,
  so any EMA length can be rebuilt afterwards:
  ``python -m jaxdiff.experiment.phema --workdir=W --std=0.08`` then
  ``python -m sample --workdir=W --ema=phema:0.08`` (docs/phema.md).

EDM2's learned-uncertainty loss weighting (``jaxdiff.models.edm2.uncertainty_loss``) is not
used by the shared train step; the loss is EDM's.

Usage: ``python -m train --config=train/configs/edm2_digits.py --workdir=runs/edm2``.
"""

from train.configs.common import base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.model.name = "edm2"
    c.model.img_resolution = 8
    c.model.model_channels = 32
    c.model.channel_mult = (1, 2)
    c.model.num_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.channels_per_head = 16
    c.model.dropout = 0.1
    c.formulation.name = "edm"
    c.formulation.sigma_data = 0.5
    c.formulation.p_mean = -0.8
    c.formulation.p_std = 1.6
    c.optim.learning_rate = 1e-2
    c.optim.warmup_steps = 100
    c.optim.schedule = "inverse_sqrt"
    c.optim.decay_steps = 1000
    c.optim.b2 = 0.99
    c.train.num_steps = 2500
    c.train.batch_size = 64
    c.train.ema_rates = ()
    c.train.ema_stds = (0.05, 0.1)
    c.train.phema_every = 500
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.sample.grid_size = 100
    c.sample.grid_scale = 4
    return c
