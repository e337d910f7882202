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


def write_image_folder(root, classes=("cats", "dogs"), per_class=8):
    """Noise images of odd sizes, JPEG and PNG; one subfolder per class ("" for flat)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def tiny_imagefolder_config(path, size="32"):
    """The imagefolder config at ``size`` px with a tiny UNet, 2 steps, no workers."""
    from train.configs import imagefolder

    config = imagefolder.get_config(size)
    config.data.path = str(path)
    config.data.workers = 0
    config.model.ch = 8
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = ()
    config.train.batch_size = 16
    config.train.num_steps = 2
    config.train.log_every = 1
    config.optim.warmup_steps = 0
    config.sample.steps = 2
    config.sample.grid_size = 4
    return config


def run_sharded_steps(mesh, step, state, batches, key_seed=3):
    """Runs ``step(state, None, {"image": b}, key)`` over ``batches``, jitted on ``mesh``.

    The state is replicated and the batch split over the mesh's batch axes; returns the
    final ``(state, metrics)`` on the host. Sharded-equals-one-device tests call it twice.
    """
    import jax

    from jaxdiff.parallel import batch_sharding, replicated

    rep = replicated(mesh)
    shard = jax.tree.map(lambda _: rep, state)
    jitted = jax.jit(
        step,
        in_shardings=(shard, None, batch_sharding(mesh), rep),
        out_shardings=(shard, rep),
    )
    state = jax.device_put(state, shard)
    metrics = None
    for batch in batches:
        state, metrics = jitted(state, None, {"image": batch}, jax.random.key(key_seed))
    return jax.device_get((state, metrics))
