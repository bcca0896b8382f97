"""Previews while a latent model trains: the model's one-step x0 estimate of the training image.

Every ``every`` steps a trainer shows x0_hat = (x_t - sqrt(1 - a_t) eps_theta(x_t, t, c)) / sqrt(a_t)
(the "predicted x_0" of DDIM eq. 9, :func:`core.diffusion.predict_x0`) of its training latent at a few fixed timesteps: one UNet call per
timestep and no sampling loop, so it is cheap, and as training goes the estimates at large t
sharpen towards the image.  The noise comes from a private generator and the call runs without
gradients, so previews never change what is trained (``tests/test_previews.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .diffusion import predict_x0, q_sample
from .fit import OnStep


@dataclass(frozen=True)
class Previews:
    """``show(step, x0_hat)`` every ``every`` steps (0: never) with x0_hat [k, C, h, w] in model space,
    one per timestep of ``timesteps``, from the fixed noise of ``seed``."""

    every: int
    show: Callable[[int, torch.Tensor], None]
    timesteps: tuple[int, ...] = (250, 500, 750)
    seed: int = 0

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"preview interval must be >= 0, got {self.every}")
        if not self.timesteps:
            raise ValueError("give at least one preview timestep")


@torch.no_grad()
def one_step_x0(eps_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
                latent: torch.Tensor, cond: torch.Tensor | None, alphas_cumprod: torch.Tensor,
                timesteps: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """x0_hat [k, C, h, w] of ``latent`` [1, C, h, w] noised to each of the k ``timesteps`` with fixed noise."""
    k = len(timesteps)
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn((k, *latent.shape[1:]), generator=g).to(latent.device, latent.dtype)  # [k, C, h, w]
    t = torch.tensor(timesteps, dtype=torch.long)
    a = alphas_cumprod.to(latent.device)[t].to(latent.dtype)  # [k]
    x_t = q_sample(latent.expand(k, -1, -1, -1), a, eps)
    c = cond.expand(k, *cond.shape[1:]) if cond is not None else None
    pred = eps_fn(x_t, t.to(latent.device), c)
    return predict_x0(x_t, pred.float(), a).detach()


def with_previews(on_step: OnStep | None, previews: Previews | None,
                  make: Callable[[], torch.Tensor]) -> OnStep | None:
    """``on_step`` that also calls ``previews.show(step, make())`` every ``previews.every`` steps."""
    if previews is None or previews.every == 0:
        return on_step

    def step(i: int, n: int, info: dict) -> None:
        if i % previews.every == 0 or i == n:
            previews.show(i, make())
        if on_step is not None:
            on_step(i, n, info)

    return step
