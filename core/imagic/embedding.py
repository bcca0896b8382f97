"""Imagic stage 1: optimise the target text embedding to reconstruct the image (Imagic Sec. 3.1).

The denoiser is frozen; e_tgt (the whole [1, 77, D] text-encoder output of the target
prompt) is optimised with Adam on the denoising loss of eq. 2 on the image's latent,
t ~ U{0..999}.  Few steps keep e_opt close to e_tgt so that the interpolation of eq. 3
stays meaningful: the paper uses 100 steps at lr 1e-3 on Imagen; the Stable Diffusion
ports use 500 steps at 1e-3, the default here.  An optional mask restricts the loss to a
region (LayerDiffusion's layered embedding optimisation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..fit import FitConfig, OnStep, ShouldStop, fit
from ..losses import NoiseDraw, eps_term
from ..seam import LatentDiffusion


@dataclass(frozen=True)
class EmbeddingConfig:
    steps: int = 500
    lr: float = 1e-3
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class EmbeddingResult:
    e_opt: torch.Tensor  # [1, 77, D] float32, detached
    losses: list[float]
    seconds: float


def optimize_embedding(model: LatentDiffusion, latent: torch.Tensor, e_tgt: torch.Tensor,
                       config: EmbeddingConfig = EmbeddingConfig(), mask: torch.Tensor | None = None,
                       on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> EmbeddingResult:
    """Return e_opt = argmin_e L(x, e, theta) reached from e_tgt by ``config.steps`` Adam steps."""
    device = torch.device(model.device)
    latent = latent.detach().to(device, torch.float32)
    e = torch.nn.Parameter(e_tgt.detach().to(device, torch.float32).clone())
    draw = NoiseDraw(config.seed, len(model.alphas_cumprod))
    t0 = time.perf_counter()
    with model.adapted({}, config.gradient_checkpointing) as m:
        res = fit([e], lambda step: draw(latent), [eps_term("eps_mse", m, latent, e, mask)],
                  FitConfig(config.steps, config.lr, what="embedding optimisation"), device,
                  on_step=on_step, should_stop=should_stop)
    return EmbeddingResult(e.detach().clone(), res.losses, time.perf_counter() - t0)
