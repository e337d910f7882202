"""A small class-conditional DiT on the bundled 8x8 digits (EDM formulation).

Patch size 2 gives 16 tokens per image, so token-level methods (NegToMe, REPA on DiT
blocks, PAG/SLG on transformer blocks) can be tried on a 2-core CPU in minutes.
Usage: ``python -m train --config=train/configs/dit_digits.py --workdir=RUN``.
"""

import ml_collections

from train.configs.common import add_cep_options, add_model_speed_options, base_config


def get_config() -> ml_collections.ConfigDict:
    """The digits DiT config (see the module docstring)."""
    c = base_config()
    c.data.name = "digits"
    c.model.name = "dit"
    add_model_speed_options(c, dit=True)
    add_cep_options(c)
    c.model.patch_size = 2
    c.model.hidden_size = 96
    c.model.depth = 6
    c.model.num_heads = 4
    c.formulation.name = "edm"
    c.formulation.sigma_data = 0.5
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.train.num_steps = 3000
    c.train.batch_size = 64
    c.train.ema_rates = (0.999,)
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.repa.hidden = 256  # REPA's 2048 would cost more than the network on a CPU
    c.sample.grid_size = 100
    c.sample.grid_scale = 4
    return c
