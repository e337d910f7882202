"""jaxdiff: diffusion models in JAX/Flax — training, guidance and distillation."""

__version__ = "0.1.0"
