"""SINE editing outside ComfyUI: DDIM with model-based classifier-free guidance (paper eq. 3).

Each step the pretrained model (view 0) predicts at the empty and the target prompt (one batched
call); for t > K the fine-tuned view also predicts at the fine-tune prompt, and
:func:`core.sine.guidance.model_guidance` mixes it in with weight 1 - v (paper: K = 400, v = 0.7).
For t <= K the fine-tuned model is not evaluated at all (plain CFG on the base).  A model trained
with patches gets F(v) of the whole grid resized to the latent (``crop_box`` None), so any latent
size and aspect ratio works.
"""

from __future__ import annotations

import torch

from ..fit import OnStep
from ..sampling import ddim_loop
from ..seam import Features, LatentDiffusion, ViewSpec
from .finetune import SineFineTuneResult
from .guidance import model_guidance, model_guidance_active
from .positional import PositionalMap


@torch.no_grad()
def edit(model: LatentDiffusion, tuned: SineFineTuneResult, target_cond: torch.Tensor, finetune_cond: torch.Tensor,
         uncond: torch.Tensor, shape: tuple[int, ...] = (1, 4, 64, 64), steps: int = 50, w: float = 7.5,
         v: float = 0.7, K: int = 400, seed: int = 0, positional: bool | None = None,
         strength: float = 1.0, on_step: OnStep | None = None) -> torch.Tensor:
    """Edited model-space latents [B, 4, h, w].  ``positional`` None: as ``tuned`` was trained.

    The starting noise is ``torch.randn(shape)`` from a generator seeded with ``seed`` (as
    :func:`core.sampling.ddim_sample`), so K above every timestep reproduces plain CFG DDIM.
    """
    device = torch.device(model.device)
    positional = tuned.positional if positional is None else positional
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=gen).to(device, torch.float32)
    b = x.shape[0]
    c = target_cond.to(device, torch.float32).expand(b, -1, -1)
    u = uncond.to(device, torch.float32).expand(b, -1, -1)
    c_hat = finetune_cond.to(device, torch.float32).expand(b, -1, -1)
    features = Features(input_map=PositionalMap(tuned.channels, tuned.grid_size)) if positional else None
    spec = ViewSpec(tuned.weight_functions(strength), features=features)
    with model.views(spec) as (base, ft):

        def rule(x, tt, i):
            t = int(tt[0])
            e_u, e_c = base.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([u, c])).chunk(2)
            finetuned = [ft.eps(x, tt, c_hat)] if model_guidance_active(t, K) else []
            return model_guidance(e_u, e_c, finetuned, [1.0 - v] * len(finetuned), w, t, K)

        return ddim_loop(rule, x, model.alphas_cumprod, steps, 0.0, gen, on_step)
