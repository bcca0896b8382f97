"""Directional CLIP loss (Gal et al. 2022, "StyleGAN-NADA"; Hou et al. 2024, eq. 4).

    L_direction(x_tar, t_tar; x_src, t_src) = 1 - <dI, dT> / (|dI| |dT|),
    dI = E_I(x_tar) - E_I(x_src),   dT = E_T(t_tar) - E_T(t_src).

Choices (the paper names neither the CLIP model nor the prompt handling):

* CLIP: any OpenCLIP model from a local file (the pack's SIE_OPEN_CLIP; DiffusionCLIP,
  the paper's anchor, uses ViT-B/16);
* dT: the mean over text templates of normalised E_T(template(t_tar)) - E_T(template(t_src)),
  renormalised (DiffusionCLIP's text direction), with the pack's own template phrasings;
* dI: normalised image embeddings subtracted, renormalised with +1e-7 (DiffusionCLIP);
* images: [0, 1], resized to CLIP's input size with bicubic interpolation (a non-square
  image is centre-cropped to a square first), then CLIP's normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..clip_model import CLIP_MEAN, CLIP_STD, OpenCLIP

# Prompt phrasings averaged into each text direction (our own sharp wording; the paper does not give them)
TEMPLATES_HR = [
    "{}.", "a photo of {}.", "a picture of {}.", "an image of {}.", "a high quality photo of {}.",
    "a detailed photo of {}.", "a sharp photo of {}.", "a beautiful photo of {}.", "a close-up photo of {}.",
    "a good photo of {}.", "a rendering of {}.", "a photograph showing {}.", "a clear picture of {}.",
    "a nice image of {}.",
]


def clip_input(clip: OpenCLIP, x01: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> CLIP's normalised input [B, 3, S, S] (differentiable)."""
    h, w = x01.shape[2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x01[:, :, top:top + s, left:left + s]
    x = F.interpolate(x, size=(clip.image_size, clip.image_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class DirectionalCLIP:
    """Eq. 4 for a fixed (source text, target text) pair; ``loss(x_edit, x_src)`` -> [B]."""

    def __init__(self, clip: OpenCLIP, source_text: str, target_text: str,
                 templates: Sequence[str] = tuple(TEMPLATES_HR), device=None):
        if not target_text.strip():
            raise ValueError("target_text: the editing direction needs a target text (e.g. 'a smiling face')")
        if source_text.strip() == target_text.strip():
            raise ValueError("source_text and target_text are the same: there is no direction to edit along")
        self.clip = clip
        device = device or next(clip.model.parameters()).device
        with torch.no_grad():
            src = F.normalize(clip.encode_text([t.format(source_text) for t in templates], device), dim=-1)
            tar = F.normalize(clip.encode_text([t.format(target_text) for t in templates], device), dim=-1)
        self.text_direction = F.normalize((tar - src).mean(0), dim=-1)  # [D]

    def image_embedding(self, x01: torch.Tensor) -> torch.Tensor:
        dtype = next(self.clip.model.parameters()).dtype
        return F.normalize(self.clip.encode_image(clip_input(self.clip, x01.to(dtype))), dim=-1)

    def similarity(self, x_edit01: torch.Tensor, x_src01: torch.Tensor) -> torch.Tensor:
        """cos(dI, dT) per image, [B]."""
        with torch.no_grad():
            e_src = self.image_embedding(x_src01)
        d_img = self.image_embedding(x_edit01) - e_src
        d_img = d_img / (d_img.norm(dim=-1, keepdim=True) + 1e-7)
        return d_img @ self.text_direction.to(d_img)

    def loss(self, x_edit01: torch.Tensor, x_src01: torch.Tensor) -> torch.Tensor:
        return 1 - self.similarity(x_edit01, x_src01)
