"""A tiny digits config shared by the training and CLI tests (seconds on a CPU)."""

from train.configs.digits import get_config

TINY_MODEL_FLAGS = [
    "--config.model.ch=8",
    "--config.model.ch_mult=(1,)",
    "--config.model.attn_resolutions=()",
    "--config.model.dropout=0.0",
    "--config.train.batch_size=16",
    "--config.optim.warmup_steps=0",
]
"""``python -m train`` flags giving the model and batch of :func:`tiny_config`."""


def tiny_config(num_steps=10, **train):
    c = get_config()
    c.model.ch = 8
    c.model.ch_mult = (1,)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.model.dropout = 0.0
    c.train.num_steps = num_steps
    c.train.batch_size = 16  # two examples on each of the 8 test devices
    c.train.log_every = 5
    c.train.checkpoint_every = 5
    c.optim.warmup_steps = 0
    c.optim.learning_rate = 2e-3
    c.sample.steps = 3
    c.sample.grid_size = 0  # no sample grid (a test that wants one sets it)
    c.sample.grid_scale = 2
    for k, v in train.items():
        c.train[k] = v
    return c
