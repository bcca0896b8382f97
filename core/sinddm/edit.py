"""Image-to-image tasks of SinDDM (paper Sec. 4): harmonization, style transfer, and
text-guided edits of the training image itself.

Harmonization and style transfer inject an image into a model trained on another image
and denoise it with gamma = 0 at the injection scale (:func:`core.sinddm.sample.inject`),
at the injected image's own size after the official 50,000-pixel cap.  The official code
injects at the finest scale; the paper allows any scale s <= N - 1 ("inject a downsampled
version of the content image into some scale s"), so ``scale`` picks it (the finer scales
then run as in sampling):

* harmonization: the naive composite, injected at t = 5; the result is composited back
  into the input through the dilated and blurred object mask, so that only the pasted
  object and its surroundings change;
* style transfer: the content image, histogram-matched to the training (style) image at
  the injection scale, injected at t = 15.

:func:`edit_training_image` re-runs the finest scale on the training image itself, with
guidance (paper Sec. 4: "To control the style of the training image itself we inject that
image directly to the finest scale"; Fig. S9): from the scale below, upsampled, and T[N-1]
steps (the official ``clip_style_trans``), or from the training image itself and 3 steps
(the official ``clip_roi``, with :class:`core.sinddm.clip_guidance.CLIPRegionGuidance`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..fit import OnStep
from .artifact import SinDDM
from .guidance import Guidance, cap_image, harmonization_mask, match_histograms
from .sample import inject, resolve_scale, resume

HARMONIZATION_T = 5
STYLE_TRANSFER_T = 15
REGION_EDIT_T = 3  # official clip_roi: num_denoising_steps
STARTS = ("coarser_scale", "training_image")


def _check(image: torch.Tensor, name: str) -> None:
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"{name}: expected one RGB image [1, 3, H, W], got {tuple(image.shape)}")
    if min(image.shape[-2:]) < 8:
        raise ValueError(f"{name}: {image.shape[-1]}x{image.shape[-2]} is too small (at least 8 px per side)")


def harmonize(model: SinDDM, composite: torch.Tensor, mask: torch.Tensor, t_start: int = HARMONIZATION_T,
              count: int = 1, seed: int = 0, device="cpu", on_step: OnStep | None = None,
              should_stop: Callable[[], bool] | None = None, scale: int | None = None) -> torch.Tensor:
    """Blend the object marked by ``mask`` [1, 1, H, W] into ``composite`` [1, 3, H, W] (both in [0, 1]).

    ``scale``: the injection scale (default the finest; negative counts from the finest).
    """
    _check(composite, "composite")
    if mask.ndim != 4 or tuple(mask.shape[-2:]) != tuple(composite.shape[-2:]):
        raise ValueError(f"mask: size {tuple(mask.shape[-2:])} differs from the composite's "
                         f"{tuple(composite.shape[-2:])}")
    x = cap_image(composite)
    m = torch.nn.functional.interpolate(mask.float(), size=x.shape[-2:], mode="bilinear", antialias=True,
                                        align_corners=False) if x.shape[-2:] != mask.shape[-2:] else mask.float()
    soft = harmonization_mask(m[:1])
    out = inject(model, x, t_start, count, seed, device, on_step=on_step, should_stop=should_stop, scale=scale)
    return soft * out + (1 - soft) * x


def style_transfer(model: SinDDM, content: torch.Tensor, t_start: int = STYLE_TRANSFER_T, count: int = 1,
                   seed: int = 0, device="cpu", match_colors: bool = True, on_step: OnStep | None = None,
                   should_stop: Callable[[], bool] | None = None, scale: int | None = None) -> torch.Tensor:
    """Re-render ``content`` [1, 3, H, W] in [0, 1] with the textures of the training image.

    ``scale``: the injection scale (default the finest; negative counts from the finest);
    the colours are matched to the training image at that scale (the official reference).
    """
    _check(content, "content")
    s = resolve_scale(model, scale)
    x = cap_image(content)
    if match_colors:
        src = (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ref = model.pyramid.uint8(s).permute(1, 2, 0).numpy()
        x = torch.from_numpy(match_histograms(src, ref).astype(np.float32) / 255).permute(2, 0, 1)[None]
    return inject(model, x, t_start, count, seed, device, on_step=on_step, should_stop=should_stop, scale=s)


def edit_training_image(model: SinDDM, guidance: Sequence[Guidance] = (), start: str = "coarser_scale",
                        t_start: int | None = None, count: int = 1, seed: int = 0, device="cpu",
                        on_step: OnStep | None = None,
                        should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """The training image itself, re-rendered at the finest scale under ``guidance``; [count, 3, H, W] in [0, 1].

    ``start="coarser_scale"`` (the official ``clip_style_trans``, paper Fig. S9): the training
    image at scale N-2 is taken as that scale's output, upsampled, noised to T[N-1] (or
    ``t_start``) and denoised at the finest scale, so text style guidance (finest scale
    only) changes the fine textures and keeps the layout.  ``start="training_image"``
    (the official ``clip_roi``): the finest training image itself is noised to t = 3 (or
    ``t_start``) and denoised with gamma = 0, so a text-in-region guidance edits it and
    leaves the rest nearly as it was.
    """
    n = model.pyramid.spec.n_scales
    if start == "coarser_scale":
        if n < 2:
            raise ValueError("start: the model has a single scale; use start='training_image'")
        image = (model.pyramid.images[n - 2] + 1) / 2
        return resume(model, image, n - 1, t_start, count, seed, guidance=guidance, device=device, on_step=on_step,
                      should_stop=should_stop)
    if start == "training_image":
        image = (model.pyramid.images[n - 1] + 1) / 2
        t = REGION_EDIT_T if t_start is None else t_start
        return resume(model, image, n - 1, t, count, seed, guidance=guidance, zero_gamma=True, device=device,
                      on_step=on_step, should_stop=should_stop)
    raise ValueError(f"start must be one of {STARTS}, got {start!r}")
