"""A DDIM sampler with classifier-free guidance through the seam, for standalone use.

Song et al. 2021 (DDIM eq. 12) on Stable Diffusion's schedule with diffusers' SD
settings: "leading" spacing with offset 1 (981, 961, ..., 1 for 50 steps), alpha_bar_0
past the last step.  Classifier-free guidance (Ho & Salimans 2022):
eps = eps_u + w (eps_c - eps_u).  Inside ComfyUI, sampling is ComfyUI's own.
"""

from __future__ import annotations

import torch

from .diffusion import ddim_step, prev_alpha_bar, timesteps
from .fit import OnStep
from .seam import LatentDiffusion


@torch.no_grad()
def ddim_sample(model: LatentDiffusion, cond: torch.Tensor, uncond: torch.Tensor | None = None,
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
    ab = model.alphas_cumprod
    T = len(ab)
    ts = timesteps(T, steps, "leading", steps_offset=1)
    for i, t in enumerate(ts.tolist()):
        tt = torch.full((b,), t, device=device, dtype=torch.long)
        if use_cfg:
            e = model.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond]))
            e_u, e_c = e.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        else:
            eps = model.eps(x, tt, cond)
        noise = torch.randn(x.shape, generator=gen).to(device) if eta > 0 else None
        x = ddim_step(x, eps.float(), ab[t], prev_alpha_bar(ab, t - T // steps), eta, noise)
        if on_step is not None:
            on_step(i + 1, len(ts), {"t": t})
    return x
