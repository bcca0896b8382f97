"""LayerDiffusion stage 3: the iterative guidance strategy (Li et al. 2023, §3.2.3, eqs. 7-8).

    I_{t-1} = D(I_t | e^_a)    if t % 2 == 0
              D(I_t | e_opt)   otherwise                                    (8)

from random noise, 50 steps (§3.3), with the fine-tuned model: the object embedding e^_a is
re-imposed every other step as "a strong constraint on the object properties" (without it, valid
edits drop from 81 % to 43 %, §4.3).

**Parity by step index, not by timestep value.**  SD's DDIM timesteps for 50 steps (diffusers'
"leading" spacing, offset 1: :func:`core.sampling.ddim_loop`) are 981, 961, ..., 1: all odd, so a
literal ``t % 2`` on them never selects e^_a (and with offset 0, 980, ..., 0, it always would).
Eq. 7 numbers the process I_T, ..., I_0 by *update*, so t in eq. 8 counts steps: with S steps,
step index i (0 = the first update, from pure noise) is the paper's t = S - i, and "t even" is
"i has the parity of S".  :func:`start_parity_for` returns that (``start_parity`` None): for the
default 50 steps the first step uses e^_a, and for any S the last step (t = 1) uses e_opt, the
embedding the model was fine-tuned at.  ``start_parity`` 0 or 1 overrides it: the steps whose
index has that parity use e^_a (:func:`alternating_choice`).

**Classifier-free guidance inside each D(.)** (the paper does not say): yes.  D(. | y) is "the
diffusion process of a pre-trained model" conditioned on y, which for Stable Diffusion is CFG
sampling (u + w (c - u), the empty prompt as u; the diffusers pipelines' default w = 7.5, also the
Imagic community pipeline's that the paper's hyper-parameters come from).  So each step mixes the
unconditional prediction with the prediction at that step's embedding, one batched call, with the
same ``guidance`` scale on both kinds of step; ``guidance=1`` gives the conditional D without CFG.
Both kinds of step use the fine-tuned model (a caller passes ``model.adapted(tuned fns)``).
With e^_a equal to e_opt this is exactly :func:`core.sampling.ddim_sample` (same noise, same
batching), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fit import OnStep
from ..guidance import cfg
from ..sampling import EpsRule, ddim_loop
from ..seam import Denoiser

OBJECT, OPT = 0, 1  # alternating_choice's answers: e^_a, e_opt


def alternating_choice(index: int, start_parity: int = 0) -> int:
    """Eq. 8 by step index: OBJECT (use e^_a) on steps whose index has the starting parity, OPT
    (use e_opt) on the others.  ``start_parity`` 0: the first step (index 0) uses e^_a, as
    ``t % 2 == 0`` would on an even first timestep (the literal ``t % 2`` on SD's DDIM timesteps
    981, 961, ..., 1 is always odd and never alternates)."""
    if start_parity not in (0, 1):
        raise ValueError(f"start_parity must be 0 or 1, got {start_parity}")
    return OBJECT if (int(index) - start_parity) % 2 == 0 else OPT


@dataclass(frozen=True)
class GuidanceConfig:
    steps: int = 50  # §3.3
    guidance: float = 7.5  # CFG scale inside each D(.); 1: no CFG
    start_parity: int | None = None  # None: eq. 8 with eq. 7's step count (start_parity_for)
    eta: float = 0.0  # DDIM eta

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.start_parity not in (None, 0, 1):
            raise ValueError(f"start_parity must be None, 0 or 1, got {self.start_parity!r}")
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


def start_parity_for(steps: int, start_parity: int | None = None) -> int:
    """The index parity whose steps use e^_a: ``start_parity``, or (None) ``steps % 2`` (paper's t = S - i even)."""
    if start_parity is None:
        return int(steps) % 2
    if start_parity not in (0, 1):
        raise ValueError(f"start_parity must be None, 0 or 1, got {start_parity!r}")
    return int(start_parity)


def schedule(steps: int, start_parity: int | None = None) -> list[int]:
    """Per step index, which embedding eq. 8 uses: :data:`OBJECT` (e^_a) or :data:`OPT` (e_opt)."""
    p = start_parity_for(steps, start_parity)
    return [alternating_choice(i, p) for i in range(int(steps))]


def iterative_rule(model: Denoiser, e_a: torch.Tensor, e_opt: torch.Tensor, uncond: torch.Tensor | None,
                   guidance: float, steps: int, start_parity: int | None = None,
                   trace: list[int] | None = None) -> EpsRule:
    """The per-step eps rule of eq. 8 for :func:`core.sampling.ddim_loop`.  Conds are [B, N, D] (already
    on the model's device and expanded to the batch); ``trace`` (if given) gets each step's choice."""
    p = start_parity_for(steps, start_parity)
    use_cfg = guidance != 1.0
    if use_cfg and uncond is None:
        raise ValueError("uncond is required for classifier-free guidance (guidance != 1)")

    def rule(x: torch.Tensor, tt: torch.Tensor, i: int) -> torch.Tensor:
        k = alternating_choice(i, p)
        if trace is not None:
            trace.append(k)
        c = e_a if k == OBJECT else e_opt
        if not use_cfg:
            return model.eps(x, tt, c)
        e_u, e_c = model.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, c])).chunk(2)
        return cfg(e_u, e_c, guidance)

    return rule


@torch.no_grad()
def iterative_sample(model: Denoiser, e_a: torch.Tensor, e_opt: torch.Tensor, uncond: torch.Tensor | None = None,
                     shape: tuple[int, ...] = (1, 4, 64, 64), config: GuidanceConfig = GuidanceConfig(),
                     seed: int = 0, x_T: torch.Tensor | None = None, trace: list[int] | None = None,
                     on_step: OnStep | None = None) -> torch.Tensor:
    """Model-space latents [B, 4, h, w] sampled with eq. 8 (DDIM) from e^_a, e_opt ([1 or B, 77, D]).

    The starting noise is ``torch.randn(shape)`` from a generator seeded with ``seed`` (the same
    draw as :func:`core.sampling.ddim_sample`), or ``x_T``.
    """
    device = torch.device(model.device)
    gen = torch.Generator().manual_seed(int(seed))
    x = (x_T if x_T is not None else torch.randn(shape, generator=gen)).to(device, torch.float32)
    b = x.shape[0]
    a, o = (e.to(device, torch.float32).expand(b, -1, -1) for e in (e_a, e_opt))
    u = uncond.to(device, torch.float32).expand(b, -1, -1) if uncond is not None else None
    rule = iterative_rule(model, a, o, u, config.guidance, config.steps, config.start_parity, trace)
    return ddim_loop(rule, x, model.alphas_cumprod, config.steps, config.eta, gen, on_step)
