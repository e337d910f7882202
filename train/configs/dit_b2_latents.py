"""DiT-B/2 on 32x32x4 latents (ImageNet-256 through a VAE), flow matching.

Reads pre-extracted latents from a tfds dataset with an ``image`` float feature of shape
(32, 32, 4) (``--config.data.name=tfds:NAME --config.data.data_dir=DIR``); the default
``synthetic_latents`` needs no data and is meant for throughput runs.
"""

import ml_collections

from train.configs.common import base_config


def get_config():
    c = base_config()
    c.data.name = "synthetic_latents"
    c.model.name = "dit-B/2"  # a size after "dit-" picks DiT.from_name("B/2")
    c.model.attention_impl = ml_collections.FieldReference(None, field_type=str)  # "cudnn" on GPU
    c.formulation.name = "flow"
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.train.num_steps = 400000
    c.train.batch_size = 256
    c.train.ema_rates = (0.9999,)
    c.train.log_every = 100
    c.train.checkpoint_every = 10000
    c.sample.solver = "euler"
    c.sample.steps = 50
    c.sample.sigma_min = 0.001
    c.sample.sigma_max = 999.0
    c.sample.guidance = "cfg:1.5"
    return c
