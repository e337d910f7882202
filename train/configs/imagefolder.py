"""A UNet on your own folder of images, at 32 or 64 px (EDM formulation).

    python -m train --config=train/configs/imagefolder.py --config.data.path=DIR
    python -m train --config=train/configs/imagefolder.py:32 --config.data.path=DIR

``DIR`` is a folder of JPEG/PNG/WebP images, either flat (unconditional) or with one
subfolder per class (ImageNet style; the model is then class-conditional), or the output
of ``python -m jaxdiff.data.prepare`` (faster to read: add ``--config.data.name=arrayrecord``).
Images are centre-cropped and resized as ADM does and flipped at random. A local path or a
``gs://`` URL both work. The argument after ``:`` picks the resolution (default 64).
"""

import ml_collections

from train.configs.common import add_model_speed_options, base_config

# Per resolution: (channel multipliers, attention resolutions), as DDPM++/ADM size them.
_ARCH = {32: ((2, 2, 2), (16,)), 64: ((1, 2, 2, 2), (16,))}


def get_config(resolution: str = "64"):
    size = int(resolution)
    if size not in _ARCH:
        raise ValueError(
            f"imagefolder config: resolution {size} is not one of {sorted(_ARCH)}; use e.g. "
            "--config=train/configs/imagefolder.py:64"
        )
    c = base_config()
    c.data.name = "imagefolder"
    c.data.image_size = size
    c.data.random_flip = True
    c.data.conditional = ml_collections.FieldReference(None, field_type=bool)  # None: auto
    c.data.workers = 4
    c.model.name = "unet"
    add_model_speed_options(c)
    c.model.ch = 128
    c.model.ch_mult, c.model.attn_resolutions = _ARCH[size]
    c.model.num_res_blocks = 2
    c.model.dropout = 0.1
    c.formulation.name = "edm"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.train.num_steps = 200000
    c.train.batch_size = 256
    c.train.ema_rates = (0.9999,)
    c.train.log_every = 500
    c.train.checkpoint_every = 10000
    c.train.sample_every = 10000
    c.sample.grid_size = 64
    return c
