"""Per-step guidance rules, as pure functions of predictions (no model, no sampler).

Every rule is *affine with weights summing to 1* in the predictions it mixes, so it
holds for epsilon predictions and for x0 (denoised) predictions alike: ComfyUI's
guiders mix x0, the standalone DDIM loop mixes epsilon (x0 = (x - sigma eps) is affine
in eps).

* :func:`cfg`: classifier-free guidance (Ho & Salimans 2022), u + w (c - u).
* :func:`model_guidance`: SINE eq. 3 (Zhang et al., CVPR 2023),
  e~ = w (v e(z_t, c) + (1 - v) e^(z_t, c^)) + (1 - w) e(z_t) for t > K, plain CFG on
  the pretrained model for t <= K; and its multi-model form (official
  ``DDIMMultiSampler``): e~ = u + w ((1 - sum_i b_i) c + sum_i b_i c^_i - u) over the models
  active at t (t > K_i: one K per model), b_i the weight of fine-tuned model i (v = 1 - b for
  one model).  Eq. 3 depends only on t, so it holds for any sampler, however many times it
  evaluates the model per step.
* :func:`alternating_choice`: LayerDiffusion eq. 8 by *step index* parity (the literal
  ``t % 2`` on SD's DDIM timesteps 981, 961, ..., 1 is always odd and never alternates).
* :func:`step_index`: which step of a sampling run a sigma belongs to, from the run's
  sigma list; :class:`StepClock` warns when a sampler evaluates off the grid.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch


def cfg(uncond: torch.Tensor, cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + w (cond - uncond)  (w = 1: the conditional prediction)."""
    return uncond + w * (cond - uncond)


def model_guidance(uncond: torch.Tensor, cond: torch.Tensor, finetuned: Sequence[torch.Tensor | None],
                   weights: Sequence[float], w: float, t: int, K: int | Sequence[int]) -> torch.Tensor:
    """SINE eq. 3 (single and multi-model) at DDPM timestep ``t``.

    ``uncond``, ``cond``: the pretrained model's predictions at the empty and the target
    prompt; ``finetuned[i]``: fine-tuned model i at its fine-tune prompt c^_i (None where it
    is inactive and was not evaluated); ``weights[i]``: that model's weight b_i (one model:
    b = 1 - v, the paper's v = 0.7 gives b = 0.3); ``K``: one threshold for all models or
    one K_i per model (official ``range_t_min`` per model; here strictly t > K_i, the
    paper's reading).  With A the models with t > K_i:
    u + w ((1 - sum_A b_i) c + sum_A b_i c^_i - u), plain CFG when A is empty.
    """
    if len(finetuned) != len(weights):
        raise ValueError(f"{len(finetuned)} fine-tuned predictions but {len(weights)} weights")
    Ks = [int(K)] * len(finetuned) if isinstance(K, (int, float)) else [int(k) for k in K]
    if len(Ks) != len(finetuned):
        raise ValueError(f"{len(finetuned)} fine-tuned predictions but {len(Ks)} thresholds K")
    active = [(pred, float(b)) for pred, b, k in zip(finetuned, weights, Ks) if int(t) > k]
    if not active:
        return cfg(uncond, cond, w)
    if any(pred is None for pred, _ in active):
        raise ValueError(f"a fine-tuned model active at t = {int(t)} (t > its K) has no prediction")
    mixed = (1.0 - sum(b for _, b in active)) * cond
    for pred, b in active:
        mixed = mixed + b * pred
    return cfg(uncond, mixed, w)


def model_guidance_active(t: int, K: int) -> bool:
    """Does eq. 3 need the fine-tuned branch at timestep t (t > K)?  Skip it otherwise."""
    return int(t) > int(K)


def alternating_choice(index: int, start_parity: int = 0) -> int:
    """LayerDiffusion eq. 8 by step index: 0 (use e^_a) on steps whose index has the
    starting parity, 1 (use e_opt) on the others.  ``start_parity`` 0: the first step
    (index 0) uses e^_a, as ``t % 2 == 0`` would on an even first timestep."""
    if start_parity not in (0, 1):
        raise ValueError(f"start_parity must be 0 or 1, got {start_parity}")
    return 0 if (int(index) - start_parity) % 2 == 0 else 1


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
