"""Small pieces shared by the pack's optimisation loops (no ComfyUI here).

Loops take ``on_step(i, total, info)`` (progress; may raise to cancel) and
``should_stop()`` (polled every step; True raises :class:`Interrupted`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

OnStep = Callable[[int, int, dict], None]
ShouldStop = Callable[[], bool]


class Interrupted(RuntimeError):
    """Raised inside a core loop when ``should_stop()`` returns True."""


def poll(should_stop: ShouldStop | None, what: str, step: int) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted(f"{what} stopped after {step} steps")


def check_finite(loss: float, step: int, what: str) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"{what} diverged at step {step} (loss {loss}); lower the learning rate")


def autocast_for(device: torch.device):
    """bf16 (or fp16) autocast on a GPU, nothing on the CPU (fp32 there)."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def fit_denoising(model, latent: torch.Tensor, cond: torch.Tensor, parameters: list[torch.Tensor], lr: float,
                  steps: int, seed: int, what: str, mask: torch.Tensor | None = None,
                  on_step: OnStep | None = None, should_stop: ShouldStop | None = None) -> list[float]:
    """Adam on ``parameters`` against the denoising loss (Imagic eq. 2) of ``latent`` at ``cond``.

    ``model`` is a seam view whose output depends on the parameters (an adapted view, or
    ``cond`` itself is the parameter).  One (t, eps) draw per step from ``seed``; bf16
    autocast on a GPU.  Returns the loss per step.
    """
    from .losses import NoiseDraw, denoising_loss

    device = latent.device
    opt = torch.optim.Adam(parameters, lr=lr)
    draw = NoiseDraw(seed, len(model.alphas_cumprod))
    losses: list[float] = []
    for step in range(1, steps + 1):
        poll(should_stop, what, step - 1)
        t, eps = draw(latent)
        with autocast_for(device):
            loss = denoising_loss(model, latent, cond, t, eps, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        check_finite(losses[-1], step, what)
        if on_step is not None:
            on_step(step, steps, {"loss": losses[-1]})
    return losses
