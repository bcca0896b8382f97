"""Pixel-space DDPMs (diffusers ``UNet2DModel``): the seam's pixel back end, offline loading and saving.

See :mod:`core.pixel.loader` for the accepted layouts (model folder, pipeline folder,
self-describing single ``.safetensors``) and what is refused.
"""

from .backend import DiffusersPixel
from .loader import (
    PixelModelError,
    alphas_cumprod_from_config,
    load_pixel_unet,
    save_pixel_folder,
    save_pixel_unet,
)

__all__ = [
    "DiffusersPixel",
    "PixelModelError",
    "alphas_cumprod_from_config",
    "load_pixel_unet",
    "save_pixel_folder",
    "save_pixel_unet",
]
