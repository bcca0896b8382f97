"""The rectified model's per-call rule (Hou et al. 2024, eqs. 1-2), written once for every caller.

At every denoiser call of a sampling trajectory:

1. P_t, the x_0 estimate the hypernetwork reads: the **unmodulated** model's (eq. 1 writes eps^theta;
   ``estimate="base"``: one extra denoiser pass per call), or, with ``estimate="modulated"``, the x_0
   estimate the modulated model made at the previous call of the same trajectory (no extra pass; the
   first call, and any call whose level (t or sigma) is not below the previous one's, use the base
   model: an inversion runs upwards, a new run starts again at the top);
2. {A_l, C_l} = R(x_0, P_t, t) (:mod:`.hypernet`);
3. eps_hat (or the denoised x_0) of the model whose modulated layers compute with
   theta_l (1 + s A_l C_l) (:mod:`.modulation`), through the engine's per-call features.

:func:`rectified_call` is steps 1 and 3 over two callables (the base estimate, the pass with
:func:`modulation`, step 2 and eq. 2's weights), so the
standalone samplers (:class:`core.rectifier.sample.Rectified`, epsilon space) and ComfyUI's Apply
Rectifier node (:mod:`nodes.rectifier`, denoised space) run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..seam import Features
from .hypernet import Rectifier
from .modulation import modulation_functions

ESTIMATES = ("base", "modulated")


def modulation(rectifier: Rectifier, x0: torch.Tensor, p_t: torch.Tensor, t: torch.Tensor,
               strength: float) -> Features:
    """Eq. 2's per-call features: theta_l (1 + strength A_l C_l) with {A_l, C_l} = R(x_0, P_t, t).

    ``x0`` [B, C, h, w]: the original image (model space); ``p_t`` [B, C, h, w]: the x_0 estimate at
    this call; ``t`` [B]: DDPM timesteps.  Differentiable in R's parameters."""
    return Features(modulation=modulation_functions(rectifier(x0, p_t, t), strength))


class Trajectory:
    """The previous call's x_0 estimate per trajectory ``key`` (``estimate="modulated"``).

    :meth:`recall` gives it back only while the trajectory continues: the same shape and a strictly
    lower level (t or sigma) for every sample."""

    def __init__(self):
        self.last: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    def recall(self, key: Hashable, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor | None:
        prev = self.last.get(key)
        if prev is None:
            return None
        estimate, previous_level = prev
        level = torch.as_tensor(level).to(previous_level.device)
        if estimate.shape != x.shape or level.shape != previous_level.shape:
            return None
        return estimate if bool((level < previous_level).all()) else None

    def remember(self, key: Hashable, estimate: torch.Tensor, level: torch.Tensor) -> None:
        self.last[key] = (estimate.detach(), torch.as_tensor(level).detach().clone())

    def reset(self) -> None:
        self.last.clear()


def rectified_call(base_estimate: Callable[[], torch.Tensor], modulated: Callable[[torch.Tensor], torch.Tensor],
                   trajectory: Trajectory | None = None, key: Hashable = None, x: torch.Tensor | None = None,
                   level: torch.Tensor | None = None,
                   estimate_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, bool]:
    """One call of the rectified model (module docstring): (output, whether the base model ran).

    ``base_estimate()``: the unmodulated model's x_0 estimate P_t; ``modulated(p_t)``: the pass with
    :func:`modulation` for that P_t.  With a ``trajectory`` (``estimate="modulated"``), P_t is the
    previous call's estimate while the trajectory continues (``x``: this call's input, ``level``: its
    t or sigma [B]), and this call's estimate (``estimate_of(output)``, default the output itself: a
    denoised output is its own x_0 estimate) is remembered for the next."""
    p_t = trajectory.recall(key, x, level) if trajectory is not None else None
    used_base = p_t is None
    if used_base:
        p_t = base_estimate()
    out = modulated(p_t)
    if trajectory is not None:
        trajectory.remember(key, (estimate_of or (lambda o: o))(out.detach()), level)
    return out, used_base
