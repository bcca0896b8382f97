"""The diffusers implementation of the seam (:class:`core.seam.LatentDiffusion`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..diffusion import sd_alphas_cumprod
from ..seam import WeightFunction, check_image
from .keymap import unet_names
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

    def canonical_names(self) -> dict[str, str]:
        """{canonical (original-layout) parameter name: diffusers parameter name}."""
        if not hasattr(self, "_canonical"):
            names = unet_names([n for n, _ in self.unet.named_parameters()], self.unet.config)
            self._canonical = {orig: diff for diff, orig in names.items()}
        return self._canonical

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        params = dict(self.unet.named_parameters())
        return {canon: params[d] for canon, d in self.canonical_names().items()}

    @contextmanager
    def adapted(self, weight_functions: Mapping[str, WeightFunction],
                gradient_checkpointing: bool = False) -> Iterator["DiffusersSD"]:
        """Registers each function as a ``torch.nn.utils.parametrize`` parametrization of its
        weight for the duration of the block (so it also applies when gradient
        checkpointing recomputes a block) and removes them afterwards, restoring the
        original parameters untouched.  The view is this object itself: inside the block
        every use of this model is adapted."""
        names = self.canonical_names()
        unknown = sorted(set(weight_functions) - set(names))
        if unknown:
            raise KeyError(f"no such UNet parameters: {unknown[:3]}")
        done: list[tuple[nn.Module, str]] = []
        hooks = []
        was_ckpt = bool(getattr(self.unet, "is_gradient_checkpointing", False))
        try:
            for canon, fn in weight_functions.items():
                path, leaf = names[canon].rsplit(".", 1)
                module = self.unet.get_submodule(path)
                if hasattr(fn, "output_delta") and leaf == "weight":
                    hooks.append(module.register_forward_hook(_output_hook(fn)))
                    continue
                parametrize.register_parametrization(module, leaf, fn if isinstance(fn, nn.Module) else _Fn(fn),
                                                     unsafe=True)
                done.append((module, leaf))
            if gradient_checkpointing and hasattr(self.unet, "enable_gradient_checkpointing"):
                self.unet.enable_gradient_checkpointing()
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            for module, leaf in reversed(done):
                parametrize.remove_parametrizations(module, leaf, leave_parametrized=False)
            if gradient_checkpointing and not was_ckpt and hasattr(self.unet, "disable_gradient_checkpointing"):
                self.unet.disable_gradient_checkpointing()

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


class _Fn(nn.Module):
    """Wraps a plain callable so that it can be registered as a parametrization."""

    def __init__(self, fn: WeightFunction):
        super().__init__()
        self.fn = fn

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.fn(weight)


def _output_hook(fn):
    def hook(module, args, output):
        return output + fn.output_delta(module, args[0])

    return hook
