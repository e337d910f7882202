"""EDM's class-conditional DDPM++ setting on CIFAR-10 (tfds ``cifar10``, array_record).

Prepare the data once (needs TensorFlow and network) and pass its directory:
``python -m train --config=train/configs/cifar10_edm.py --config.data.data_dir=DIR``.
EDM trains 200 Mimg at batch 512 with lr 1e-3, dropout 0.13, EMA half-life 0.5 Mimg, and
its non-leaking geometric augmentation (``--augment=0.12``): each transform with probability
0.12, the network conditioned on the 9 augmentation labels (zeros when sampling).
"""

from train.configs.common import add_model_speed_options, base_config


def get_config():
    c = base_config()
    c.data.name = "cifar10"
    c.data.augment = "edm"  # jaxdiff.data.augment.EdmAugment with EDM's CIFAR-10 multipliers
    c.data.augment_p = 0.12
    c.model.name = "unet"
    add_model_speed_options(c)
    c.model.ch = 128
    c.model.ch_mult = (2, 2, 2)
    c.model.num_res_blocks = 4
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.13
    c.model.augment_dim = 9  # EdmAugment().label_dim
    c.formulation.name = "edm"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 20000  # EDM ramps the lr over 10 Mimg
    c.train.num_steps = 400000
    c.train.batch_size = 512
    c.train.ema_rates = (0.999943,)  # ~0.5 Mimg half-life at batch 512
    c.train.log_every = 500
    c.train.checkpoint_every = 10000
    c.train.sample_every = 10000
    return c
