"""Imagic stage 1: optimise the target text embedding to reconstruct the image (Imagic Sec. 3.1).

The denoiser is frozen; e_tgt (the whole [1, 77, D] text-encoder output of the target
prompt) is optimised with Adam on the denoising loss of eq. 2 on the image's latent,
t ~ U{0..999}.  Few steps keep e_opt close to e_tgt so that the interpolation of eq. 3
stays meaningful: the paper uses 100 steps at lr 1e-3 on Imagen; the Stable Diffusion
ports use 500 steps at 1e-3, the default here.  An optional mask restricts the loss to a
region (LayerDiffusion's layered embedding optimisation).

Each step draws one (t, eps) pair (batch 1, as in every SD port) from a generator seeded
by ``config.seed``; ``draws`` replaces that source with a given sequence (the test that
replays the diffusers community pipeline's draws, ``tests/test_imagic_reference.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..fit import FitConfig, OnStep, ShouldStop, fit
from ..losses import NoiseDraw, eps_term
from ..seam import LatentDiffusion

Draws = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""step (1-based) -> (t [B] int64, eps [B, C, h, w]): the noise of eq. 2 at that step."""


def step_draws(draws: Draws | None, seed: int, latent: torch.Tensor, num_timesteps: int) -> Draws:
    """The per-step (t, eps) provider of a stage on ``latent``'s device: ``draws`` moved there, or
    (None) t ~ U{0..T-1} and eps ~ N(0, I) from a generator seeded by ``seed``."""
    if draws is None:
        draw = NoiseDraw(seed, num_timesteps)
        return lambda step: draw(latent)

    def replay(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, eps = draws(step)
        return t.to(latent.device, torch.long), eps.to(latent.device, latent.dtype)

    return replay


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
                       on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
                       draws: Draws | None = None) -> EmbeddingResult:
    """Return e_opt = argmin_e L(x, e, theta) reached from e_tgt by ``config.steps`` Adam steps
    (``draws``: the (t, eps) of each step, default: seeded by ``config.seed``)."""
    device = torch.device(model.device)
    latent = latent.detach().to(device, torch.float32)
    e = torch.nn.Parameter(e_tgt.detach().to(device, torch.float32).clone())
    batches = step_draws(draws, config.seed, latent, len(model.alphas_cumprod))
    t0 = time.perf_counter()
    with model.adapted({}, config.gradient_checkpointing) as m:
        res = fit([e], batches, [eps_term("eps_mse", m, latent, e, mask)],
                  FitConfig(config.steps, config.lr, what="embedding optimisation"), device,
                  on_step=on_step, should_stop=should_stop)
    return EmbeddingResult(e.detach().clone(), res.losses, time.perf_counter() - t0)
