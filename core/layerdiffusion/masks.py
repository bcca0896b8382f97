"""LayerDiffusion's masks and its masked epsilon loss (Li et al. 2023, eqs. 2, 4, 5).

Every loss of the method is a masked eps-MSE, ``|| M * (eps - f_theta(x_t, t, e)) ||^2``, with a
Segment-Anything mask M given at image resolution.  The UNet works on the latent grid (1/8 of the
image for SD 1.x), so the mask must be brought to that grid first: :func:`latent_mask`.

**The resize rule (one rule, chosen here; the paper does not say).**  Area (average) pooling of the
pixel mask onto the latent grid, then a threshold at 0.5: a latent cell belongs to the object when
at least half of the pixels it covers do (a majority vote per cell).  Why not nearest-neighbour (what
Break-A-Scene uses, ``F.interpolate`` default)?  Nearest keeps *one* pixel of each 8 x 8 block (its
top-left one), so the result depends on how the object's edge falls against the 8-pixel grid, and a
thin structure or a speck of SAM noise on that one pixel decides the whole cell; the majority vote
uses every pixel and moves the edge by at most half a cell.  Why binary?  A binary latent mask
makes "outside the mask" a well-defined set where the loss has exactly zero gradient, and makes the
object and background masks exact complements (:func:`background_mask`), so no latent cell is
counted twice or dropped between L_obj and L_bg.  Both alternatives stay reachable:
``rule="nearest"`` (Break-A-Scene) and ``rule="soft"`` (the area fractions themselves, no
threshold; then the complement is 1 - fraction).

**The reduction (chosen here).**  :func:`masked_eps_mse` with ``reduction="image"`` (default) is
sum(M * (eps - f)^2) / numel: eqs. 2, 4, 5 as written (a squared norm of the masked residual), up
to the constant 1 / numel that the diffusers/LDM training loss (a mean over all latent elements)
carries.  It is what multiplying the mask into the diffusers Imagic pipeline's loss (a mean over
all latent elements) gives, the likely lineage of the paper's code (its lr 1e-3 x 500 and lr 2e-6
are that pipeline's defaults, methods.md §4.1), and what Break-A-Scene's
``F.mse_loss(pred * M, target * M)`` computes.  With it the lambdas of eq. 6 are
per-pixel weights, and a small object contributes little in total: consistent with the paper
raising lambda_1 from 2 to 3 "for smaller foreground objects" (§4.3).  ``reduction="mask"`` is
:func:`core.losses.masked_mse`'s mean over the mask's area (each term a per-region average, whatever
the object's size).  In both, the gradient w.r.t. the prediction is exactly zero where M = 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..diffusion import q_sample
from ..losses import masked_mse
from ..seam import Denoiser

RULES = ("area", "nearest", "soft")
REDUCTIONS = ("image", "mask")
THRESHOLD = 0.5


def _as_batch(mask: torch.Tensor, name: str) -> torch.Tensor:
    """[H, W], [B, H, W] or [B, 1, H, W] -> float32 [B, 1, H, W]; ValueError naming ``name``."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a mask tensor [H, W] or [B, H, W], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        pass
    else:
        raise ValueError(f"{name}: expected a mask [H, W] or [B, H, W] (a ComfyUI MASK), got shape "
                         f"{tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"{name}: the mask is empty (shape {tuple(mask.shape)})")
    mask = mask.detach().float()
    if not bool(torch.isfinite(mask).all()) or float(mask.min()) < 0.0 or float(mask.max()) > 1.0:
        raise ValueError(f"{name}: mask values must lie in [0, 1], got [{float(mask.min()):g}, "
                         f"{float(mask.max()):g}]")
    return mask


def latent_mask(mask: torch.Tensor, latent_hw: Sequence[int], image_hw: Sequence[int] | None = None,
                name: str = "mask", rule: str = "area", allow_empty: bool = False) -> torch.Tensor:
    """A pixel mask [H, W] / [B, H, W] in [0, 1] on the latent grid: [B, 1, h, w] float32.

    ``rule`` "area" (default): average over the pixels each latent cell covers, then >= 0.5 is the
    object (see the module docstring); "nearest": nearest-neighbour resize then >= 0.5;
    "soft": the area fractions.  ``image_hw``: the (H, W) of the image the mask belongs to; a
    mask of another size raises a ValueError naming ``name``.  A mask that is all zero on the
    latent grid raises a ValueError (a term with an empty mask trains nothing) unless
    ``allow_empty`` (a reference that is all background: M_r = 0 is legitimate, its complement
    is what L_bg uses).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    m = _as_batch(mask, name)
    h, w = (int(v) for v in latent_hw)
    if h < 1 or w < 1:
        raise ValueError(f"{name}: the latent size must be positive, got {h}x{w}")
    H, W = m.shape[-2:]
    if image_hw is not None and (H, W) != tuple(int(v) for v in image_hw):
        ih, iw = (int(v) for v in image_hw)
        raise ValueError(f"{name}: the mask is {W}x{H} (width x height) but its image is {iw}x{ih}; "
                         "give the mask of that image, at its size")
    if H < h or W < w:
        raise ValueError(f"{name}: the mask ({W}x{H}) is smaller than the latent grid ({w}x{h})")
    if rule == "nearest":
        out = (F.interpolate(m, size=(h, w), mode="nearest") >= THRESHOLD).float()
    else:
        frac = F.interpolate(m, size=(h, w), mode="area")  # exact block means when H, W are multiples
        out = frac if rule == "soft" else (frac >= THRESHOLD).float()
    if not allow_empty:
        empty = [i for i in range(out.shape[0]) if not bool(out[i].any())]
        if empty:
            which = "" if out.shape[0] == 1 else f" (batch item {empty[0]})"
            raise ValueError(f"{name}: the mask is empty at the {w}x{h} latent resolution{which}: no latent cell "
                             "is at least half covered; select a larger region (or check that white marks the "
                             "object)")
    return out


def background_mask(object_mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """1 - M on the latent grid (eq. 5's (1 - M_r)); ValueError when nothing is left (M covers
    every latent cell, so the background term would train nothing)."""
    out = 1.0 - object_mask.float()
    empty = [i for i in range(out.shape[0]) if not bool((out[i] > 0).any())]
    if empty:
        raise ValueError(f"{name}: the object covers the whole image at the latent resolution; no background "
                         "is left for the background loss")
    return out


def masked_eps_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                   reduction: str = "image") -> torch.Tensor:
    """|| M * (target - pred) ||^2 reduced as ``reduction`` ("image": / numel; "mask": / mask area).

    ``mask`` [B or 1, 1, h, w] broadcasts over channels.  The gradient w.r.t. ``pred`` is
    2 M (pred - target) / N: exactly zero wherever M = 0.
    """
    if reduction == "mask":
        return masked_mse(pred, target, mask)
    if reduction != "image":
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    m = mask.to(pred.device, torch.float32).expand_as(pred)
    return ((pred.float() - target.float()) ** 2 * m).sum() / pred.numel()


class SharedDraw:
    """The eps predictions of K (latent, cond) pairs at one step's (t, eps) draw, made in one
    batched UNet call and shared by that step's loss terms.

    Stage 1 (two embeddings) and stage 2 (two latents) each need two predictions per step at the
    same draw; one batch-2 call is cheaper than two batch-1 calls on a GPU, and each term reads
    its row.  The call happens inside the first term (so inside the fit loop's autocast and
    scope); the result is cached by the identity of the batch the loop hands to every term.
    ``conds``: [K, N, D], or a function returning it (stage 1 builds it from the trained
    embeddings at every step); ``latents`` [K, C, h, w].
    """

    def __init__(self, model: Denoiser, latents: torch.Tensor,
                 conds: torch.Tensor | Callable[[], torch.Tensor]):
        self.model, self.latents, self.conds = model, latents, conds
        self._batch: object | None = None
        self._pred: torch.Tensor | None = None

    def predict(self, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """[K, C, h, w] predictions at timestep ``t`` [1] and noise ``eps`` [1, C, h, w] (shared by all K)."""
        conds = self.conds() if callable(self.conds) else self.conds
        k = self.latents.shape[0]
        a = self.model.alphas_cumprod.to(self.latents.device)[t.cpu()].to(self.latents.device)
        x_t = q_sample(self.latents, a.expand(k), eps.expand(k, -1, -1, -1))
        return self.model.eps(x_t, t.expand(k), conds)

    def __call__(self, batch) -> torch.Tensor:
        if batch is not self._batch:
            self._batch, self._pred = batch, self.predict(batch[0], batch[1])
        return self._pred

    def clear(self) -> None:
        self._batch = self._pred = None
