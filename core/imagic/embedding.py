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
from pathlib import Path

import torch

from ..checkpoint import Plan, stage_checkpointing
from ..fit import FitConfig, OnStep, ShouldStop, fit
from ..losses import NoiseDraw, eps_term
from ..previews import Previews, one_step_x0, with_previews
from ..seam import LatentDiffusion

Draws = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""step (1-based) -> (t [B] int64, eps [B, C, h, w]): the noise of eq. 2 at that step."""


class StepDraws:
    """The per-step (t, eps) provider of a stage on ``latent``'s device: ``draws`` moved there, or
    (None) t ~ U{0..T-1} and eps ~ N(0, I) from a generator seeded by ``seed``; ``generators`` names
    the generator it draws from, for the stage's checkpoints."""

    def __init__(self, draws: Draws | None, seed: int, latent: torch.Tensor, num_timesteps: int):
        self.draws, self.latent = draws, latent
        self.noise = NoiseDraw(seed, num_timesteps) if draws is None else None
        self.generators = {"noise": self.noise.gen} if self.noise is not None else {}

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noise is not None:
            return self.noise(self.latent)
        t, eps = self.draws(step)
        return t.to(self.latent.device, torch.long), eps.to(self.latent.device, self.latent.dtype)


def imagic_checkpointing(plan: Plan | None, stage: str, model: LatentDiffusion, settings: dict,
                         data: dict[str, torch.Tensor | None], draws: StepDraws):
    """The fit loop's checkpointing for an Imagic stage (None without a plan): its identity is the stage's
    settings, a fingerprint of the frozen UNet and of the data it fits (latent, conditioning, mask)."""
    return stage_checkpointing(plan, "imagic", stage, model.unet_parameters(),
                               {**settings, "draws": "seeded" if draws.noise else "given"}, data, draws.generators)


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
    checkpoint: Path | None = None  # the last checkpoint written
    resumed_from: int = 0  # the step a resumed run continued from (0: a fresh run)


def optimize_embedding(model: LatentDiffusion, latent: torch.Tensor, e_tgt: torch.Tensor,
                       config: EmbeddingConfig = EmbeddingConfig(), mask: torch.Tensor | None = None,
                       on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
                       draws: Draws | None = None, checkpoints: Plan | None = None,
                       previews: Previews | None = None) -> EmbeddingResult:
    """Return e_opt = argmin_e L(x, e, theta) reached from e_tgt by ``config.steps`` Adam steps
    (``draws``: the (t, eps) of each step, default: seeded by ``config.seed``; ``checkpoints``: write
    the run's state and / or continue one, see :mod:`core.checkpoint`; ``previews``: the model's one-step
    x0 of the latent at the current embedding every N steps, see :mod:`core.previews`)."""
    device = torch.device(model.device)
    latent = latent.detach().to(device, torch.float32)
    e = torch.nn.Parameter(e_tgt.detach().to(device, torch.float32).clone())
    batches = StepDraws(draws, config.seed, latent, len(model.alphas_cumprod))
    ck = imagic_checkpointing(checkpoints, "embedding", model, {"lr": config.lr, "seed": config.seed},
                             {"latent": latent, "e_tgt": e_tgt, "mask": mask}, batches)
    t0 = time.perf_counter()
    with model.adapted({}, config.gradient_checkpointing) as m:
        show = with_previews(on_step, previews, lambda: one_step_x0(m.eps, latent, e.detach(), model.alphas_cumprod,
                                                                    previews.timesteps, previews.seed))
        res = fit([e], batches, [eps_term("eps_mse", m, latent, e, mask)],
                  FitConfig(config.steps, config.lr, what="embedding optimisation"), device,
                  on_step=show, should_stop=should_stop, checkpointing=ck)
    return EmbeddingResult(e.detach().clone(), res.losses, time.perf_counter() - t0, res.checkpoint,
                           res.resumed_from)
