"""Imagic stage 3: interpolate text embeddings (Imagic eq. 3).

e_bar = eta * e_tgt + (1 - eta) * e_opt.  eta = 0 reproduces the image, eta = 1 is the
target text; the paper picks 0.6-0.8 on Imagen, the Stable Diffusion ports need
0.9-1.2, so values above 1 (extrapolation) are allowed.
"""

from __future__ import annotations

import torch


def interpolate(e_tgt: torch.Tensor, e_opt: torch.Tensor, eta: float) -> torch.Tensor:
    """eta * e_tgt + (1 - eta) * e_opt; shapes must match."""
    if e_tgt.shape != e_opt.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(e_tgt.shape)} vs {tuple(e_opt.shape)}")
    return eta * e_tgt + (1.0 - eta) * e_opt.to(e_tgt)
