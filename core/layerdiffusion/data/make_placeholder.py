"""Draw ``table_by_the_sea_512.png``, the placeholder reference background of the
``layerdiffusion_reference_background`` workflow: a wooden table top in front of the sea under a
cloudy sky, with nothing standing on it (a reference background must hold no object: its object
mask is all black).

    python core/layerdiffusion/data/make_placeholder.py     # rewrites the PNG next to this file

Procedural (numpy value noise and sines from a fixed seed, PIL only to resize noise and save), so
the picture is this project's own work under its licence (MIT); nothing is taken from a photo.
tests/test_layerdiffusion_nodes.py checks that the bundled file is what this script draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 512
SEED = 19
HORIZON = 0.40  # of the height: where sky meets sea
TABLE = 0.63  # where the table's far edge cuts the sea
OUT = Path(__file__).with_name("table_by_the_sea_512.png")


def value_noise(rng: np.random.RandomState, size: int, octaves: tuple[int, ...], stretch: int = 1) -> np.ndarray:
    """Smooth noise in [0, 1], [size, size]: random grids of the given cell counts (``stretch`` times fewer
    across than down: streaks along x), resized bicubically."""
    total = np.zeros((size, size), np.float32)
    weight = 0.0
    for i, cells in enumerate(octaves):
        grid = rng.rand(cells, max(2, cells // stretch)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.BICUBIC), np.float32)
        w = 0.5 ** i
        total += w * up
        weight += w
    total /= weight
    return (total - total.min()) / (total.max() - total.min())


def draw(size: int = SIZE, seed: int = SEED) -> np.ndarray:
    """The picture as uint8 [size, size, 3]."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size  # [0, 1) down and across
    img = np.zeros((size, size, 3), np.float32)

    # sky: deep blue at the top to pale near the horizon, soft clouds
    s = np.clip(y / HORIZON, 0, 1)[..., None]
    sky = (1 - s) * np.array([0.30, 0.50, 0.80]) + s * np.array([0.78, 0.86, 0.93])
    clouds = value_noise(rng, size, (4, 8, 16, 32))
    c = np.clip((clouds - 0.55) * 3.0, 0, 1)[..., None] * (0.3 + 0.7 * s)
    sky = sky * (1 - 0.8 * c) + 0.8 * c * np.array([0.97, 0.97, 0.98])

    # sea: darker toward the viewer, horizontal ripples that get finer toward the horizon, glints
    d = np.clip((y - HORIZON) / (1 - HORIZON), 1e-3, 1)  # 0 at the horizon
    ripple_noise = value_noise(rng, size, (8, 32, 64))
    phase = 6.0 / (d + 0.05) + 3.0 * ripple_noise
    ripples = 0.5 + 0.5 * np.sin(phase * 2.0 + 8.0 * x * (0.2 + ripple_noise))
    sea = (1 - d[..., None]) * np.array([0.45, 0.62, 0.72]) + d[..., None] * np.array([0.10, 0.32, 0.45])
    sea = sea * (0.88 + 0.16 * ripples[..., None])
    glint = np.clip(ripples - 0.93, 0, 1) * 10 * np.exp(-((x - 0.62) / 0.18) ** 2) * (1 - d)
    sea = sea + glint[..., None] * 0.5

    # table top: planks parallel to the edge, wider toward the viewer (perspective), grain and seams
    t = np.clip((y - TABLE) / (1 - TABLE), 0, 1)  # 0 at the far edge
    depth = 1.0 / (0.35 + 1.65 * t)  # shrinks toward the viewer
    plank = (1.0 / depth) * 2.2  # plank coordinate: equal steps = equal planks on the table
    seam = np.abs(plank - np.round(plank))
    index = np.floor(plank + 0.5)
    grain_noise = value_noise(rng, size, (32, 96, 192), stretch=16)  # long streaks along the planks
    tone = 0.85 + 0.15 * np.sin(index * 12.9898) ** 2  # each plank its own shade
    grain = 0.5 + 0.5 * np.sin(9.0 * plank + 10.0 * grain_noise + index * 3.1)
    wood = np.array([0.55, 0.36, 0.20]) * (tone * (0.82 + 0.18 * grain))[..., None]
    wood = wood * (0.75 + 0.25 * t)[..., None]  # light falls off toward the far edge
    wood = np.where((seam < 0.035 * (0.6 + t))[..., None], wood * 0.45, wood)
    edge = np.clip(1 - np.abs(y - TABLE) * size / 3.0, 0, 1)[..., None]  # a darker lip on the far edge

    img = np.where((y < HORIZON)[..., None], sky, sea)
    img = np.where((y >= TABLE)[..., None], wood, img)
    img = img * (1 - 0.5 * edge)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def main() -> None:
    Image.fromarray(draw(), "RGB").save(OUT, optimize=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
