"""The one conversion between torch images and PIL images used across the pack.

Tensors are float RGB in [0, 1], [3, H, W] (or [1, 3, H, W]: the batch's first and only
image); PIL images are 8-bit RGB.  Values are clamped to [0, 1] and rounded to the
nearest uint8 level (x * 255, round half to even), so a PIL -> tensor -> PIL round trip
is exact.  Arrays in [-1, 1] (the SinDDM pyramid's own format) convert through
:func:`core.sinddm.pyramid.to_unit` / ``from_unit`` instead.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode, converted to RGB) -> float32 [3, H, W] in [0, 1]."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB")).astype(np.float32) / 255.0)
    return arr.permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """float [3, H, W] or [1, 3, H, W] in [0, 1] (clamped) -> RGB PIL image, rounded to uint8."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected one image [1, 3, H, W], got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(x.shape)}")
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")



def square(img: Image.Image, size: int, resample: int = Image.LANCZOS) -> Image.Image:
    """Shorter side resized to ``size`` (``resample``: Lanczos for pictures, a box filter for masks),
    centre-cropped to size x size."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(image, size: int) -> torch.Tensor:
    """An RGB image (a path or a PIL image) resized (shorter side) and centre-cropped to size x size
    -> [1, 3, S, S] in [0, 1]: how every command line reads its photos."""
    img = (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
    return pil_to_tensor(square(img, size))[None]


__all__ = ["load_image", "pil_to_tensor", "square", "tensor_to_pil"]
