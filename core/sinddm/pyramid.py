"""The SinDDM image pyramid: sizes, scale factor, blurry references and per-scale errors.

Follows the official code's rules (``SinDDM/functions.py:create_img_scales``), which
differ in places from the paper's text:

* the image is capped at 50,000 pixels: target size (int(W/c), int(H/c)) with
  c = sqrt(W H / 50000) when c > 1 (truncation);
* the coarsest short side is d0 = round(sqrt(3110 * short / long)) clamped to [42, 55]
  (3110 px makes the 35x35 receptive field cover ~40% of scale 0), the number of scales
  is N = round(ln(short / d0) / ln(1.411)) + 1, and r is then *recomputed* as
  (short / d0)^(1 / (N - 1));
* scale i has size round(W / r^(N-1-i)) x round(H / r^(N-1-i)) (float64, round half to
  even) and is one Lanczos resize of the *input* image; the blurry reference of scale
  s >= 1 is scale s-1 upsampled with (PIL) bilinear interpolation (paper eq. 1's x~^s).

Per-scale error L_s, which sets the start steps T[s] and the blur weights gamma (see
:mod:`core.sinddm.schedule`).  The official code computes
``np.linalg.norm(np.subtract(A, B)) / A.size`` on two uint8 images: the subtraction
wraps modulo 256, so every negative difference d becomes 256 + d.  That wrap is
load-bearing: it makes L_s ~ 160 / sqrt(H W 3), which gives start steps
T = [100, 55, 43, 33, 23] for a 250x200 image, while any float error gives
T ~ [100, 3, 2, 1, 0] (no noise is re-injected between scales and the finest scale
runs no denoising step at all).  All published SinDDM results come from the wrapped
error, so the pack reproduces it exactly ("wrapped", the default); "float" is
available for experiments (RMSE on [-1, 1] images times ``float_factor``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..images import tensor_to_pil

MAX_PIXELS = 50_000
AREA_SCALE_0 = 3110
MIN_SIDE_0, MAX_SIDE_0 = 42, 55
SCALE_FACTOR_SEED = 1.411
MIN_INPUT_SIDE = 32


@dataclass(frozen=True)
class PyramidSpec:
    """Geometry and errors of a pyramid; what a saved model records in its metadata."""

    sizes: tuple[tuple[int, int], ...]  # (H, W) per scale, coarsest first
    scale_factor: float  # r
    errors: tuple[float, ...]  # L_s for s = 1..N-1
    error_kind: str = "wrapped"
    # (H, W) of the image given to training, before the 50,000-pixel cap; None in files saved before it was
    # recorded (then taken as the finest scale's size).  Region guidance maps targets, masks and coordinates
    # given in this image's pixels into the pyramid's.
    input_size: tuple[int, int] | None = None

    @property
    def n_scales(self) -> int:
        return len(self.sizes)

    def to_dict(self) -> dict:
        return {"sizes": [list(s) for s in self.sizes], "scale_factor": self.scale_factor,
                "errors": list(self.errors), "error_kind": self.error_kind,
                "input_size": list(self.input_size) if self.input_size is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "PyramidSpec":
        size = d.get("input_size")
        return cls(tuple(tuple(int(v) for v in s) for s in d["sizes"]), float(d["scale_factor"]),
                   tuple(float(e) for e in d["errors"]), d.get("error_kind", "wrapped"),
                   (int(size[0]), int(size[1])) if size is not None else None)


@dataclass
class Pyramid:
    """The training pyramid: x^s and x~^s as float tensors [1, 3, H_s, W_s] in [-1, 1]."""

    spec: PyramidSpec
    images: list[torch.Tensor]  # x^s, s = 0..N-1
    blurry: list[torch.Tensor] = field(default_factory=list)  # x~^s; blurry[0] is x^0 (no blur at s = 0)

    def uint8(self, s: int) -> torch.Tensor:
        """Scale s as uint8 [3, H, W] (what is saved with a model)."""
        return from_unit(self.images[s])[0]


def capped_size(width: int, height: int, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(W, H) after the official pixel cap (truncation), unchanged below the cap."""
    c = np.sqrt(width * height / max_pixels)
    if c > 1:
        return int(width / c), int(height / c)
    return width, height


