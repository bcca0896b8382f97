"""SINE's model-based classifier-free guidance (Zhang et al., CVPR 2023, eq. 3), as pure functions of predictions.

Single model (eq. 3), at DDPM timestep t with the paper's K = 400 and v = 0.7:

    e~ = w (v e(z_t, c) + (1 - v) e^(z_t, c^)) + (1 - w) e(z_t)     for t > K
    e~ = w e(z_t, c) + (1 - w) e(z_t)                              for t <= K (plain CFG)

Several fine-tuned models (the official ``DDIMMultiSampler``), b_i the weight of model i and A the
models with t > K_i (one K per model):

    e~ = u + w ((1 - sum_A b_i) c + sum_A b_i c^_i - u)

One model is the case b = 1 - v.  The rule is affine with weights summing to 1 in the predictions it
mixes, so it holds for epsilon and for x0 (denoised) predictions alike, and it depends only on t, so it
holds for any sampler however many times it evaluates the model per step.  ComfyUI's guider
(:mod:`nodes.sine`) and the standalone DDIM edit (:mod:`core.sine.edit`) both call
:func:`model_guidance`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..guidance import cfg


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
