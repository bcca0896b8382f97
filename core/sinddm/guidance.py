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

import numpy as np
import torch
import torch.nn.functional as F

from .pyramid import resize_to


class Guidance:
    """Base class: a no-op guidance."""

    needs_ddpm = False  # True switches every scale to the stochastic DDPM posterior

    def begin(self, sizes: list[tuple[int, int]], count: int, device: torch.device) -> None:
        self.sizes, self.count, self.device = sizes, count, device

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


class ROIGuidance(Guidance):
    """Paper eq. 2: x0 <- m * ((1 - eta) x0 + eta x_target) + (1 - m) * x0, at scales 0..N-2.

    ``target`` [1, 3, h, w] in [0, 1] and ``mask`` [1, 1, h, w] in [0, 1] are pasted onto
    the output canvas with their top-left corner at ``offset`` = (x, y) pixels (parts
    outside the canvas are dropped; the canvas outside the target is unconstrained),
    then resized (anti-aliased bilinear) to every scale.  The official code copies
    boxes of the training image with nearest-neighbour resizing and a fixed eta = 0.8; a
    mask generalises the boxes (any shape, soft edges).  Outpainting is the training
    image as target on a larger canvas, with the mask covering all of it.
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
        self.target = target.float().clamp(0, 1)
        self.mask = mask.float().clamp(0, 1)
        self.eta = float(strength)
        self.offset = (int(offset[0]), int(offset[1]))

    def canvas(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(target in [-1, 1], mask) pasted on an (H, W) canvas."""
        h, w = size
        x, y = self.offset
        th, tw = self.target.shape[-2:]
        tgt = torch.zeros(1, 3, h, w)
        msk = torch.zeros(1, 1, h, w)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + th, h), min(x + tw, w)
        if y1 <= y0 or x1 <= x0:
            raise ValueError(f"ROI: the target ({tw}x{th} at x={x}, y={y}) lies outside the {w}x{h} output")
        tgt[..., y0:y1, x0:x1] = self.target[..., y0 - y : y1 - y, x0 - x : x1 - x] * 2 - 1
        msk[..., y0:y1, x0:x1] = self.mask[..., y0 - y : y1 - y, x0 - x : x1 - x]
        return tgt, msk

    def begin(self, sizes, count, device):
        super().begin(sizes, count, device)
        self.full_target, self.full_mask = self.canvas(sizes[-1])
        self.begin_scale(0, sizes[0])

    def begin_scale(self, s, size):
        self.t_s = resize_to(self.full_target, size).to(self.device)
        self.m_s = resize_to(self.full_mask, size).to(self.device)

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


