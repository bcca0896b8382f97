"""The pixel back end of the seam: a diffusers ``UNet2DModel`` DDPM as a :class:`core.seam.Denoiser`.

The public 256x256 DDPMs (CelebA-HQ, church, bedroom) are unconditional epsilon
predictors on images in [-1, 1] with a linear beta schedule; there is no VAE and no
text, so ``cond`` is ignored (None).  Views and features work as on the SD back end
(:mod:`core.views`): the first input block is ``conv_in``, parameter names are
diffusers' own (the canonical names of a pixel model).

    model = DiffusersPixel.load("ddpm-church-256")
    with model.views(ViewSpec(modulates=names)) as (base, modulated):
        e0 = base.eps(x, t)                                     # unmodulated pass (P_t)
        e1 = modulated.eps(x, t, features=Features(modulation=delta_fns))
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..seam import Features, ViewSpec, WeightFunction
from ..views import ModuleViews, View, view_tuple


@dataclass
class DiffusersPixel:
    """An unconditional pixel-space epsilon-prediction DDPM (diffusers ``UNet2DModel``)."""

    unet: torch.nn.Module
    schedule: torch.Tensor  # alpha_bar_t, float64 [T]

    def __post_init__(self):
        cfg = self.unet.config
        if int(cfg.out_channels) != int(cfg.in_channels):
            raise ValueError(f"this UNet2DModel predicts {cfg.out_channels} channels from {cfg.in_channels} (learned "
                             "variance or another parameterisation); only epsilon-prediction DDPMs are supported")
        names = [n for n, _ in self.unet.named_parameters()]
        self._views = ModuleViews(self.unet, {n: n for n in names}, self.unet.conv_in)

    @classmethod
    def load(cls, path, device=None, dtype=None) -> "DiffusersPixel":
        """From a local diffusers folder or single file (:func:`core.pixel.load_pixel_unet`)."""
        from .loader import load_pixel_unet

        unet, alphas = load_pixel_unet(path, device=device, dtype=dtype)
        return cls(unet, alphas)

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
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
            features: Features | None = None) -> torch.Tensor:
        if features is not None and features.modulation:
            raise ValueError("a per-call modulation needs a view: use model.views(ViewSpec(modulates=...))")
        return self._forward(x_t, t, cond, features)

    def _forward(self, x_t, t, cond, features) -> torch.Tensor:
        with self._views.features(features):
            out = self.unet(x_t.to(self.dtype), t.to(x_t.device)).sample
        return out.to(x_t.dtype)

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        return self._views.parameters()

    @contextmanager
    def views(self, *specs: ViewSpec, gradient_checkpointing: bool = False,
              differentiable: bool = False) -> Iterator[tuple[View, ...]]:
        with self._views.install(specs, gradient_checkpointing) as viewset:
            yield view_tuple(self, viewset, self._forward)

    @contextmanager
    def adapted(self, weight_functions: Mapping[str, WeightFunction],
                gradient_checkpointing: bool = False) -> Iterator[View]:
        with self.views(ViewSpec(dict(weight_functions)), gradient_checkpointing=gradient_checkpointing) as (_, v):
            with v.activated():
                yield v
