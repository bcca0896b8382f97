"""What every method's per-step guidance shares: CFG and the sampling clock (no model, no sampler).

Each paper's own rule lives in its package and builds on these: SINE's eq. 3 in
:mod:`core.sine.guidance`, LayerDiffusion's eq. 8 step rule in :mod:`core.layerdiffusion.guidance`,
SinDDM's guidance in :mod:`core.sinddm.guidance`, the rectifier's eq. 2 in :mod:`core.rectifier.rule`.
Every rule is *affine with weights summing to 1* in the predictions it mixes, so it
holds for epsilon predictions and for x0 (denoised) predictions alike: ComfyUI's
guiders mix x0, the standalone DDIM loop mixes epsilon (x0 = (x - sigma eps) is affine
in eps).

* :func:`cfg`: classifier-free guidance (Ho & Salimans 2022), u + w (c - u).
* :func:`step_index`: which step of a sampling run a sigma belongs to, from the run's
  sigma list; :class:`StepClock` warns when a sampler evaluates off the grid.
"""

from __future__ import annotations

import warnings
import torch


def cfg(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond - uncond)  (w = 1: the conditional prediction)."""
    return uncond + w * (cond - uncond)


def step_index(sample_sigmas: torch.Tensor, sigma: float | torch.Tensor, rtol: float = 1e-4) -> int:
    """The step a model evaluation at ``sigma`` belongs to in a run over ``sample_sigmas``
    (descending, ending at 0): the last i with sample_sigmas[i] >= sigma (1 - rtol).

    One-evaluation-per-step samplers (euler, euler_ancestral, ddim, dpmpp_2m, lcm)
    evaluate exactly at sample_sigmas[i] for step i.  Two-stage samplers (heun, dpm_2,
    dpmpp_sde, euler with churn) also evaluate between grid points; those land on the
    step they belong to by this rule, but are *extra* evaluations (see
    :meth:`StepClock.on_grid`)."""
    s = float(sigma)
    sig = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten()
    idx = int((sig >= s * (1 - rtol)).sum().item()) - 1
    return max(0, min(idx, len(sig) - 1))


def on_grid(sample_sigmas: torch.Tensor, sigma: float | torch.Tensor, rtol: float = 1e-4) -> bool:
    sig = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten()
    return bool(torch.isclose(sig, torch.tensor(float(sigma), dtype=torch.float64), rtol=rtol).any())


class MultiEvaluationError(ValueError):
    """A strict :class:`StepClock` saw a sampler evaluate the model twice within one step."""


class StepClock:
    """Step indices of one sampling run, with a warning (once per run) when the sampler
    evaluates the model off its sigma grid or twice at one step: per-step rules then
    see several evaluations per step (``strict``: :class:`MultiEvaluationError` instead).
    A new sigma list starts a new run (index 0)."""

    def __init__(self, what: str = "this guidance", strict: bool = False):
        self.what, self.strict = what, strict
        self._sigmas: torch.Tensor | None = None
        self._seen: set[int] = set()
        self._warned = False

    def __call__(self, sample_sigmas: torch.Tensor, sigma: float | torch.Tensor) -> int:
        sig = torch.as_tensor(sample_sigmas).detach().to("cpu", torch.float64).flatten()
        if self._sigmas is None or self._sigmas.shape != sig.shape or not torch.equal(self._sigmas, sig):
            self._sigmas, self._seen, self._warned = sig, set(), False
        i = step_index(sig, sigma)
        if i == 0 and 0 in self._seen and on_grid(sig[:1], sigma):  # the same schedule again: a new run
            self._seen, self._warned = set(), False
        if (not on_grid(sig, sigma) or i in self._seen) and not self._warned:
            self._warned = True
            text = (f"{self.what}: the sampler evaluates the model more than once per step (e.g. heun, dpm_2, "
                    "dpmpp_sde, euler with s_churn); per-step rules then repeat steps. Use euler, "
                    "euler_ancestral, ddim, dpmpp_2m or lcm.")
            if self.strict:
                raise MultiEvaluationError(text)
            warnings.warn(text, stacklevel=2)
        self._seen.add(i)
        return i

    def restart(self) -> None:
        self._sigmas = None
