"""2-D toy data (ring of 8 Gaussians by default) with a small MLP.

``--config.data.name=moons`` or ``checkerboard`` switches the distribution.
"""

from train.configs.common import base_config


def get_config():
    c = base_config()
    c.data.name = "toy_gmm"
    c.model.name = "mlp"
    c.model.features = 128
    c.model.depth = 3
    c.formulation.name = "edm"
    c.formulation.sigma_data = 1.5
    c.optim.learning_rate = 2e-3
    c.train.num_steps = 3000
    c.train.batch_size = 512
    c.train.label_dropout = 0.1
    c.sample.grid_size = 4096
    c.sample.sigma_max = 40.0
    return c
