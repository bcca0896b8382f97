"""LayerDiffusion eq. 3: e_opt = alpha * e^_a + (1 - alpha) * e^_b, alpha = 0.7 (Li et al. 2023, §3.2.1).

alpha weighs the object embedding; the paper sets 0.7 "according to the experimental analysis of
text embedding interpolation in Imagic" and ablates 0, 0.3 and 1 (appendix B.2, Table 1 (j), (k)).
Values outside [0, 1] extrapolate; they are allowed (as Imagic's eta), not recommended.

**ComfyUI's ConditioningAverage computes exactly this** on the cond tensor when wired as
``conditioning_to`` = e^_a, ``conditioning_from`` = e^_b, ``conditioning_to_strength`` = alpha: it
returns ``t1 * w + t0 * (1.0 - w)`` (``torch.mul`` of the tensor by the Python float, then one
add; ``nodes.py`` of ComfyUI 0.3.64 and 0.8.0), the same float32 operations as
:func:`interpolate_layers`, so the two are bit-identical.  Differences that do not matter here but
should be known: (1) its strength widget is limited to [0, 1]; (2) only the
first entry of ``conditioning_from`` is used; (3) ``conditioning_from`` is cut or zero-padded to
``conditioning_to``'s token count (this function requires equal shapes instead); (4) the pooled
output is averaged with the same weights when both conditionings carry one (and copied from
``conditioning_from`` when only it does).  On SD 1.x the UNet never reads the pooled output (no
ADM input), so the pooled outputs the nodes carry along do not change the result.  On SDXL stage 1
optimises the packed conditioning (:func:`core.seam.pack_cond`: the context and the pooled vector),
and ConditioningAverage weighs both parts with alpha, as this function does on the packed tensor;
the SDXL integration test checks the two agree on the context and on ``pooled_output``.
"""

from __future__ import annotations

import math

import torch

ALPHA = 0.7  # §3.2.1


def interpolate_layers(e_a: torch.Tensor, e_b: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """alpha * e_a + (1 - alpha) * e_b (eq. 3); shapes must match, alpha finite."""
    if e_a.shape != e_b.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(e_a.shape)} vs {tuple(e_b.shape)}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    alpha = float(alpha)
    return e_a * alpha + e_b.to(e_a) * (1.0 - alpha)
