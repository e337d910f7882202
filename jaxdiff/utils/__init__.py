"""Small helpers shared by training, sampling and notebooks."""

from jaxdiff.utils.images import Decoder, displayable, make_grid, save_image_grid, upscale

__all__ = ["Decoder", "displayable", "make_grid", "save_image_grid", "upscale"]
