"""The denoising loss every SD-based method of the pack optimises (Imagic eq. 2).

L(x, e, theta) = E_{t, eps} || eps - eps_theta(x_t, t, e) ||^2, x_t from q(x_t | x_0)
(:func:`core.diffusion.q_sample`), t ~ U{0..T-1}.  An optional mask M restricts the
loss to a region (LayerDiffusion's masked losses, eq. 4-5):
|| M * (eps - eps_theta) ||^2 averaged over the mask's area.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import q_sample
from .seam import LatentDiffusion


@dataclass
class NoiseDraw:
    """Draws (t, eps) pairs from a seeded generator, reproducibly across devices (CPU draws)."""

    seed: int
    num_timesteps: int = 1000

    def __post_init__(self):
        self.gen = torch.Generator().manual_seed(int(self.seed))

    def __call__(self, latent: torch.Tensor, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.num_timesteps, (batch,), generator=self.gen)
        eps = torch.randn((batch, *latent.shape[1:]), generator=self.gen)
        return t.to(latent.device), eps.to(latent.device, latent.dtype)


def denoising_loss(model: LatentDiffusion, latent: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo estimate of eq. 2 for given (t, eps); ``latent`` [1, 4, h, w] (model space),
    ``cond`` [1, 77, D] (broadcast over the batch), ``mask`` [1, 1, h, w] in [0, 1] or None."""
    b = t.shape[0]
    a = model.alphas_cumprod.to(latent.device)[t.cpu()].to(latent.device)
    x_t = q_sample(latent.expand(b, -1, -1, -1), a, eps)
    pred = model.eps(x_t, t, cond.expand(b, -1, -1))
    if mask is None:
        return F.mse_loss(pred.float(), eps.float())
    m = mask.to(pred.device, torch.float32).expand_as(pred)
    return ((pred.float() - eps.float()) ** 2 * m).sum() / m.sum().clamp_min(1.0)
