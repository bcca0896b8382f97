"""Guidance for SinDDM sampling: edits of the clean-image estimate x0_hat at each step.

A guidance object is told the per-scale output sizes (``begin``), each new scale
(``begin_scale``), may edit the image entering a scale before it is noised
(``prepare``) and then edits x0_hat [B, 3, h, w] in [-1, 1] at every denoising step
(``apply``).  Several guidance objects compose: they are applied in order at every
step, so several ROI constraints, or ROIs plus text, act on one sample.

This module holds the ROI guidance of paper eq. 2 and the image helpers used by the
image-injection tasks (mask dilation and blur for harmonization, histogram matching
for style transfer).  Text (CLIP) guidance is in :mod:`core.sinddm.clip_guidance`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class Guidance:
    """Base class: a no-op guidance."""

    needs_ddpm = False  # True switches every scale to the stochastic DDPM posterior

    def begin(self, sizes: list[tuple[int, int]], count: int, device: torch.device,
              input_scale: tuple[float, float] = (1.0, 1.0)) -> None:
        """``sizes``: (H, W) of every scale of this run, coarsest first; ``input_scale``: (s_y, s_x), the
        training pyramid's finest-scale pixels per pixel of the image the model was trained on (the
        50,000-pixel cap; :attr:`core.sinddm.artifact.SinDDM.input_scale`)."""
        self.sizes, self.count, self.device = sizes, count, device
        self.input_scale = (float(input_scale[0]), float(input_scale[1]))

    def begin_scale(self, s: int, size: tuple[int, int]) -> None:
        pass

    def prepare(self, x_tilde: torch.Tensor, s: int, t_start: int, sampler) -> torch.Tensor:
        """Edit the image entering scale s >= 1 (upsampled or injected, [B, 3, h, w] in [-1, 1])
        before it is noised to ``t_start``; the default keeps it."""
        return x_tilde

    def apply(self, x0: torch.Tensor, s: int, t: int, sampler) -> torch.Tensor:
        return x0

    def end(self) -> None:
        pass


_EDGE = 1e-6  # footprint edges within this of a pixel boundary count as on it (float round-off)


class ROIGuidance(Guidance):
    """Paper eq. 2: x0 <- m * ((1 - eta) x0 + eta x_target) + (1 - m) * x0, at scales 0..N-2.

    ``target`` [1, 3, h, w] in [0, 1], ``mask`` [1, 1, h, w] in [0, 1] and ``offset`` = (x, y)
    (where the target's top-left corner lands) are in pixels of the image the model was trained
    on *as given*, before the 50,000-pixel cap: a crop of that image, placed where it was cut,
    reproduces it.  The official code cuts its targets from the training pyramid (a box picked
    on the training image, scaled by r^-(N-1-s) per scale); here, at every scale, the part of
    the output canvas that the target covers is resampled from the full-resolution target with
    PIL's Lanczos filter, the filter the pyramid is built with, so a target equal to the training
    image gives exactly the pyramid's x^s.  Pixels only partly covered by the target stay
    unconstrained (the official code truncates its boxes too); parts outside the canvas are
    dropped.  The canvas is the output (any size, e.g. wider for outpainting), measured in the
    training image's pixels: output pixels / ``input_scale``.  The official code resizes its
    boxes with nearest neighbours and a fixed eta = 0.8; a mask generalises the boxes (any
    shape, soft edges).
    """

    def __init__(self, target: torch.Tensor, mask: torch.Tensor | None = None, strength: float = 0.8,
                 offset: tuple[int, int] = (0, 0)):
        if target.ndim != 4 or target.shape[0] != 1 or target.shape[1] != 3:
            raise ValueError(f"target: expected one RGB image [1, 3, H, W], got {tuple(target.shape)}")
        if mask is None:
            mask = torch.ones(1, 1, *target.shape[-2:])
        if mask.ndim != 4 or mask.shape[0] != 1 or mask.shape[1] != 1:
            raise ValueError(f"mask: expected one mask [1, 1, H, W], got {tuple(mask.shape)}")
        if tuple(mask.shape[-2:]) != tuple(target.shape[-2:]):
            raise ValueError(f"mask: {mask.shape[-1]}x{mask.shape[-2]} differs from the target's "
                             f"{target.shape[-1]}x{target.shape[-2]}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        # uint8, as the training image enters the pyramid (PIL's Lanczos resamples 8-bit images exactly so)
        rgb = (target[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        self.target = Image.fromarray(rgb.cpu().numpy(), "RGB")
        self.mask = Image.fromarray(mask[0, 0].detach().float().clamp(0, 1).cpu().numpy(), "F")
        self.eta = float(strength)
        self.offset = (int(offset[0]), int(offset[1]))

    def canvas(self, size: tuple[int, int], input_scale: tuple[float, float] = (1.0, 1.0),
               final: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(target in [-1, 1] [1, 3, H, W], mask [1, 1, H, W]) on an (H, W) = ``size`` canvas.

        ``final`` is the output's (finest) size the canvas belongs to (default ``size``); the
        canvas spans final / ``input_scale`` pixels of the training image, scaled to ``size``.
        """
        h, w = size
        fh, fw = final if final is not None else size
        fy, fx = h * input_scale[0] / fh, w * input_scale[1] / fw  # canvas pixels per training-image pixel
        x, y = self.offset
        tw, th = self.target.size
        x0, x1 = max(0, math.ceil(x * fx - _EDGE)), min(w, math.floor((x + tw) * fx + _EDGE))
        y0, y1 = max(0, math.ceil(y * fy - _EDGE)), min(h, math.floor((y + th) * fy + _EDGE))
        tgt = torch.zeros(1, 3, h, w)
        msk = torch.zeros(1, 1, h, w)
        if x1 <= x0 or y1 <= y0:
            return tgt, msk
        # the source box of the covered pixels, in target pixels (inside the target by construction)
        box = (min(max(x0 / fx - x, 0.0), tw), min(max(y0 / fy - y, 0.0), th),
               min(max(x1 / fx - x, 0.0), tw), min(max(y1 / fy - y, 0.0), th))
        patch = np.asarray(self.target.resize((x1 - x0, y1 - y0), Image.LANCZOS, box=box))
        tgt[..., y0:y1, x0:x1] = torch.from_numpy(patch.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        m = np.asarray(self.mask.resize((x1 - x0, y1 - y0), Image.LANCZOS, box=box))
        msk[..., y0:y1, x0:x1] = torch.from_numpy(m.copy()).clamp(0, 1)
        return tgt, msk

    def begin(self, sizes, count, device, input_scale=(1.0, 1.0)):
        super().begin(sizes, count, device, input_scale)
        h, w = sizes[-1]
        _, fine_mask = self.canvas(sizes[-1], self.input_scale)
        if not bool((fine_mask > 0).any()):
            tw, th = self.target.size
            x, y = self.offset
            raise ValueError(f"ROI: the target ({tw}x{th} at x={x}, y={y}, in the training image's pixels) lies "
                             f"outside the output ({w / self.input_scale[1]:.0f}x{h / self.input_scale[0]:.0f} "
                             f"of them, {w}x{h} px)")
        self.begin_scale(0, sizes[0])

    def begin_scale(self, s, size):
        t_s, m_s = self.canvas(size, self.input_scale, self.sizes[-1])
        self.t_s, self.m_s = t_s.to(self.device), m_s.to(self.device)

    def apply(self, x0, s, t, sampler):
        if s >= len(self.sizes) - 1:  # "in all scales except for the finest one"
            return x0
        return self.m_s * ((1 - self.eta) * x0 + self.eta * self.t_s) + (1 - self.m_s) * x0


# --------------------------------------------------------------------------------------
# Helpers for image injection
# --------------------------------------------------------------------------------------
def disk(radius: int) -> torch.Tensor:
    """Binary disk structuring element [2r+1, 2r+1] (scikit-image's ``disk``)."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] with edge replication (scikit-image's defaults)."""
    radius = int(truncate * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def harmonization_mask(mask: torch.Tensor, radius: int = 7, sigma: float = 5.0) -> torch.Tensor:
    """Official harmonization mask: binary dilation by a disk (r = 7), Gaussian blur
    (sigma = 5), min-max normalised to [0, 1].  [B, 1, H, W] -> [B, 1, H, W]."""
    binary = (mask > 0).float()
    k = disk(radius).to(binary)
    dilated = (F.conv2d(binary, k[None, None], padding=radius) > 0).float()
    blurred = gaussian_blur(dilated, sigma)
    lo = blurred.amin(dim=(1, 2, 3), keepdim=True)
    hi = blurred.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(hi > lo, (blurred - lo) / (hi - lo).clamp_min(1e-12), binary)


def match_histograms(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-channel histogram matching of uint8 [H, W, 3] ``source`` to ``reference``.

    Each source value is mapped to the reference value at the same quantile
    (cumulative-distribution matching, as ``skimage.exposure.match_histograms``); the
    result is truncated back to uint8 like the official code.
    """
    out = np.empty_like(source)
    for c in range(source.shape[-1]):
        src = source[..., c].ravel()
        ref = reference[..., c].ravel()
        s_vals, s_idx, s_counts = np.unique(src, return_inverse=True, return_counts=True)
        r_vals, r_counts = np.unique(ref, return_counts=True)
        s_q = np.cumsum(s_counts) / src.size
        r_q = np.cumsum(r_counts) / ref.size
        mapped = np.interp(s_q, r_q, r_vals)
        out[..., c] = mapped[s_idx].reshape(source.shape[:-1]).astype(np.uint8)
    return out


def cap_image(image: torch.Tensor, max_pixels: int = 50_000) -> torch.Tensor:
    """Lanczos-downscale [1, 3, H, W] in [0, 1] to at most ``max_pixels`` (official rule)."""
    from PIL import Image

    from ..images import pil_to_tensor, tensor_to_pil
    from .pyramid import capped_size

    h, w = image.shape[-2:]
    cw, ch = capped_size(w, h, max_pixels)
    if (cw, ch) == (w, h):
        return image
    pil = tensor_to_pil(image[0] if image.ndim == 4 else image).resize((cw, ch), Image.LANCZOS)
    return pil_to_tensor(pil)[None]


