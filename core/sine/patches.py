"""SINE's patch sampler for patch-based fine-tuning (paper §3.3 and §4 "Implementation details").

Mirrors ``SinImageHighResDataset`` in the official ``ldm/data/personalized.py`` (``zhang-zx/SINE``
at ``c0df950``; values from ``configs/stable-diffusion/v1-finetune_patch_picture.yaml``):

* ``__init__``: the source image is resized **bicubic to 1024 x 1024** (``high_resolution``), the
  aspect ratio not kept;
* ``_random_crop``: patch height and width (in latent cells, ``grid = 1024 // 8 = 128``) are drawn
  independently, ``int(grid * (u * (max_crop_frac - min_crop_frac) + min_crop_frac))`` with
  ``u ~ U[0, 1)``, ``min_crop_frac = 0.1``, ``max_crop_frac = 1.0`` (paper: "[0.1H, H] x [0.1W, W]";
  so 12..127 cells, 128 only by rounding), height first; the top-left cell is
  ``randrange(grid - size + 1)``, row first.  The crop is taken from the 1024 image in 8-pixel
  units (``latent_scale``) and resized bicubic to **512 x 512** (``size``);
* its box in the positional grid is ``[y, x, y + size_y, x + size_x]``, the same cells, which is
  ``(top, left, height, width) = (y, x, size_y, size_x)`` here (:class:`core.seam.Features`);
* ``__getitem__``: crop when ``random() < rec_prob`` (1.0 in the train set, so always), otherwise
  the whole 1024 image resized to 512 with box ``[0, 0, 128, 128]``.  ``whole_fraction`` here is
  ``1 - rec_prob`` (the official diffusers port uses 0.1).

Differences, by design: the draws come from a seeded :class:`torch.Generator` (never Python's or
torch's global RNG), and the resizes are PyTorch's antialiased bicubic on float images in [0, 1]
(the same a = -0.5 kernel as PIL's bicubic, without PIL's uint8 rounding between the two passes),
clamped to [0, 1].  Measured against PIL on a uniform-noise 500x300 image: mean abs difference
1.4e-3 (max 0.086, PIL's intermediate clipping) for the 1024 upscale, 1.2e-3 for a downscale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchConfig:
    """Patch sampling sizes; defaults are the official patch configs'.

    ``high_resolution``: side of the square the image is resized to (1024); ``size``: side of the
    returned crops (512, SD's training size); ``latent_scale``: pixels per grid cell (8, the VAE
    factor); ``min_crop_frac`` / ``max_crop_frac``: patch side range as fractions of the grid;
    ``whole_fraction``: probability of a whole-image sample instead of a crop (official train set:
    0).
    """

    high_resolution: int = 1024
    size: int = 512
    latent_scale: int = 8
    min_crop_frac: float = 0.1
    max_crop_frac: float = 1.0
    whole_fraction: float = 0.0

    def __post_init__(self):
        if self.high_resolution % self.latent_scale:
            raise ValueError(f"high_resolution {self.high_resolution} must be a multiple of latent_scale "
                             f"{self.latent_scale}")
        if not 0.0 < self.min_crop_frac <= self.max_crop_frac <= 1.0:
            raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {self.min_crop_frac}, "
                             f"{self.max_crop_frac}")
        if not 0.0 <= self.whole_fraction <= 1.0:
            raise ValueError(f"whole_fraction must lie in [0, 1], got {self.whole_fraction}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def grid(self) -> int:
        """Side of the positional grid in cells (official 1024 // 8 = 128 = ``init_size``)."""
        return self.high_resolution // self.latent_scale


def _bicubic(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(img, size, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)


class PatchSampler:
    """Random patches of one image and their boxes in the positional grid.

    ``image`` [3, H, W] or [1, 3, H, W] in [0, 1] is resized once to ``high_resolution`` squared.
    ``sampler(batch, generator)`` returns ``(crops [batch, 3, size, size] in [0, 1], boxes [batch, 4]``
    int64 ``(top, left, height, width)`` in grid cells), ready for
    ``Features(input_map=PositionalMap(), crop_box=boxes)`` on the crops' latents.
    """

    def __init__(self, image: torch.Tensor, config: PatchConfig | None = None):
        img = image.unsqueeze(0) if image.ndim == 3 else image
        if img.ndim != 4 or img.shape[0] != 1 or img.shape[1] != 3:
            raise ValueError(f"expected one RGB image [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
        self.config = config = config or PatchConfig()
        side = config.high_resolution
        self.image = _bicubic(img.float(), (side, side))  # [1, 3, 1024, 1024]

    def draw_box(self, generator: torch.Generator) -> tuple[int, int, int, int]:
        """One box (top, left, height, width) in grid cells, drawn as ``__getitem__`` / ``_random_crop`` do."""
        cfg, n = self.config, self.config.grid

        def u() -> float:
            return torch.rand((), generator=generator, dtype=torch.float64).item()

        if u() >= 1.0 - cfg.whole_fraction:  # official: crop iff random() < rec_prob = 1 - whole_fraction
            return 0, 0, n, n
        span = cfg.max_crop_frac - cfg.min_crop_frac
        hh = min(max(int(n * (u() * span + cfg.min_crop_frac)), 1), n)
        ww = min(max(int(n * (u() * span + cfg.min_crop_frac)), 1), n)
        top = int(torch.randint(0, n - hh + 1, (), generator=generator))
        left = int(torch.randint(0, n - ww + 1, (), generator=generator))
        return top, left, hh, ww

    def crop(self, box: tuple[int, int, int, int]) -> torch.Tensor:
        """The box's pixels (8-pixel units of the 1024 image) resized to ``size``: [1, 3, size, size]."""
        s, side = self.config.latent_scale, self.config.size
        top, left, hh, ww = box
        return _bicubic(self.image[:, :, top * s:(top + hh) * s, left * s:(left + ww) * s], (side, side))

    def __call__(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(generator, torch.Generator):
            raise TypeError("PatchSampler needs a seeded torch.Generator (the global RNG is never used)")
        boxes = [self.draw_box(generator) for _ in range(batch)]
        crops = torch.cat([self.crop(b) for b in boxes], dim=0)
        return crops, torch.tensor(boxes, dtype=torch.int64)
