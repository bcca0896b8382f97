"""The model-agnostic seam: what every method sees of a diffusion model.

Two protocols, so that the maths in ``core`` runs unchanged on every back end:

* :class:`Denoiser`: an epsilon-prediction network with its training schedule, its
  parameters under canonical names, and *views* (adapted versions that coexist with
  the base model).  Pixel-space DDPMs (:mod:`core.pixel`, diffusers ``UNet2DModel``)
  are Denoisers.
* :class:`LatentDiffusion`: a Denoiser that also has a VAE and a text encoder (the SD
  1.x family): :class:`core.sd.backend.DiffusersSD` (diffusers modules; standalone API,
  CLIs, tests) and ``nodes.comfy_views.ComfySD`` (ComfyUI's MODEL, CLIP and VAE).

Conventions, identical for every back end:

* images are float tensors [B, 3, H, W] in [0, 1];
* latents are *model-space* latents [B, 4, H/8, W/8] (the VAE output already multiplied
  by its scaling factor, 0.18215 for SD 1.x); a pixel model's "latent" is the image in
  [-1, 1];
* ``t`` is the discrete DDPM timestep, an integer tensor [B] in 0..T-1;
* ``cond`` is the text encoder's last hidden state [B, 77, D] (None for unconditional
  pixel models).  A model whose UNet also takes a *pooled* text vector (SDXL's added
  conditioning, ``pooled_dim`` > 0) receives the whole text conditioning in one tensor,
  [B, N + 1, D]: the context in the first N rows and the pooled vector [B, P] in the first
  P entries of the last row, zeros after it (:func:`pack_cond` / :func:`unpack_cond`).  Every
  method then optimises, interpolates, concatenates and guides "the text embedding" exactly
  as on SD 1.x, and both parts follow (Imagic's eta interpolates the context and the pooled
  vector alike);
* ``eps`` returns the epsilon prediction of the variance-preserving parameterisation
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

**Views.**  ``with model.views(spec_a, spec_b) as (base, a, b):`` gives the base model
and one view per :class:`ViewSpec`; all of them can be evaluated inside one sampling
step (SINE eq. 3 mixes the pretrained and the fine-tuned prediction; the rectifier
needs an unmodulated and a modulated pass).  A view computes with ``fn(W)`` in place
of each named weight W *only during its own calls* (and inside ``view.activated()``,
which a training loop keeps open across backward so that gradient checkpointing
recomputes with the same weights).  Switching views never reloads or copies the
model.  ``model.adapted(fns)`` is the exclusive form: one view, active for the whole
block.

**Features** (:class:`Features`) are typed per-call inputs with the same meaning on
every back end, instead of back-end specific keyword arguments: an additive map after
the first input block (SINE's positional map F(v)), the crop box it is cut from, and a
per-call weight modulation (the rectifier's theta * (1 + Delta)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .diffusion import predict_x0

WeightFunction = Callable[[torch.Tensor], torch.Tensor]
"""W -> W' for one named weight.  A function that also has ``output_delta(module, x)``
(a LoRA, a per-sample modulation) is applied to the layer's *output* instead,
y + output_delta(module, x): the same result without a full-size weight (or weight
gradient), and the only form in which a per-sample weight change can be expressed."""

FeatureMap = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(h [B, C, H, W], crop_box [B, 4] or None) -> a map broadcastable to h, added to h."""


@dataclass(frozen=True)
class Features:
    """Typed per-call features; every back end gives identical eps for the same features.

    ``input_map``: added to the output of the denoiser's first input block (the
    ``conv_in`` of diffusers' UNets; ComfyUI's ``input_block_patch`` at block
    ("input", 0)), before the skip connection is stored.  ``crop_box`` [B, 4] (top,
    left, height, width, in the map's own grid units) is handed to ``input_map``.
    ``modulation``: weight functions (canonical names) applied for this call only, on top
    of the view's own; a view must list their names in :attr:`ViewSpec.modulates`.
    """

    input_map: FeatureMap | None = None
    crop_box: torch.Tensor | None = None
    modulation: Mapping[str, WeightFunction] | None = None

    def merged(self, other: "Features | None") -> "Features":
        """This call's features over a view's defaults (fields of ``other`` win when set)."""
        if other is None:
            return self
        mod = dict(self.modulation or {})
        mod.update(other.modulation or {})
        return replace(self, input_map=other.input_map or self.input_map,
                       crop_box=other.crop_box if other.crop_box is not None else self.crop_box,
                       modulation=mod or None)


NO_FEATURES = Features()


