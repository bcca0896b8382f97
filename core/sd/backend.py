"""The diffusers implementation of the seam (:class:`core.seam.LatentDiffusion`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion import sd_alphas_cumprod
from ..seam import check_image
from .tokenizer import tokenize


@dataclass
class DiffusersSD:
    """SD 1.x from diffusers/transformers modules, seen through the seam.

    ``unet`` is a diffusers ``UNet2DConditionModel``, ``vae`` an ``AutoencoderKL``,
    ``text_encoder`` a transformers ``CLIPTextModel`` and ``tokenizer`` a
    ``CLIPTokenizer``.  All modules are used as given (never modified).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    schedule: torch.Tensor = field(default_factory=sd_alphas_cumprod)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **extra) -> torch.Tensor:
        dt = self.dtype
        out = self.unet(x_t.to(dt), t.to(x_t.device), encoder_hidden_states=cond.to(dt), **extra).sample
        return out.to(x_t.dtype)

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image)
        vae_dtype = next(self.vae.parameters()).dtype
        x = (image.to(self.device, vae_dtype) * 2 - 1).clamp(-1, 1)
        return (self.vae.encode(x).latent_dist.mean * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(latent.to(self.device, vae_dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return self.text_encoder(ids)[0].float()
