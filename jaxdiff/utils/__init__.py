"""Small helpers shared by training, sampling and notebooks."""

from jaxdiff.utils.images import make_grid, save_image_grid, upscale

__all__ = ["make_grid", "save_image_grid", "upscale"]
