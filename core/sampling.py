"""DDIM sampling through the seam, for standalone use (inside ComfyUI, sampling is ComfyUI's own).

Song et al. 2021 (DDIM eq. 12), by default on Stable Diffusion's schedule with diffusers'
SD settings: "leading" spacing with offset 1 (981, 961, ..., 1 for 50 steps), alpha_bar_0
past the last step; the spacing, offset and final alpha_bar are arguments (the rectifier
samples and inverts "trailing" with alpha_bar = 1 past the last step).

* :func:`ddim_loop`: the loop, driven by any per-step rule ``eps_fn(x, t, i)`` (t the
  DDPM timestep, i the step index): the standalone side of the per-step guidance rules
  in :mod:`core.guidance` (SINE eq. 3 with views, LayerDiffusion eq. 8 by index);
* :func:`ddim_invert_loop`: the same timesteps run upwards (deterministic inversion);
* :func:`ddim_sample`: the loop with classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .diffusion import Spacing, ddim_step, predict_x0, prev_alpha_bar, timesteps
from .fit import OnStep
from .guidance import cfg
from .seam import Denoiser

EpsRule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x [B,C,h,w], t [B] long, step index) -> eps


@torch.no_grad()
def ddim_loop(eps_fn: EpsRule, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int = 50,
              eta: float = 0.0, generator: torch.Generator | None = None,
              on_step: OnStep | None = None, spacing: Spacing = "leading", steps_offset: int = 1,
              final_alpha_bar: float | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """Run DDIM from ``x_T`` [B, C, h, w] with eps from ``eps_fn(x, t, i)``; returns x_0.

    ``spacing`` / ``steps_offset``: the timesteps (:func:`core.diffusion.timesteps`; SD: "leading" with
    offset 1, the default; the rectifier: "trailing", offset 0); ``final_alpha_bar``: alpha_bar past the
    last step (None: alpha_bar_0, SD's setting; 1.0: ``set_alpha_to_one``); ``clip_x0`` clamps the x_0
    estimate of every step (pixel models: 1.0)."""
    ab = alphas_cumprod
    x = x_T.float()
    b = x.shape[0]
    ts = timesteps(len(ab), steps, spacing, steps_offset=steps_offset).tolist()
    for i, t in enumerate(ts):
        tt = torch.full((b,), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt, i).float()
        a, a_prev = ab[t], prev_alpha_bar(ab, ts[i + 1] if i + 1 < len(ts) else -1, final_alpha_bar)
        x0 = predict_x0(x, eps, a).clamp(-clip_x0, clip_x0) if clip_x0 is not None else None
        noise = torch.randn(x.shape, generator=generator).to(x.device) if eta > 0 else None
        x = ddim_step(x, eps, a, a_prev, eta, noise, x0=x0).float()
        if on_step is not None:
            on_step(i + 1, len(ts), {"t": t})
    return x


@torch.no_grad()
def ddim_invert_loop(eps_fn: EpsRule, x0: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int = 50,
                     spacing: Spacing = "leading", steps_offset: int = 1,
                     final_alpha_bar: float | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T over the timesteps :func:`ddim_loop` visits, run upwards
    (eta = 0): each step moves to the next level with the eps of that level evaluated on the current x
    (the usual approximation of eps(x_t, t)).  ``x0`` sits at alpha_bar past the last sampling step
    (``final_alpha_bar``), so sampling back with the same arguments retraces the path."""
    ab = alphas_cumprod
    ts = timesteps(len(ab), steps, spacing, steps_offset=steps_offset).tolist()[::-1]  # ascending
    x = x0.float()
    a_prev = prev_alpha_bar(ab, -1, final_alpha_bar)
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt, i).float()
        x = ddim_step(x, eps, a_prev, ab[t]).float()
        a_prev = ab[t]
    return x


@torch.no_grad()
def ddim_sample(model: Denoiser, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                shape: tuple[int, ...] = (1, 4, 64, 64), steps: int = 50, guidance: float = 7.5,
                eta: float = 0.0, seed: int = 0, x_T: torch.Tensor | None = None,
                on_step: OnStep | None = None) -> torch.Tensor:
    """Sample model-space latents [B, 4, h, w] from ``cond`` [B or 1, 77, D].

    ``uncond`` is needed when ``guidance`` != 1.  ``x_T`` (default: N(0, I) from ``seed``)
    fixes the starting noise, e.g. to compare models on the same noise.
    """
    device = torch.device(model.device)
    gen = torch.Generator().manual_seed(int(seed))
    x = (x_T if x_T is not None else torch.randn(shape, generator=gen)).to(device, torch.float32)
    b = x.shape[0]
    cond = cond.to(device, torch.float32).expand(b, -1, -1)
    use_cfg = guidance != 1.0
    if use_cfg:
        if uncond is None:
            raise ValueError("uncond is required for classifier-free guidance (guidance != 1)")
        uncond = uncond.to(device, torch.float32).expand(b, -1, -1)

    def eps_fn(x, tt, i):
        if not use_cfg:
            return model.eps(x, tt, cond)
        e_u, e_c = model.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond])).chunk(2)
        return cfg(e_u, e_c, guidance)

    return ddim_loop(eps_fn, x, model.alphas_cumprod, steps, eta, gen, on_step)
