"""The default: a class-conditional EDM UNet on scikit-learn's bundled 8x8 digits.

Trains on a 2-core CPU in a few minutes and samples readable digits (see README).
Usage: ``python -m train`` or ``python -m train --config=train/configs/digits.py``.
"""

from train.configs.common import add_cep_options, add_model_speed_options, base_config


def get_config():
    c = base_config()
    c.data.name = "digits"
    c.model.name = "unet"
    add_model_speed_options(c)
    add_cep_options(c)
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.1
    c.formulation.name = "edm"
    c.formulation.sigma_data = 0.5
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 200
    # Sized for a 2-core CPU: ~140 ms a step, about 6 minutes in all.
    c.train.num_steps = 2500
    c.train.batch_size = 64
    c.train.ema_rates = (0.999,)
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.repa.hidden = 256  # REPA's 2048 would cost more than the network on a CPU
    c.sample.grid_size = 100
    c.sample.grid_scale = 4
    return c
