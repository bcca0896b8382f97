"""Image-to-image tasks of SinDDM (paper Sec. 4): harmonization and style transfer.

Both inject an image into the finest scale of a model trained on another image and
denoise it for a few steps with gamma = 0 (:func:`core.sinddm.sample.inject`), at the
injected image's own size after the official 50,000-pixel cap:

* harmonization: the naive composite, injected at t = 5; the result is composited back
  into the input through the dilated and blurred object mask, so that only the pasted
  object and its surroundings change;
* style transfer: the content image, histogram-matched to the training (style) image,
  injected at t = 15.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..fit import OnStep
from .artifact import SinDDM
from .guidance import cap_image, harmonization_mask, match_histograms
from .sample import inject

HARMONIZATION_T = 5
STYLE_TRANSFER_T = 15


def _check(image: torch.Tensor, name: str) -> None:
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"{name}: expected one RGB image [1, 3, H, W], got {tuple(image.shape)}")
    if min(image.shape[-2:]) < 8:
        raise ValueError(f"{name}: {image.shape[-1]}x{image.shape[-2]} is too small (at least 8 px per side)")


def harmonize(model: SinDDM, composite: torch.Tensor, mask: torch.Tensor, t_start: int = HARMONIZATION_T,
              count: int = 1, seed: int = 0, device="cpu", on_step: OnStep | None = None,
              should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Blend the object marked by ``mask`` [1, 1, H, W] into ``composite`` [1, 3, H, W] (both in [0, 1])."""
    _check(composite, "composite")
    if mask.ndim != 4 or tuple(mask.shape[-2:]) != tuple(composite.shape[-2:]):
        raise ValueError(f"mask: size {tuple(mask.shape[-2:])} differs from the composite's "
                         f"{tuple(composite.shape[-2:])}")
    x = cap_image(composite)
    m = torch.nn.functional.interpolate(mask.float(), size=x.shape[-2:], mode="bilinear", antialias=True,
                                        align_corners=False) if x.shape[-2:] != mask.shape[-2:] else mask.float()
    soft = harmonization_mask(m[:1])
    out = inject(model, x, t_start, count, seed, device, on_step=on_step, should_stop=should_stop)
    return soft * out + (1 - soft) * x


def style_transfer(model: SinDDM, content: torch.Tensor, t_start: int = STYLE_TRANSFER_T, count: int = 1,
                   seed: int = 0, device="cpu", match_colors: bool = True, on_step: OnStep | None = None,
                   should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Re-render ``content`` [1, 3, H, W] in [0, 1] with the textures of the training image."""
    _check(content, "content")
    x = cap_image(content)
    if match_colors:
        src = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ref = model.pyramid.uint8(model.pyramid.spec.n_scales - 1).permute(1, 2, 0).numpy()
        x = torch.from_numpy(match_histograms(src, ref).astype(np.float32) / 255).permute(2, 0, 1)[None]
    return inject(model, x, t_start, count, seed, device, on_step=on_step, should_stop=should_stop)
