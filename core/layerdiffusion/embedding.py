"""LayerDiffusion stage 1: layered controlled optimisation of e_a and e_b (Li et al. 2023, §3.2.1, eq. 2).

    [e^_a, e^_b] = argmin E_{x_t, eps} || M * (eps - f_theta(x_t, t, [e_a, e_b])) ||^2        (2)

The target text T is split into T_a (the object: its properties, its action) and T_b (the
background); e_a, e_b are their whole CLIP text-encoder outputs ([1, 77, D], as the Imagic ports
optimise), x_t is the noised input image, M its Segment-Anything object mask on the latent grid
(:func:`.masks.latent_mask`).  The denoiser is frozen; Adam, lr 1e-3, 500 steps (§3.3), t ~ U{0..T-1},
the VAE posterior mean as the image latent (as :mod:`core.imagic.embedding`).

**How "[e_a, e_b]" enters the UNet (the paper writes one mask and one prediction; ``reading``):**

* ``"concat"`` (default): eq. 2 as written.  One prediction f(x_t, t, [e_a, e_b]) with the two
  embeddings concatenated along the tokens (154 tokens; SD's cross-attention takes any length),
  under the one mask M, x_t the noised input image (one curve "e_ab").  Both embeddings get their
  gradient from the object's pixels only; neither is ever trained alone, so e_opt (77 tokens) and
  e^_a (eq. 8) are later used in a context they did not meet (the paper's own setting).  A packed
  (SDXL) conditioning concatenates the two contexts and keeps e_a's pooled vector, so e_b's pooled
  vector is not trained by this reading (:func:`concat_layers`).
* ``"separate"``: each embedding predicts alone, ``M * || eps - f(x_t, t, e_a) ||^2 + (1 - M) *
  || eps - f(x_t, t, e_b) ||^2`` on the input image (curves "e_a", "e_b").  Each embedding is
  trained as it is used later (alone, 77 tokens), but e^_b learns the input image's *old*
  background while stage 2's L_bg pulls the model toward the reference's *new* one.  This was the
  pack's default before eq. 2 became it; kept so saved recipes run as they did.
* ``"separate_reference"``: e_a alone under M on the input image, e_b alone under 1 - M_r on the
  *reference* image (M_r its object mask; all zero for a pure background): e^_b learns the new
  background, the one L_bg fine-tunes toward.  Needs ``reference_latent`` and ``reference_mask``
  (the nodes' and the pipeline's reference image and mask).
* ``"shared"``: each embedding predicts alone, both under the object mask M on the input image
  (curves "e_a", "e_b").

The separate readings share each step's (t, eps) draw between the two predictions and run them as
one batch-2 call (:class:`.masks.SharedDraw`).

Optimised through :func:`core.fit.fit` with one named :class:`core.fit.Term` per curve (no weights:
eq. 2 has none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..fit import FitConfig, OnStep, ShouldStop, Term, fit
from ..checkpoint import Plan, settings_of, stage_checkpointing
from ..losses import NoiseDraw
from ..previews import Previews, one_step_x0, with_previews
from ..seam import LatentDiffusion, pack_cond, unpack_cond
from .masks import REDUCTIONS, SharedDraw, background_mask, masked_eps_mse

READINGS = ("concat", "separate", "separate_reference", "shared")
NEEDS_REFERENCE = ("separate_reference",)  # readings that train e_b on the reference image


@dataclass(frozen=True)
class LayerEmbeddingConfig:
    steps: int = 500  # §3.3 and appendix B.1
    lr: float = 1e-3  # §3.3, Adam
    reading: str = "concat"  # how [e_a, e_b] enters the UNet (module docstring); concat is eq. 2
    reduction: str = "image"  # :func:`.masks.masked_eps_mse`
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {', '.join(READINGS)}, got {self.reading!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")

    @property
    def needs_reference(self) -> bool:
        """Whether the reading trains e_b on the reference image (then give its latent and object mask)."""
        return self.reading in NEEDS_REFERENCE


@dataclass
class LayerEmbeddings:
    """e^_a and e^_b ([1, 77, D] float32, detached) and the per-term loss curves."""

    e_a: torch.Tensor
    e_b: torch.Tensor
    losses: list[float]
    terms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    reading: str = "concat"


def concat_layers(e_a: torch.Tensor, e_b: torch.Tensor, pooled_dim: int = 0) -> torch.Tensor:
    """[e_a, e_b] along the tokens (the concat reading of eq. 2): [1, 2N, D].  A packed conditioning
    (``pooled_dim`` > 0, SDXL: :func:`core.seam.pack_cond`) holds a pooled vector in its last row, which
    must not become a context token: the two contexts side by side and e_a's pooled vector, [1, 2N + 1, D]
    (ComfyUI's ConditioningConcat keeps ``conditioning_to``'s pooled output the same way)."""
    if pooled_dim <= 0:
        return torch.cat([e_a, e_b], dim=1)
    (ctx_a, pooled_a), (ctx_b, _) = unpack_cond(e_a, pooled_dim), unpack_cond(e_b, pooled_dim)
    return pack_cond(torch.cat([ctx_a, ctx_b], dim=1), pooled_a)


def layer_terms(model, latent: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor, mask: torch.Tensor,
                reading: str = "concat", reduction: str = "image", reference_latent: torch.Tensor | None = None,
                reference_mask: torch.Tensor | None = None) -> tuple[list[Term], SharedDraw]:
    """The named terms of eq. 2 under ``reading`` on batches ``(t, eps)``, and their shared predictor.

    ``latent`` [1, 4, h, w] is the input image's latent and ``mask`` [1, 1, h, w] its object mask M;
    ``reference_latent``, ``reference_mask`` (the reference's object mask M_r) only for
    ``"separate_reference"``.  ``e_a``/``e_b`` are used as given (trainable tensors or fixed ones,
    e.g. to measure the loss).
    """
    if reading == "concat":  # eq. 2: one prediction f(x_t, t, [e_a, e_b]) under the one mask M
        pooled_dim = getattr(model, "pooled_dim", 0)
        draw = SharedDraw(model, latent, lambda: concat_layers(e_a, e_b, pooled_dim))  # [1, 2N (+ 1), D]
        return [Term("e_ab", lambda b: masked_eps_mse(draw(b), b[1], mask, reduction))], draw
    if reading == "separate":
        latents, masks = torch.cat([latent, latent]), (mask, background_mask(mask, "the stage-1 object mask"))
    elif reading == "separate_reference":
        if reference_latent is None or reference_mask is None:
            raise ValueError("the separate_reference reading trains e_b on the reference image: give "
                             "reference_latent and reference_mask")
        if reference_latent.shape != latent.shape:
            raise ValueError(f"reference_latent {tuple(reference_latent.shape)} differs from the image latent "
                             f"{tuple(latent.shape)}")
        latents = torch.cat([latent, reference_latent])  # [2, 4, h, w]: e_a on the image, e_b on the reference
        masks = (mask, background_mask(reference_mask, "the reference object mask M_r"))
    elif reading == "shared":
        latents, masks = torch.cat([latent, latent]), (mask, mask)
    else:
        raise ValueError(f"reading must be one of {', '.join(READINGS)}, got {reading!r}")
    draw = SharedDraw(model, latents, lambda: torch.cat([e_a, e_b]))  # [2, N, D]
    return [Term("e_a", lambda b: masked_eps_mse(draw(b)[0:1], b[1], masks[0], reduction)),
            Term("e_b", lambda b: masked_eps_mse(draw(b)[1:2], b[1], masks[1], reduction))], draw


def layer_previews(model, latent: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor, reading: str,
                   reference_latent: torch.Tensor | None, alphas_cumprod: torch.Tensor,
                   previews: Previews) -> torch.Tensor:
    """x0_hat of each prediction ``reading`` trains (:func:`layer_terms`), at k preview timesteps: concat,
    the joint f(x_t, t, [e_a, e_b]) of the image [k, 4, h, w]; the other readings, e_a's prediction of the
    image then e_b's of its own latent (the reference for separate_reference) [2k, 4, h, w]."""
    def x0(lat, cond):
        return one_step_x0(model.eps, lat, cond.detach(), alphas_cumprod, previews.timesteps, previews.seed)

    if reading == "concat":
        return x0(latent, concat_layers(e_a, e_b, getattr(model, "pooled_dim", 0)))
    lat_b = reference_latent if reading == "separate_reference" else latent
    return torch.cat([x0(latent, e_a), x0(lat_b, e_b)])


def optimize_layers(model: LatentDiffusion, latent: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor,
                    mask: torch.Tensor, config: LayerEmbeddingConfig = LayerEmbeddingConfig(),
                    reference_latent: torch.Tensor | None = None, reference_mask: torch.Tensor | None = None,
                    on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
                    checkpoints: Plan | None = None, previews: Previews | None = None) -> LayerEmbeddings:
    """Eq. 2: e^_a, e^_b reached from the text encodings ``e_a``, ``e_b`` ([1, 77, D]) by ``config.steps``
    Adam steps, the model frozen.  ``latent`` [1, 4, h, w] is the input image's model-space latent,
    ``mask`` its object mask on the latent grid [1, 1, h, w] (:func:`.masks.latent_mask`);
    ``reference_latent`` and ``reference_mask`` (the reference's object mask on the same grid) are
    needed by the ``"separate_reference"`` reading only, and ignored by the others.  ``checkpoints``:
    write the run's state and / or continue one (:mod:`core.checkpoint`); ``previews``: every N steps the
    one-step x0 (:mod:`core.previews`) of each prediction the reading trains, at the current embeddings
    (:func:`layer_previews`)."""
    if e_a.shape != e_b.shape:
        raise ValueError(f"e_a and e_b differ in shape: {tuple(e_a.shape)} vs {tuple(e_b.shape)}")
    device = torch.device(model.device)
    latent = latent.detach().to(device, torch.float32)
    mask = mask.detach().to(device, torch.float32)
    ref = ref_mask = None
    if config.needs_reference:
        if reference_latent is None or reference_mask is None:
            raise ValueError(f"the {config.reading} reading trains e_b on the reference image: give "
                             "reference_latent and reference_mask")
        ref = reference_latent.detach().to(device, torch.float32)
        ref_mask = reference_mask.detach().to(device, torch.float32)
    pa = torch.nn.Parameter(e_a.detach().to(device, torch.float32).clone())
    pb = torch.nn.Parameter(e_b.detach().to(device, torch.float32).clone())
    noise = NoiseDraw(config.seed, len(model.alphas_cumprod))
    ck = stage_checkpointing(checkpoints, "layerdiffusion", "embedding", model.unet_parameters(),
                             settings_of(config), {"latent": latent, "e_a": e_a, "e_b": e_b, "mask": mask,
                                                   "reference_latent": ref, "reference_mask": ref_mask},
                             {"noise": noise.gen})
    t0 = time.perf_counter()
    with model.adapted({}, config.gradient_checkpointing) as m:
        terms, draw = layer_terms(m, latent, pa, pb, mask, config.reading, config.reduction, ref, ref_mask)
        show = with_previews(on_step, previews, lambda: layer_previews(m, latent, pa, pb, config.reading, ref,
                                                                       model.alphas_cumprod, previews))
        res = fit([pa, pb], lambda step: noise(latent), terms,
                  FitConfig(config.steps, config.lr, what="layered embedding optimisation"), device,
                  on_step=show, should_stop=should_stop, checkpointing=ck)
        draw.clear()
    return LayerEmbeddings(pa.detach().clone(), pb.detach().clone(), res.losses, res.terms,
                           time.perf_counter() - t0, config.reading)
