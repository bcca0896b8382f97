"""Loss terms shared by the methods (pure functions of predictions and targets).

* :func:`denoising_loss`: Imagic eq. 2, L(x, e, theta) = E_{t, eps} || eps - eps_theta(x_t, t, e) ||^2,
  x_t from q(x_t | x_0) (:func:`core.diffusion.q_sample`), t ~ U{0..T-1}, with an
  optional mask M (LayerDiffusion eqs. 4-5): || M * (eps - eps_theta) ||^2 averaged over
  the mask's area, so the gradient is exactly zero outside the mask;
* :func:`masked_mse` and :func:`masked_l1`: the same reductions on any prediction
  (e.g. the rectifier's L1 on x0-hat, SINE's pooled x0 term).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import q_sample
from .seam import Denoiser, Features


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


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean (pred - target)^2, or its mean over the mask's area ([B or 1, 1, h, w] in [0, 1])."""
    if mask is None:
        return F.mse_loss(pred.float(), target.float())
    m = mask.to(pred.device, torch.float32).expand_as(pred)
    return ((pred.float() - target.float()) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean |pred - target|, or its mean over the mask's area."""
    if mask is None:
        return F.l1_loss(pred.float(), target.float())
    m = mask.to(pred.device, torch.float32).expand_as(pred)
    return ((pred.float() - target.float()).abs() * m).sum() / m.sum().clamp_min(1.0)


def denoising_loss(model: Denoiser, latent: torch.Tensor, cond: torch.Tensor | None, t: torch.Tensor,
                   eps: torch.Tensor, mask: torch.Tensor | None = None,
                   features: Features | None = None) -> torch.Tensor:
    """Monte-Carlo estimate of eq. 2 for given (t, eps); ``latent`` [1 or B, C, h, w] (model
    space), ``cond`` [1, 77, D] (broadcast over the batch), ``mask`` [1, 1, h, w] or None."""
    b = t.shape[0]
    a = model.alphas_cumprod.to(latent.device)[t.cpu()].to(latent.device)
    x_t = q_sample(latent.expand(b, -1, -1, -1), a, eps)
    c = cond.expand(b, -1, -1) if cond is not None else None
    return masked_mse(model.eps(x_t, t, c, features), eps, mask)


def eps_term(name: str, model: Denoiser, latent: torch.Tensor, cond: torch.Tensor | None,
             mask: torch.Tensor | None = None, weight: float = 1.0, features: Features | None = None):
    """A :class:`core.fit.Term` of :func:`denoising_loss` on batches ``(t, eps)`` (a
    :class:`NoiseDraw` per step)."""
    from .fit import Term

    return Term(name, lambda batch: denoising_loss(model, latent, cond, batch[0], batch[1], mask, features), weight)
