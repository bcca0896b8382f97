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


__all__ = ["pil_to_tensor", "tensor_to_pil"]
