"""The diffusers implementation of the seam (:class:`core.seam.LatentDiffusion`): SD 1.x
(:class:`DiffusersSD`) and SDXL (:class:`DiffusersSDXL`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..diffusion import sd_alphas_cumprod
from ..lora import text_trainable
from ..seam import ViewSpec, WeightFunction, check_image, pack_cond, unpack_cond
from ..views import ModuleDenoiser, ModuleViews
from .keymap import unet_names
from .tokenizer import tokenize


@dataclass
class DiffusersSD(ModuleDenoiser):
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
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def pooled_dim(self) -> int:
        return 0

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def _module_views(self) -> ModuleViews:
        if not hasattr(self, "_views"):
            self._views = ModuleViews(self.unet, self.canonical_names(), self.unet.conv_in)
        return self._views

    def _forward(self, x_t, t, cond, features) -> torch.Tensor:
        if cond is None:
            raise ValueError("Stable Diffusion needs a text conditioning (cond)")
        dt = self.dtype
        with self._module_views().features(features):
            out = self.unet(x_t.to(dt), t.to(x_t.device), encoder_hidden_states=cond.to(dt)).sample
        return out.to(x_t.dtype)

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def canonical_names(self) -> dict[str, str]:
        """{canonical (original-layout) parameter name: diffusers parameter name}."""
        if not hasattr(self, "_canonical"):
            names = unet_names([n for n, _ in self.unet.named_parameters()], self.unet.config)
            self._canonical = {orig: diff for diff, orig in names.items()}
        return self._canonical

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

    def decode_differentiable(self, latent: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with autograd (losses on decoded images, e.g. the rectifier's CLIP term)."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode(latent.to(self.device, vae_dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        return self.text_encoder(ids)[0].float()

    # -- text encoder training (core.seam.TrainableText) ------------------------------------
    def text_names(self) -> dict[str, str]:
        """{canonical name (``text_model.``...): the module's own parameter path} (transformers 5
        drops the ``text_model.`` level from ``CLIPTextModel``'s parameter names)."""
        return {(n if n.startswith("text_model.") else "text_model." + n): n
                for n, _ in self.text_encoder.named_parameters()}

    def text_parameters(self) -> dict[str, torch.Tensor]:
        own = dict(self.text_encoder.named_parameters())
        return {c: own[n] for c, n in self.text_names().items()}

    @contextmanager
    def text_adapted(self, weight_functions: Mapping[str, WeightFunction]) -> Iterator[Callable[[str], torch.Tensor]]:
        """``encode(prompt)`` [1, 77, D] with the weight functions on the text encoder's weights
        (parametrizations removed afterwards; the stored weights are never written)."""
        unknown = sorted(set(weight_functions) - set(text_trainable(self.text_parameters(), "full")))
        if unknown:
            raise KeyError(f"not trainable text-encoder parameters: {unknown[:3]}")
        views = ModuleViews(self.text_encoder, self.text_names(), self.text_encoder)
        with views.install([ViewSpec(dict(weight_functions))]) as viewset, viewset.activate(1):

            def encode(prompt: str) -> torch.Tensor:
                ids = tokenize(self.tokenizer, [prompt]).to(self.device)
                return self.text_encoder(ids)[0].float()

            yield encode


def size_conditioning(h: int, w: int, batch: int, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning for an image of h x w pixels: [B, 6] = (original height, width,
    crop top, crop left, target height, width) = (h, w, 0, 0, h, w), the uncropped image at its
    own size (what diffusers' SDXL pipeline and ComfyUI's CLIPTextEncodeSDXL give by default)."""
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).expand(batch, 6)


@dataclass
class DiffusersSDXL(DiffusersSD):
    """SDXL from diffusers/transformers modules, seen through the seam.

    ``text_encoder`` is CLIP ViT-L (``CLIPTextModel``), ``text_encoder_2`` OpenCLIP ViT-bigG
    (``CLIPTextModelWithProjection``); ``tokenizer_2`` pads with token 0 as SDXL's does.  The
    conditioning is packed (:func:`core.seam.pack_cond`): the context is both encoders'
    penultimate hidden states side by side [B, 77, 768 + 1280], the pooled vector is the
    second encoder's projected end-of-text state [B, 1280].  The size conditioning each call
    needs is read from the latent: :func:`size_conditioning` at 8x its height and width.
    """

    text_encoder_2: Any = field(default=None, kw_only=True)
    tokenizer_2: Any = field(default=None, kw_only=True)

    @property
    def pooled_dim(self) -> int:
        return int(self.unet.config.projection_class_embeddings_input_dim
                   - 6 * self.unet.config.addition_time_embed_dim)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _forward(self, x_t, t, cond, features) -> torch.Tensor:
        if cond is None:
            raise ValueError("Stable Diffusion XL needs a text conditioning (cond)")
        context, pooled = unpack_cond(cond, self.pooled_dim)
        b, dt = x_t.shape[0], self.dtype
        added = {"text_embeds": pooled.to(dt).expand(b, -1) if pooled.shape[0] == 1 else pooled.to(dt),
                 "time_ids": size_conditioning(x_t.shape[-2] * self.vae_scale, x_t.shape[-1] * self.vae_scale,
                                               b, x_t.device).to(dt)}
        with self._module_views().features(features):
            out = self.unet(x_t.to(dt), t.to(x_t.device), encoder_hidden_states=context.to(dt),
                            added_cond_kwargs=added).sample
        return out.to(x_t.dtype)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = tokenize(self.tokenizer, prompts).to(self.device)
        ids_2 = tokenize(self.tokenizer_2, prompts).to(self.device)
        h_l = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # [B, 77, 768]
        out_g = self.text_encoder_2(ids_2, output_hidden_states=True)
        context = torch.cat([h_l, out_g.hidden_states[-2]], dim=-1).float()  # [B, 77, 2048]
        return pack_cond(context, out_g.text_embeds.float())  # [B, 78, 2048]

    # Training SDXL's two text encoders is not offered (yet): None tells core.seam.TrainableText's
    # isinstance check that this back end is not one, and the callers refuse with their own message.
    text_parameters = None
    text_adapted = None
