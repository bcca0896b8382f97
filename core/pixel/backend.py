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

from dataclasses import dataclass

import torch

from ..views import ModuleDenoiser, ModuleViews


@dataclass
class DiffusersPixel(ModuleDenoiser):
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

    def _module_views(self) -> ModuleViews:
        return self._views

    @classmethod
    def load(cls, path, device=None, dtype=None) -> "DiffusersPixel":
        """From a local diffusers folder or single file (:func:`core.pixel.load_pixel_unet`)."""
        from .loader import load_pixel_unet

        unet, alphas = load_pixel_unet(path, device=device, dtype=dtype)
        return cls(unet, alphas)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    def _forward(self, x_t, t, cond, features) -> torch.Tensor:
        with self._views.features(features):
            out = self.unet(x_t.to(self.dtype), t.to(x_t.device)).sample
        return out.to(x_t.dtype)