def pack_cond(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """One conditioning tensor from a context [B, N, D] and a pooled vector [B, P] (P <= D):
    [B, N + 1, D], the pooled vector in the first P entries of the last row, zeros after it.

    The zeros get no gradient (the model never reads them), so an optimised or interpolated
    packed tensor stays a valid packing."""
    if context.ndim != 3 or pooled.ndim != 2 or pooled.shape[0] != context.shape[0]:
        raise ValueError(f"pack_cond: expected context [B, N, D] and pooled [B, P], got "
                         f"{tuple(context.shape)} and {tuple(pooled.shape)}")
    b, _, d = context.shape
    p = pooled.shape[1]
    if p > d:
        raise ValueError(f"pack_cond: the pooled vector ({p}) is wider than the context ({d})")
    row = torch.cat([pooled.to(context.dtype), context.new_zeros(b, d - p)], dim=1)  # [B, D]
    return torch.cat([context, row[:, None]], dim=1)  # [B, N + 1, D]


def unpack_cond(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context [B, N, D], pooled [B, P] or None): the inverse of :func:`pack_cond`
    (``pooled_dim`` 0: the tensor is a plain context)."""
    if pooled_dim <= 0:
        return cond, None
    if cond.ndim != 3 or cond.shape[1] < 2 or cond.shape[2] < pooled_dim:
        raise ValueError(f"a conditioning for this model is [B, N + 1, D >= {pooled_dim}] (context and pooled "
                         f"vector), got {tuple(cond.shape)}")
    return cond[:, :-1], cond[:, -1, :pooled_dim]


@dataclass(frozen=True)
class ViewSpec:
    """One adapted version of a model: weight functions (canonical names), default
    features, and the names a per-call :attr:`Features.modulation` may touch."""

    weight_functions: Mapping[str, WeightFunction] = field(default_factory=dict)
    features: Features | None = None
    modulates: tuple[str, ...] = ()

    def names(self) -> set[str]:
        return set(self.weight_functions) | set(self.modulates)


@runtime_checkable
class Denoiser(Protocol):
    """An epsilon-prediction diffusion network (pixel or latent)."""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t of the training schedule, float64 [T] on the CPU."""
        ...

    @property
    def device(self) -> torch.device:
        """Where :meth:`eps` runs and where its inputs should live."""
        ...

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
            features: Features | None = None) -> torch.Tensor:
        """epsilon_theta(x_t, t, cond): [B, C, h, w] -> [B, C, h, w]."""
        ...

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        """The network's parameters under their canonical names (SD: the original layout
        without ``model.diffusion_model.``; pixel models: diffusers' names).  Shared with
        every other user of the model: never change them in place."""
        ...

    def views(self, *specs: ViewSpec, gradient_checkpointing: bool = False,
              differentiable: bool = False) -> AbstractContextManager[tuple["Denoiser", ...]]:
        """``(base, view_1, ..., view_n)``, valid inside the block; see the module docstring.
        ``differentiable``: gradients will flow through the network (training); a back end
        may need to prepare for it (ComfyUI computes with per-call weight copies then)."""
        ...

    def adapted(self, weight_functions: Mapping[str, WeightFunction],
                gradient_checkpointing: bool = False) -> AbstractContextManager["Denoiser"]:
        """One view, active for the whole block (every use of the model inside is adapted);
        differentiable.  An empty mapping still gives a view autograd can differentiate
        through (e.g. w.r.t. ``cond``)."""
        ...


@runtime_checkable
class LatentDiffusion(Denoiser, Protocol):
    """A text-conditioned latent Denoiser (SD 1.x, SDXL): adds the VAE and the text encoder."""

    @property
    def context_dim(self) -> int:
        """Width of the text-encoder output the denoiser cross-attends to (768 for SD 1.x)."""
        ...

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text vector the UNet also takes (1280 for SDXL), 0 when it takes
        none (SD 1.x); when > 0, ``cond`` is packed (:func:`pack_cond`)."""
        ...

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """VAE encode: image [B, 3, H, W] in [0, 1] -> model-space latent (posterior mean)."""
        ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode: model-space latent -> image [B, 3, H, W] in [0, 1]."""
        ...

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text encoder: a list of B prompts -> cond [B, 77, context_dim] ([B, 78, context_dim],
        packed, when ``pooled_dim`` > 0)."""
        ...


@runtime_checkable
class TrainableText(Protocol):
    """A back end whose text encoder can be trained (SINE's official code trains it with the UNet).

    Canonical text-encoder names are transformers' ``CLIPTextModel`` parameter names
    (``text_model.encoder.layers.0.self_attn.q_proj.weight``); a delta for them is saved with
    :data:`core.lora.TEXT_PREFIX`, the generic key ComfyUI's LoRA loader maps onto an SD 1.x CLIP.
    """

    def text_parameters(self) -> dict[str, torch.Tensor]:
        """The text encoder's parameters that may be adapted, under canonical names (shared: never
        change them in place)."""
        ...

    def text_adapted(self, weight_functions: Mapping[str, WeightFunction]
                     ) -> AbstractContextManager[Callable[[str], torch.Tensor]]:
        """Inside the block, ``encode(prompt)`` -> cond [1, 77, context_dim] computed with
        ``fn(W)`` for each named text weight, differentiable w.r.t. the functions' parameters."""
        ...


class DeltaFunction(nn.Module):
    """Weight function W -> W + strength * delta (a fixed, trained delta reshaped to W)."""

    def __init__(self, delta: torch.Tensor, strength: float = 1.0):
        super().__init__()
        self.register_buffer("delta", delta.detach().float())  # shared with the caller's tensor, not copied
        self.strength = float(strength)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.strength * self.delta).reshape(weight.shape).to(weight)


class ReplaceFunction(nn.Module):
    """Weight function W -> P: a trainable float32 copy P used in place of W (full fine-tuning)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.param = nn.Parameter(weight.detach().float().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.param.to(weight.dtype)


def denoised(model: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
             features: Features | None = None) -> torch.Tensor:
    """x0_hat(x_t) through the seam (Tweedie, :func:`core.diffusion.predict_x0`)."""
    a = model.alphas_cumprod.to(x_t.device)[t.long()]
    return predict_x0(x_t, model.eps(x_t, t, cond, features), a)


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Validate a seam image [B, 3, H, W] in [0, 1]; raise ValueError naming ``name``."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{name}: expected a tensor [B, 3, H, W], got {_describe(image)}")
    if image.shape[1] != 3:
        raise ValueError(
            f"{name}: expected 3 colour channels, got {image.shape[1]}"
            + (" (drop the alpha channel first)" if image.shape[1] == 4 else "")
        )
    if image.shape[0] == 0 or image.shape[2] == 0 or image.shape[3] == 0:
        raise ValueError(f"{name}: the image is empty (shape {tuple(image.shape)})")
    return image


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__
