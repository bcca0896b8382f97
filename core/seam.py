"""The model-agnostic seam: what every Stable-Diffusion-based method sees of a model.

Imagic, SINE and LayerDiffusion need the same five things from a latent diffusion
model, and nothing more.  They are collected in :class:`LatentDiffusion`, a Protocol,
so that the maths in ``core`` runs unchanged on two back ends:

* :class:`core.sd.backend.DiffusersSD` (diffusers modules, used by the standalone API,
  the CLI and the tests), and
* ``nodes.comfy_bridge.ComfySD`` (ComfyUI's MODEL, CLIP and VAE objects).

Conventions, identical for both back ends:

* images are float tensors [B, 3, H, W] in [0, 1];
* latents are *model-space* latents [B, 4, H/8, W/8], i.e. the VAE's output already
  multiplied by its scaling factor (0.18215 for SD 1.x), which is what the denoiser
  is trained on;
* ``t`` is the discrete DDPM timestep, an integer tensor [B] in 0..T-1;
* ``cond`` is the text encoder's last hidden state [B, 77, 768] for SD 1.x;
* ``eps`` returns the epsilon prediction in the variance-preserving parameterisation:
  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .diffusion import predict_x0


@runtime_checkable
class LatentDiffusion(Protocol):
    """A text-conditioned epsilon-prediction latent diffusion model (SD 1.x family)."""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t of the training schedule, float64 [T] on the CPU."""
        ...

    @property
    def device(self) -> torch.device:
        """Where :meth:`eps` runs and where its inputs should live."""
        ...

    @property
    def context_dim(self) -> int:
        """Width of the text-encoder output the denoiser cross-attends to (768 for SD 1.x)."""
        ...

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **extra) -> torch.Tensor:
        """epsilon_theta(x_t, t, cond): [B, 4, h, w] -> [B, 4, h, w]."""
        ...

    def trainable_module(self) -> torch.nn.Module:
        """The denoiser network a fine-tuner attaches its adapters or gradients to.

        Shared with every other user of the model: a method must never change its
        parameters in place (train a delta, or a copy).
        """
        ...

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        """The denoiser's parameters under their *canonical* names: the original SD layout
        without the ``model.diffusion_model.`` prefix (e.g.
        ``input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight``), whatever the back end."""
        ...

    def adapted(self, weight_functions: Mapping[str, WeightFunction],
                gradient_checkpointing: bool = False) -> AbstractContextManager["LatentDiffusion"]:
        """A context in which a view of the model computes with ``fn(W)`` in place of each
        named parameter W (canonical names), differentiably: LoRA adapters, trainable
        copies (full fine-tuning) and weight modulations all plug in here.  The base
        weights are never modified; the view is valid inside the ``with`` block only.
        An empty mapping still gives a view that autograd can differentiate through
        (e.g. w.r.t. ``cond``), which a back end may need to arrange.

        A function with an ``output_delta(module, x)`` method (a LoRA) may instead be
        applied to the layer's output, ``y + output_delta(module, x)``: the same result
        without a full-size weight or weight gradient.  Both back ends do so."""
        ...

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """VAE encode: image [B, 3, H, W] in [0, 1] -> model-space latent (posterior mean)."""
        ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode: model-space latent -> image [B, 3, H, W] in [0, 1]."""
        ...

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text encoder: a list of B prompts -> cond [B, 77, context_dim]."""
        ...


WeightFunction = Callable[[torch.Tensor], torch.Tensor]


class DeltaFunction(nn.Module):
    """Weight function W -> W + delta (a fixed, trained delta reshaped to W)."""

    def __init__(self, delta: torch.Tensor, strength: float = 1.0):
        super().__init__()
        self.register_buffer("delta", delta.detach().float().clone())
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


def denoised(model: LatentDiffusion, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """x0_hat(x_t) through the seam (Tweedie, :func:`core.diffusion.predict_x0`)."""
    a = model.alphas_cumprod.to(x_t.device)[t.long()]
    return predict_x0(x_t, model.eps(x_t, t, cond), a)


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
