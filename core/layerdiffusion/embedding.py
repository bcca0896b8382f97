"""LayerDiffusion stage 1: layered controlled optimisation of e_a and e_b (Li et al. 2023, §3.2.1, eq. 2).

    [e^_a, e^_b] = argmin E_{x_t, eps} || M * (eps - f_theta(x_t, t, [e_a, e_b])) ||^2        (2)

The target text T is split into T_a (the object: its properties, its action) and T_b (the
background); e_a, e_b are their whole CLIP text-encoder outputs ([1, 77, D], as the Imagic ports
optimise), x_t is the noised input image, M its Segment-Anything object mask on the latent grid
(:func:`.masks.latent_mask`).  The denoiser is frozen; Adam, lr 1e-3, 500 steps (§3.3), t ~ U{0..T-1},
the VAE posterior mean as the image latent (as :mod:`core.imagic.embedding`).

**How "[e_a, e_b]" enters the UNet (the paper does not say; ``reading``):**

* ``"separate"`` (default): each embedding predicts on its own layer,
  ``M * || eps - f(x_t, t, e_a) ||^2 + (1 - M) * || eps - f(x_t, t, e_b) ||^2``
  (two terms, curves "e_a" and "e_b").  Chosen because it is the only reading in which each
  embedding is trained *as it is used later*: alone, 77 tokens, in e_opt = alpha e^_a + (1 - alpha) e^_b
  (eq. 3) and, for e^_a, alone in the iterative guidance (eq. 8); and because it is what
  "layered" and "separate the background and foreground to reduce interference between different
  textual information" (§3.2.1) describe: the object text only sees the object's pixels, the
  background text only the background's.  Both predictions share the step's (t, eps) draw and
  run as one batch-2 call (:class:`.masks.SharedDraw`).  ``background_latent`` (default: the
  input image, as eq. 2 says x_t is the noisy input) lets e_b fit another image's background.
* ``"concat"``: the literal bracket, the two embeddings concatenated along tokens (154 tokens; SD's
  cross-attention takes any length) in one prediction under the one mask M (one curve "e_ab").
  Kept selectable; its drawback is that neither embedding is ever trained alone, so e_opt (77
  tokens) and e^_a are used in a context they never met.
* ``"shared"``: each embedding predicts alone, both under the object mask M (curves "e_a", "e_b").

Optimised through :func:`core.fit.fit` with one named :class:`core.fit.Term` per curve (no weights:
eq. 2 has none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..fit import FitConfig, OnStep, ShouldStop, Term, fit
from ..losses import NoiseDraw
from ..seam import LatentDiffusion
from .masks import REDUCTIONS, SharedDraw, background_mask, masked_eps_mse

READINGS = ("separate", "concat", "shared")


@dataclass(frozen=True)
class LayerEmbeddingConfig:
    steps: int = 500  # §3.3 and appendix B.1
    lr: float = 1e-3  # §3.3, Adam
    reading: str = "separate"  # how [e_a, e_b] enters the UNet (module docstring)
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


@dataclass
class LayerEmbeddings:
    """e^_a and e^_b ([1, 77, D] float32, detached) and the per-term loss curves."""

    e_a: torch.Tensor
    e_b: torch.Tensor
    losses: list[float]
    terms: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    reading: str = "separate"


def layer_terms(model, latent: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor, mask: torch.Tensor,
                reading: str = "separate", reduction: str = "image",
                background_latent: torch.Tensor | None = None) -> tuple[list[Term], SharedDraw]:
    """The named terms of eq. 2 under ``reading`` on batches ``(t, eps)``, and their shared predictor.

    ``e_a``/``e_b`` are used as given (trainable tensors or fixed ones, e.g. to measure the loss).
    """
    bg_latent = latent if background_latent is None else background_latent
    if reading == "concat":
        draw = SharedDraw(model, latent, lambda: torch.cat([e_a, e_b], dim=1))
        return [Term("e_ab", lambda b: masked_eps_mse(draw(b), b[1], mask, reduction))], draw
    if reading == "separate":
        draw = SharedDraw(model, torch.cat([latent, bg_latent]), lambda: torch.cat([e_a, e_b]))
        masks = (mask, background_mask(mask, "the stage-1 object mask"))
    elif reading == "shared":
        draw = SharedDraw(model, torch.cat([latent, latent]), lambda: torch.cat([e_a, e_b]))
        masks = (mask, mask)
    else:
        raise ValueError(f"reading must be one of {', '.join(READINGS)}, got {reading!r}")
    return [Term("e_a", lambda b: masked_eps_mse(draw(b)[0:1], b[1], masks[0], reduction)),
            Term("e_b", lambda b: masked_eps_mse(draw(b)[1:2], b[1], masks[1], reduction))], draw


def optimize_layers(model: LatentDiffusion, latent: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor,
                    mask: torch.Tensor, config: LayerEmbeddingConfig = LayerEmbeddingConfig(),
                    background_latent: torch.Tensor | None = None, on_step: OnStep | None = None,
                    should_stop: ShouldStop | None = None) -> LayerEmbeddings:
    """Eq. 2: e^_a, e^_b reached from the text encodings ``e_a``, ``e_b`` ([1, 77, D]) by ``config.steps``
    Adam steps, the model frozen.  ``latent`` [1, 4, h, w] is the input image's model-space latent,
    ``mask`` its object mask on the latent grid [1, 1, h, w] (:func:`.masks.latent_mask`)."""
    if e_a.shape != e_b.shape:
        raise ValueError(f"e_a and e_b differ in shape: {tuple(e_a.shape)} vs {tuple(e_b.shape)}")
    device = torch.device(model.device)
    latent = latent.detach().to(device, torch.float32)
    bg = None if background_latent is None else background_latent.detach().to(device, torch.float32)
    if bg is not None and bg.shape != latent.shape:
        raise ValueError(f"background_latent {tuple(bg.shape)} differs from the image latent {tuple(latent.shape)}")
    mask = mask.detach().to(device, torch.float32)
    pa = torch.nn.Parameter(e_a.detach().to(device, torch.float32).clone())
    pb = torch.nn.Parameter(e_b.detach().to(device, torch.float32).clone())
    noise = NoiseDraw(config.seed, len(model.alphas_cumprod))
    t0 = time.perf_counter()
    with model.adapted({}, config.gradient_checkpointing) as m:
        terms, draw = layer_terms(m, latent, pa, pb, mask, config.reading, config.reduction, bg)
        res = fit([pa, pb], lambda step: noise(latent), terms,
                  FitConfig(config.steps, config.lr, what="layered embedding optimisation"), device,
                  on_step=on_step, should_stop=should_stop)
        draw.clear()
    return LayerEmbeddings(pa.detach().clone(), pb.detach().clone(), res.losses, res.terms,
                           time.perf_counter() - t0, config.reading)
