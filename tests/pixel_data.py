"""Small real-image crops for pixel-DDPM tests, cut from scikit-image's bundled sample images.

No download: ``skimage.data.astronaut``, ``coffee``, ``chelsea``, ``rocket`` and
``immunohistochemistry`` ship inside the scikit-image package.  Each image is first
area-downsampled so that its shorter side is :data:`SHORT_SIDE` pixels; at that scale a
16x16 crop holds an eye, a cup rim or a rocket fin rather than flat texture.

Training and held-out crops never overlap: in every image the right-most
:data:`HELD_FRACTION` of the columns is reserved for held-out crops, and training crops
are cut only from the columns to its left.

    train, held = real_crops(size=16, n_train=48, n_held=16, seed=0)  # [48, 3, 16, 16], [16, 3, 16, 16]
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
SHORT_SIDE = 80  # px after downsampling
HELD_FRACTION = 0.3  # right-most share of each image's columns kept for held-out crops

INSTALL_HINT = "scikit-image is needed for the real-image test crops: pip install scikit-image"


def _skimage_data():
    try:
        import skimage.data as data
    except ImportError as e:  # pytest.importorskip("skimage") in the tests skips before this
        raise ImportError(INSTALL_HINT) from e
    return data


@lru_cache(maxsize=None)
def downsampled_image(name: str, short_side: int = SHORT_SIDE) -> torch.Tensor:
    """One bundled sample image, area-downsampled to ``short_side`` px: [3, h, w] float32 in [0, 1]."""
    if name not in IMAGES:
        raise ValueError(f"unknown sample image {name!r}; choose from {', '.join(IMAGES)}")
    array = getattr(_skimage_data(), name)()  # [H, W, 3] uint8
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255.0)  # [3, H, W]
    h, w = image.shape[1:]
    scale = short_side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image[None], size=size, mode="area")[0].clamp(0, 1).contiguous()  # [3, h, w]


def _split_column(width: int) -> int:
    """First column of the held-out strip of an image of the given width."""
    return width - round(width * HELD_FRACTION)


def _cut(images: list[torch.Tensor], n: int, size: int, held: bool, g: torch.Generator) -> torch.Tensor:
    """``n`` crops [n, 3, size, size], round-robin over ``images``, from each one's train or held-out region."""
    crops = [torch.empty(0, 3, size, size)] if n == 0 else []
    for i in range(n):
        image = images[i % len(images)]  # [3, h, w]
        h, w = image.shape[1:]
        split = _split_column(w)
        x_lo, x_hi = (split, w - size) if held else (0, split - size)
        if x_hi < x_lo or h < size:
            region = "held-out" if held else "training"
            raise ValueError(f"crop size {size} does not fit the {region} region of a {h}x{w} image; "
                             f"use a smaller size (at most {min(h, split, w - split)})")
        y = int(torch.randint(0, h - size + 1, (1,), generator=g))
        x = int(torch.randint(x_lo, x_hi + 1, (1,), generator=g))
        crops.append(image[:, y:y + size, x:x + size])
    return (torch.cat(crops) if n == 0 else torch.stack(crops)).contiguous()  # [n, 3, size, size]


def real_crops(size: int = 16, n_train: int = 48, n_held: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train, held_out) crops, float32 [N, 3, size, size] in [0, 1].

    Crops are taken round-robin from the five sample images at positions drawn from a
    generator seeded with ``seed``; training crops come from the left part of each image
    and held-out crops from its right-most :data:`HELD_FRACTION`, so no pixel is shared.
    Raises ImportError (with the install hint) when scikit-image is missing.
    """
    if size < 1 or n_train < 0 or n_held < 0:
        raise ValueError(f"need size >= 1 and non-negative counts, got size={size}, n_train={n_train}, "
                         f"n_held={n_held}")
    images = [downsampled_image(name) for name in IMAGES]
    g = torch.Generator().manual_seed(int(seed))
    train = _cut(images, n_train, size, held=False, g=g)
    held = _cut(images, n_held, size, held=True, g=g)
    return train, held