def scale_geometry(width: int, height: int) -> tuple[int, float]:
    """(N, r) for an image of size (W, H) already within the pixel cap."""
    short, long = min(width, height), max(width, height)
    d0 = int(round(np.sqrt(AREA_SCALE_0 * short / long)))
    d0 = min(max(d0, MIN_SIDE_0), MAX_SIDE_0)
    n = int(round(np.log(short / d0) / np.log(SCALE_FACTOR_SEED)) + 1)
    n = max(n, 1)
    r = float(np.exp(np.log(short / d0) / (n - 1))) if n > 1 else 1.0
    return n, r


def scale_sizes(width: int, height: int, n: int, r: float) -> tuple[tuple[int, int], ...]:
    """(H, W) of every scale, coarsest first; the finest is (height, width)."""
    out = []
    for i in range(n):
        k = np.power(r, n - i - 1)
        out.append((int(round(height / k)), int(round(width / k))))
    return tuple(out)


def wrapped_error(a: np.ndarray, b: np.ndarray) -> float:
    """The official per-scale error: ||(a - b) mod 256||_2 / numel on uint8 arrays (see module doc)."""
    d = np.subtract(a.astype(np.uint8), b.astype(np.uint8))  # uint8 arithmetic: wraps modulo 256
    return float(np.linalg.norm(d.astype(np.float64)) / d.size)


def float_error(a: np.ndarray, b: np.ndarray, factor: float = 1.0) -> float:
    """RMSE between the two images mapped to [-1, 1], times ``factor``."""
    da = a.astype(np.float64) / 127.5 - 1
    db = b.astype(np.float64) / 127.5 - 1
    return float(factor * np.sqrt(np.mean((da - db) ** 2)))


def to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, 3, H, W] (round to nearest)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def build_pyramid(image: Image.Image | torch.Tensor, error_kind: str = "wrapped", float_factor: float = 1.0,
                  max_pixels: int = MAX_PIXELS) -> Pyramid:
    """Build the training pyramid of an RGB image (PIL, or a float tensor [3, H, W] in [0, 1])."""
    if isinstance(image, torch.Tensor):
        pil = tensor_to_pil(image[0] if image.ndim == 4 else image)
    else:
        pil = image.convert("RGB")
    w0, h0 = pil.size
    if min(w0, h0) < MIN_INPUT_SIDE:
        raise ValueError(f"image: {w0}x{h0} is too small; SinDDM needs at least {MIN_INPUT_SIDE} px on each side")
    w, h = capped_size(w0, h0, max_pixels)
    n, r = scale_geometry(w, h)
    sizes = scale_sizes(w, h, n, r)
    scales = [np.asarray(pil.resize((sw, sh), Image.LANCZOS)) for sh, sw in sizes]
    blurry = [scales[0]]
    errors = []
    for s in range(1, n):
        sh, sw = sizes[s]
        up = np.asarray(Image.fromarray(scales[s - 1]).resize((sw, sh), Image.BILINEAR))
        blurry.append(up)
        if error_kind == "wrapped":
            errors.append(wrapped_error(scales[s], up))
        elif error_kind == "float":
            errors.append(float_error(scales[s], up, float_factor))
        else:
            raise ValueError(f"error_kind must be 'wrapped' or 'float', got {error_kind!r}")
    spec = PyramidSpec(sizes, r, tuple(errors), error_kind, (h0, w0))
    return Pyramid(spec, [to_unit(a) for a in scales], [to_unit(a) for a in blurry])


def pyramid_from_scales(spec: PyramidSpec, scales_uint8: list[torch.Tensor]) -> Pyramid:
    """Rebuild a Pyramid from saved uint8 scales [3, H, W] (the blurry references are recomputed)."""
    arrays = [s.permute(1, 2, 0).cpu().numpy() for s in scales_uint8]
    blurry = [arrays[0]]
    for s in range(1, spec.n_scales):
        sh, sw = spec.sizes[s]
        blurry.append(np.asarray(Image.fromarray(arrays[s - 1]).resize((sw, sh), Image.BILINEAR)))
    return Pyramid(spec, [to_unit(a) for a in arrays], [to_unit(a) for a in blurry])


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sampling-time resize between scales: bilinear, align_corners=False (official sampler)."""
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anti-aliased resize of a guidance image or mask to a scale's size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)
