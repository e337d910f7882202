"""DiT-B/2 on 32x32x4 latents (ImageNet-256 through a VAE), flow matching.

The default dataset, ``synthetic_latents``, is fixed random ``[32, 32, 4]`` arrays with
1,000 labels: it needs no files and is meant for throughput runs (the values carry no
signal, so the samples are noise).

To train on real latents, encode the images once with the SD-VAE (resumable; see
docs/data.md, "Latents")::

    python -m jaxdiff.pretrained.encode --src IMAGES --dst DIR --vae VAE.safetensors --flip

then::

    python -m train --config=train/configs/dit_b2_latents.py --workdir=RUN \\
        --config.data.name=latents --config.data.path=DIR

Each epoch draws a fresh posterior sample ``mean + std * noise`` per image, as DiT and
REPA do (``--config.data.latents=mean`` uses the mean), scaled with the VAE scaling
recorded in the shards (``--config.data.latent_scale`` / ``latent_shift`` override it).
Shards encoded with ``--flip`` also hold the mirrored images' latents, used for half the
examples (``data.random_flip`` is ``None`` here: "when the shards have them").

Latents extracted by your own code work too, used exactly as stored (already scaled to
roughly unit variance, e.g. by Stable Diffusion's ``0.18215``; no ``[-1, 1]``
normalisation)::

    np.save("DIR/images.npy", latents)  # float16/float32 [N, 32, 32, 4]
    np.save("DIR/labels.npy", labels)   # int [N], classes 0..num_classes-1

with ``--config.data.name=npy --config.data.path=DIR``. ``DIR`` may be a local folder
(memory-mapped, so the set need not fit in memory) or a ``gs://`` URL (read whole into
memory); a single ``.npy`` file trains unconditionally (add
``--config.data.conditional=False``). Such arrays can also be written as ArrayRecord
shards with ``jaxdiff.data.write_arrays`` (``--config.data.name=arrayrecord``), or as
posterior moments with ``jaxdiff.data.write_latents`` (``--config.data.name=latents``). A
TFDS dataset with a float ``image`` feature works too: ``--config.data.name=tfds:NAME
--config.data.data_dir=DIR``.

Sample grids show latent channels 0-2 as a false-colour preview (with a warning), since
no VAE decoder is configured.
"""

import ml_collections

from train.configs.common import add_model_speed_options, base_config


def get_config() -> ml_collections.ConfigDict:
    """The DiT-B/2 latent flow-matching config (see the module docstring)."""
    c = base_config()
    c.data.name = "synthetic_latents"  # or "latents" / "npy" / "arrayrecord" with data.path
    # "latents": use the stored mirrored-image latents when the shards have them (encode
    # --flip); True requires them, False never uses them. Other datasets: no flips.
    c.data.random_flip = ml_collections.FieldReference(None, field_type=bool)
    c.model.name = "dit-B/2"  # a size after "dit-" picks DiT.from_name("B/2")
    add_model_speed_options(c, dit=True)
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
