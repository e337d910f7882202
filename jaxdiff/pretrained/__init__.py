"""Published networks: torch-free weight files, converters and parity-checked loaders.

* :func:`load_pretrained`: a converted file -> module, params and formulation;
* :func:`load_vae`: a converted VAE -> batched, jitted ``encode``/``decode``;
* ``python -m jaxdiff.pretrained.convert``: a published checkpoint (DiT/SiT ``.pt``, EDM2
  ``.pkl``, diffusers ``.safetensors``) -> converted file, no torch needed;
* ``python -m jaxdiff.pretrained.encode``: an image dataset -> VAE latents in shards.

See docs/pretrained.md.

Example:
  >>> dit = load_pretrained("weights/dit-xl2-256.safetensors")  # doctest: +SKIP
  >>> denoise = dit.formulation.as_denoiser(  # doctest: +SKIP
  ...     lambda x, t, c: dit.model.apply({"params": dit.params}, x, t, c))
"""

from jaxdiff.pretrained.registry import Pretrained, load_pretrained, load_vae
from jaxdiff.pretrained.weights_io import StateDict, WeightsError, read_weights, write_weights

__all__ = [
    "Pretrained",
    "StateDict",
    "WeightsError",
    "load_pretrained",
    "load_vae",
    "read_weights",
    "write_weights",
]
