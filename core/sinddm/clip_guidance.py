"""Text guidance of SinDDM sampling with CLIP (paper Sec. 4, App. E), as the official code does it.

At each guided step the clean estimate x0_hat is pushed along the gradient of a CLIP
similarity between augmented views of x0_hat and augmented phrasings of the prompt:

* loss (the official Text2LIVE ``ClipExtractor.calculate_clip_loss``): n of the K template
  embeddings are drawn with replacement (n ~ U{1..K}); each image is seen through 16 views
  (view 1 the whole image, views 2-16 random crops of the same 60-100 % of each side), each
  view augmented on its own with torchvision's transforms in their order: horizontal flip
  (p 0.5), RandomAffine (+-15 degrees, shift up to 10 % rounded to whole pixels, p 0.8),
  RandomPerspective (each corner moved *inwards* by 0 .. int(0.4 * half the side) whole
  pixels, p 0.5), ColorJitter (brightness, contrast, saturation 0.9-1.1 and hue +-0.1, in a
  random order, p 0.7), grey (p 0.15); white fill; the image's loss is
  sum_j 1.2 (1 - mean_views cos(view, text_j)) / n, summed over images;
* templates: the official sets (:data:`T2L_TEMPLATES_HR` for the scales s >= 1,
  :data:`T2L_TEMPLATES_LR`, low-resolution wording, for s = 0 and for text in a region);
* fill mask (content mode): at the first guided step, m = pixels whose gradient energy
  ||g||_2 (over channels) exceeds its (1 - f) quantile, and the first gradient is soft
  thresholded (energy minus the quantile); m is kept and upsampled across scales;
* step (eq. 3 with App. E.1's momentum): x0 <- (1 - m) x0 + m ((1 - lambda) x0_prev +
  lambda x0); x0 <- clamp(x0 + eta * delta * g * m, -1, 1) with
  delta = ||x0 m|| / ||g m|| per sample;
* content mode: every scale but the coarsest, lambda = 0.2, the last 3 steps of the
  finest scale unguided; style mode: the finest scale only, prompt + " Style",
  strength 0.3 and the whole image (f = 1: the official quantile 0), lambda = 0.05.

Text in a region (:class:`CLIPRegionGuidance`, the official ``clip_roi``; paper Sec. 4,
"editing of local regions via text", Figs. 2 and S3): at the finest scale the pixels of a
user mask (the official code: a box) are optimised directly, 100 steps of
x <- clamp(x + eta * (||x m|| / ||g m||) * g m, -1, 1) with eta = 0.1 and g the gradient of
the CLIP score of the box's crop (the "lr" template set, as the official code), pasted back
through the mask; the last 3 denoising steps of the finest scale then blend the edit in.

Randomness (views, crops, augmentations, template choices): sample k of a run draws from
its own ``torch.Generator`` seeded ``seed + k`` (the official code draws one template
choice per step for the whole batch from the process's RNG), so guided sample k depends on
the seeds and k only, not on how many samples are drawn with it, and the process's random
state is never touched.

Where we differ from the official code: it feeds views of the image's own aspect (short
side 224, long side up to 320) to a CLIP with interpolated position embeddings; a stock
OpenCLIP model has a fixed input size, so views are resized to it (square) before they
are augmented.  Resizes are bilinear, anti-aliased when they shrink (the official
torchvision 0.14 resize is not; SinDDM's images are at most 50,000 pixels, so views are
mostly enlarged, where the two agree).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fit import ShouldStop, poll
from ..clip_model import CLIP_MEAN, CLIP_STD, OpenCLIP
from ..seeds import derive_seed
from .guidance import Guidance
from .pyramid import resize_to

# The official template sets of SinDDM's CLIP guidance, facts of the method: the prompt patterns of
# ``get_augmentations_template('hr')`` and ``('lr')`` in fallenshock/SinDDM's text2live_util/util.py
# (e7107d9), which SinDDM took from Text2LIVE (Bar-Tal, Ofri-Amar, Fridman, Kasten, Dekel, ECCV 2022;
# github.com/omerbt/Text2LIVE, MIT licence, Copyright (c) 2022 Omer Bar-Tal, Dolev Ofri-Amar, Rafail
# Fridman; SinDDM: MIT licence, Copyright (c) 2022 Vladimir Kulikov, Shahar Yadin, Matan Kleiner, Tomer
# Michaeli).  tests/data/sinddm_official_clip.json records them from the official file.
T2L_TEMPLATES_HR = (
    "photo of {}.", "high quality photo of {}.", "a photo of {}.", "the photo of {}.", "image of {}.",
    "an image of {}.", "high quality image of {}.", "a high quality image of {}.", "the {}.", "a {}.", "{}.",
    "{}", "{}!", "{}...",
)
T2L_TEMPLATES_LR = (
    "photo of {}.", "low quality photo of {}.", "low resolution photo of {}.", "low-res photo of {}.",
    "blurry photo of {}.", "pixelated photo of {}.", "a photo of {}.", "the photo of {}.", "image of {}.",
    "an image of {}.", "low quality image of {}.", "a low quality image of {}.", "low resolution image of {}.",
    "a low resolution image of {}.", "low-res image of {}.", "a low-res image of {}.", "blurry image of {}.",
    "a blurry image of {}.", "pixelated image of {}.", "a pixelated image of {}.", "the {}.", "a {}.", "{}.",
    "{}", "{}!", "{}...",
)


# --------------------------------------------------------------------------------------
# Augmentations (differentiable, torch only; torchvision's transforms as the official code uses them)
# --------------------------------------------------------------------------------------
N_VIEWS = 16  # official n_aug
CROP_MIN = 0.6  # official: crops keep U(0.6, 1) of each side
FLIP_P = 0.5
AFFINE_P, AFFINE_DEGREES, AFFINE_TRANSLATE = 0.8, 15.0, 0.1
PERSPECTIVE_P, PERSPECTIVE_DISTORTION = 0.5, 0.4
JITTER_P, JITTER_BCS, JITTER_HUE = 0.7, 0.1, 0.1
GREY_P = 0.15
FILL = 1.0  # official clip_affine_transform_fill = True: white
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class ViewAugmentation:
    """The random draws of one view's augmentations (None: that transform is skipped).

    ``affine`` = (angle in degrees, tx, ty whole pixels); ``perspective`` = the four corners'
    end points [(x, y)] top-left, top-right, bottom-right, bottom-left (start points are the
    image's corner pixels); ``jitter`` = (order of the four operations as indices into
    :data:`JITTER_OPS`, brightness, contrast, saturation, hue).
    """

    flip: bool = False
    affine: tuple[float, int, int] | None = None
    perspective: tuple[tuple[int, int], ...] | None = None
    jitter: tuple[tuple[int, ...], float, float, float, float] | None = None
    grey: bool = False


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(lo: int, hi: int, generator: torch.Generator) -> int:
    """Uniform integer in [lo, hi) (torch.randint's convention)."""
    return int(torch.randint(lo, hi, (1,), generator=generator))


def draw_augmentation(width: int, height: int, generator: torch.Generator) -> ViewAugmentation:
    """One view's draws, with the official probabilities and ranges (torchvision's ``get_params`` rules).

    RandomPerspective moves each corner inwards only: top-left x in [0, k_x], top-right x in
    [W - 1 - k_x, W - 1], and so on, with k = int(distortion * (side // 2)).
    """
    flip = _rand(generator) < FLIP_P
    affine = None
    if _rand(generator) < AFFINE_P:  # RandomApply: applied when p >= a uniform draw
        angle = -AFFINE_DEGREES + 2 * AFFINE_DEGREES * _rand(generator)
        mx, my = AFFINE_TRANSLATE * width, AFFINE_TRANSLATE * height
        affine = (angle, int(round(-mx + 2 * mx * _rand(generator))), int(round(-my + 2 * my * _rand(generator))))
    perspective = None
    if _rand(generator) < PERSPECTIVE_P:
        kx, ky = int(PERSPECTIVE_DISTORTION * (width // 2)), int(PERSPECTIVE_DISTORTION * (height // 2))
        left = lambda: _randint(0, kx + 1, generator)  # noqa: E731
        right = lambda: _randint(width - kx - 1, width, generator)  # noqa: E731
        top = lambda: _randint(0, ky + 1, generator)  # noqa: E731
        bottom = lambda: _randint(height - ky - 1, height, generator)  # noqa: E731
        perspective = ((left(), top()), (right(), top()), (right(), bottom()), (left(), bottom()))
    jitter = None
    if _rand(generator) < JITTER_P:
        order = tuple(int(i) for i in torch.randperm(4, generator=generator))
        b, c, sat = (1 - JITTER_BCS + 2 * JITTER_BCS * _rand(generator) for _ in range(3))
        jitter = (order, b, c, sat, -JITTER_HUE + 2 * JITTER_HUE * _rand(generator))
    grey = _rand(generator) < GREY_P
    return ViewAugmentation(flip, affine, perspective, jitter, grey)


def _sample_filled(x: torch.Tensor, grid: torch.Tensor, fill: float = FILL) -> torch.Tensor:
    """Bilinear sampling with ``fill`` outside, blended as torchvision does: the sample times the
    sampled coverage plus (1 - coverage) * fill."""
    ones = torch.ones_like(x[:, :1])
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, cover = out[:, :-1], out[:, -1:]
    return img * cover + (1 - cover) * fill


def affine_warp(x: torch.Tensor, angle: float, tx: int, ty: int, fill: float = FILL) -> torch.Tensor:
    """Rotate [B, C, H, W] by ``angle`` degrees about its centre and shift by (tx, ty) pixels, as
    ``torchvision.transforms.functional.affine`` (scale 1, no shear): output pixel p (pixel centres,
    measured from the image centre, x right, y down) shows input R(-angle) (p - t), R(a) the
    rotation [[cos a, -sin a], [sin a, cos a]]."""
    h, w = x.shape[-2:]
    xs = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2
    ys = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2
    py, px = torch.meshgrid(ys - ty, xs - tx, indexing="ij")
    a = -math.radians(angle)
    qx = math.cos(a) * px - math.sin(a) * py
    qy = math.sin(a) * px + math.cos(a) * py
    grid = torch.stack([qx / (w / 2), qy / (h / 2)], -1)[None].to(x.dtype).to(x.device)
    return _sample_filled(x, grid.expand(x.shape[0], -1, -1, -1), fill)


def perspective_coefficients(start, end) -> list[float]:
    """(a, b, c, d, e, f, g, h) of the homography taking ``end`` points to ``start`` points:
    (x, y) -> ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1)), solved in
    float64 from the four point pairs, then rounded to float32 (as torchvision)."""
    rows, rhs = [], []
    for (xe, ye), (xs, ys) in zip(end, start):
        rows.append([xe, ye, 1, 0, 0, 0, -xs * xe, -xs * ye])
        rows.append([0, 0, 0, xe, ye, 1, -ys * xe, -ys * ye])
        rhs += [xs, ys]
    sol = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64))
    return sol.float().tolist()


def perspective_warp(x: torch.Tensor, end, fill: float = FILL) -> torch.Tensor:
    """Warp [B, C, H, W] so that its corner pixels land on ``end`` (top-left, top-right,
    bottom-right, bottom-left), as ``torchvision.transforms.functional.perspective``: the
    homography from the corner pixels' indices, applied at output pixel centres (index + 0.5)."""
    h, w = x.shape[-2:]
    start = ((0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1))
    a, b, c, d, e, f, g, hh = perspective_coefficients(start, end)
    py, px = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    den = g * px + hh * py + 1
    grid = torch.stack([(a * px + b * py + c) / den / (w / 2) - 1, (d * px + e * py + f) / den / (h / 2) - 1], -1)
    return _sample_filled(x, grid[None].to(x.dtype).to(x.device).expand(x.shape[0], -1, -1, -1), fill)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma with torchvision's weights."""
    return GREY_WEIGHTS[0] * x[:, 0:1] + GREY_WEIGHTS[1] * x[:, 1:2] + GREY_WEIGHTS[2] * x[:, 2:3]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> (hue in [0, 1), saturation, value); hue from the largest channel,
    red before green before blue on ties, 0 for greys."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    sat = delta / torch.where(delta > 0, v, torch.ones_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(v == r, (g - b) / safe,
                      torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    return torch.stack([torch.remainder(hue / 6, 1.0), sat, v], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: the hue circle in six sectors of linear ramps."""
    h, s, v = x.unbind(1)
    h6 = h * 6
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = torch.remainder(sector, 6)
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    # (r, g, b) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    table = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    out = [torch.zeros_like(v) for _ in range(3)]
    for k, channels in enumerate(table):
        here = sector == k
        out = [torch.where(here, c, o) for c, o in zip(channels, out)]
    return torch.stack(out, 1)


def color_jitter(x: torch.Tensor, order, brightness: float, contrast: float, saturation: float,
                 hue: float) -> torch.Tensor:
    """torchvision's ColorJitter with drawn factors, operations in ``order``: brightness scales,
    contrast blends with the mean luma, saturation with the luma image (each clamped to [0, 1]),
    hue shifts the HSV hue by ``hue`` turns."""
    for op in order:
        if op == 0:
            x = (x * brightness).clamp(0, 1)
        elif op == 1:
            mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (contrast * x + (1 - contrast) * mean).clamp(0, 1)
        elif op == 2:
            x = (saturation * x + (1 - saturation) * _grey(x)).clamp(0, 1)
        else:
            hsv = rgb_to_hsv(x)
            hsv = torch.cat([torch.remainder(hsv[:, :1] + hue, 1.0), hsv[:, 1:]], 1)
            x = hsv_to_rgb(hsv)
    return x


def apply_augmentation(v: torch.Tensor, aug: ViewAugmentation) -> torch.Tensor:
    """One view [B, 3, S, S] in [0, 1] through the official transforms with the draws ``aug``, in order."""
    if aug.flip:
        v = v.flip(-1)
    if aug.affine is not None:
        v = affine_warp(v, *aug.affine)
    if aug.perspective is not None:
        v = perspective_warp(v, aug.perspective)
    if aug.jitter is not None:
        v = color_jitter(v, *aug.jitter)
    if aug.grey:
        v = _grey(v).expand_as(v)
    return v


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                         antialias=size[0] < x.shape[-2] or size[1] < x.shape[-1])


def augment_views(x: torch.Tensor, n_views: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1] -> [n_views, 3, size, size], CLIP-normalised (differentiable).

    View 1 is the whole image, the others random crops (same fraction U(0.6, 1) of each side, at a
    uniform position); each is resized to ``size`` and augmented with its own draws
    (:func:`draw_augmentation`).  Every random number comes from ``generator``, in a fixed order.
    """
    h, w = x.shape[-2:]
    views = [_resize(x, (size, size))]
    for _ in range(n_views - 1):
        u = CROP_MIN + (1 - CROP_MIN) * _rand(generator)
        ch, cw = max(1, int(h * u)), max(1, int(w * u))
        top, left = _randint(0, h - ch + 1, generator), _randint(0, w - cw + 1, generator)
        views.append(_resize(x[..., top : top + ch, left : left + cw], (size, size)))
    out = torch.cat([apply_augmentation(v, draw_augmentation(size, size, generator)) for v in views])
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=out.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=out.dtype).view(1, 3, 1, 1)
    return (out - mean) / std


def clip_loss(clip: OpenCLIP, x01: torch.Tensor, emb: torch.Tensor, n_views: int,
              generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """The official CLIP loss, summed over images: for image b, n ~ U{1..K} of the K template
    embeddings ``emb`` [K, D] (normalised) drawn with replacement, and
    sum_j 1.2 (1 - mean_views cos(view, emb_j)) / n over ``n_views`` augmented views.

    ``generator``: one per image of ``x01`` [B, 3, H, W] in [0, 1] (image b draws its templates and
    views from generator b), or a single one that all images draw from in turn.
    """
    gens = [generator] * x01.shape[0] if isinstance(generator, torch.Generator) else list(generator)
    if len(gens) != x01.shape[0]:
        raise ValueError(f"clip_loss: {len(gens)} generators for {x01.shape[0]} images")
    k = emb.shape[0]
    total = x01.new_zeros(())
    for b, gen in enumerate(gens):
        count = _randint(1, k + 1, gen)
        chosen = emb[torch.randint(0, k, (count,), generator=gen).to(emb.device)]  # [n, D]
        views = augment_views(x01[b : b + 1], n_views, clip.image_size, gen)
        img = F.normalize(clip.encode_image(views), dim=-1)  # [V, D]
        cos = img @ chosen.T  # [V, n]
        total = total + (1.2 * (1 - cos.mean(0))).sum() / count
    return total


def sample_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sample: sample k's draws come from seed + k (as its noise does)."""
    return [torch.Generator().manual_seed(derive_seed(seed, k)) for k in range(count)]


def _text_embeddings(clip: OpenCLIP, text: str, templates: Sequence[str], device) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(clip.encode_text([t.format(text) for t in templates], device), dim=-1)


# --------------------------------------------------------------------------------------
# The guidance
# --------------------------------------------------------------------------------------
class CLIPGuidance(Guidance):
    """Text guidance of content (``mode="content"``) or style (``mode="style"``)."""

    needs_ddpm = True

    def __init__(self, clip: OpenCLIP, text: str, mode: str = "content", strength: float | None = None,
                 fill_factor: float = 0.3, n_views: int = N_VIEWS, stop_steps: int = 3, seed: int = 0):
        if mode not in ("content", "style"):
            raise ValueError(f"mode must be 'content' or 'style', got {mode!r}")
        if not text or not text.strip():
            raise ValueError("text: the prompt is empty")
        self.clip, self.mode = clip, mode
        self.text = text.strip() + (" Style" if mode == "style" else "")
        self.strength = float(strength if strength is not None else 0.3)
        self.fill = 1.0 if mode == "style" else float(fill_factor)
        if not 0.0 < self.fill <= 1.0:
            raise ValueError(f"fill_factor must be in (0, 1], got {fill_factor}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        self.momentum = 0.05 if mode == "style" else 0.2
        self.n_views, self.stop_steps, self.seed = n_views, stop_steps, int(seed)

    def begin(self, sizes, count, device, input_scale=(1.0, 1.0)):
        super().begin(sizes, count, device, input_scale)
        self.gens = sample_generators(self.seed, count)
        self.clip.model.to(device)
        self.emb_hr = _text_embeddings(self.clip, self.text, T2L_TEMPLATES_HR, device)
        self.emb_lr = _text_embeddings(self.clip, self.text, T2L_TEMPLATES_LR, device)
        self.mask = None
        self.prev = None
        self.scores: list[float] = []

    def begin_scale(self, s, size):
        if self.mask is not None:
            self.mask = F.interpolate(self.mask, size=size, mode="bilinear", align_corners=False)
            self.prev = F.interpolate(self.prev, size=size, mode="bilinear", align_corners=False)

    def _active(self, s: int, t: int) -> bool:
        finest = len(self.sizes) - 1
        if self.mode == "style":
            return s == finest and t >= self.stop_steps
        return s >= 1 and (s < finest or t >= self.stop_steps)

    def loss(self, x01: torch.Tensor, s: int) -> torch.Tensor:
        """1.2 (1 - cos) averaged over views and chosen templates, summed over images (see :func:`clip_loss`)."""
        return clip_loss(self.clip, x01, self.emb_lr if s == 0 else self.emb_hr, self.n_views, self.gens)

    def apply(self, x0, s, t, sampler):
        if not self._active(s, t):
            return x0
        x0 = x0.clamp(-1, 1)
        if self.mask is not None:
            x0 = x0 * (1 - self.mask) + ((1 - self.momentum) * self.prev + self.momentum * x0) * self.mask
        with torch.enable_grad(), torch.inference_mode(False):
            x = x0.detach().clone().requires_grad_(True)
            score = -self.loss((x + 1) / 2, s)
            grad = torch.autograd.grad(score, x)[0]
        self.scores.append(float(score.detach()))
        if self.mask is None:
            grad, self.mask = thresholded_grad(grad, 1.0 - self.fill)
        norm_x = torch.linalg.vector_norm(x0 * self.mask, dim=(1, 2, 3), keepdim=True)
        norm_g = torch.linalg.vector_norm(grad * self.mask, dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        x0 = (x0 + self.strength * norm_x / norm_g * grad * self.mask).clamp(-1, 1)
        self.prev = x0.detach()
        return x0

    def end(self):
        self.clip.model.to("cpu")


class CLIPRegionGuidance(Guidance):
    """Text-guided editing inside a region (the official ``clip_roi``; paper Sec. 4, Figs. 2, S3).

    ``mask`` [1, 1, h, w] in [0, 1] marks the region on the output canvas (stretched to
    the output size if it differs).  Once per sample, at the finest scale, the pixels of
    the clean image inside the mask's bounding box are optimised for ``iterations`` CLIP
    steps on that crop (eq. 3 without fill mask or momentum: x <- clamp(x + eta delta g m,
    -1, 1), delta = ||x m|| / ||g m|| per image, eta = ``strength``, official 100 steps at
    0.1, "lr" templates) and pasted back through the mask; the rest is left as it is.
    ``denoise_steps`` denoising steps of the finest scale (official 3) follow the edit and
    blend it in:

    * when the finest scale starts at most ``denoise_steps`` steps from the end (the
      training image re-run for 3 steps, the official mode), the image entering the scale
      is edited before it is noised, exactly as the official code does;
    * otherwise (a random sample) the clean estimate x0_hat is edited at the step after
      which ``denoise_steps`` denoiser calls remain.

    Needs the stochastic DDPM posterior (``reblurring=False`` in the official code).
    """

    needs_ddpm = True

    def __init__(self, clip: OpenCLIP, text: str, mask: torch.Tensor, strength: float = 0.1, iterations: int = 100,
                 denoise_steps: int = 3, n_views: int = N_VIEWS, seed: int = 0):
        if not text or not text.strip():
            raise ValueError("text: the prompt is empty")
        if mask.ndim != 4 or mask.shape[:2] != (1, 1):
            raise ValueError(f"mask: expected one mask [1, 1, H, W], got {tuple(mask.shape)}")
        if not bool((mask > 0).any()):
            raise ValueError("mask: the region is empty (paint the region to edit white)")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if denoise_steps < 0:
            raise ValueError(f"denoise_steps must be at least 0, got {denoise_steps}")
        self.clip, self.text = clip, text.strip()
        self.mask = mask.float().clamp(0, 1)
        self.strength, self.iterations, self.denoise_steps = float(strength), int(iterations), int(denoise_steps)
        self.n_views, self.seed = n_views, int(seed)

    def begin(self, sizes, count, device, input_scale=(1.0, 1.0)):
        super().begin(sizes, count, device, input_scale)
        self.gens = sample_generators(self.seed, count)
        self.clip.model.to(device)
        self.emb = _text_embeddings(self.clip, self.text, T2L_TEMPLATES_LR, device)
        m = resize_to(self.mask, sizes[-1]).to(device)
        rows, cols = (m[0, 0] > 0).any(1).nonzero(), (m[0, 0] > 0).any(0).nonzero()
        if len(rows) == 0:
            raise ValueError("mask: the region vanishes at the output size")
        self.box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)  # y0, y1, x0, x1
        self.m_box = m[..., self.box[0] : self.box[1], self.box[2] : self.box[3]]
        self.edited = False
        self.scores: list[float] = []

    def edit(self, x: torch.Tensor, should_stop: ShouldStop | None = None) -> torch.Tensor:
        """The region of ``x`` [B, 3, H, W] in [-1, 1] after ``iterations`` CLIP steps; the rest unchanged.
        ``should_stop`` (the sampler's) is polled before every step (:func:`core.fit.poll`)."""
        y0, y1, x0, x1 = self.box
        m = self.m_box
        roi = x[..., y0:y1, x0:x1].clamp(-1, 1)
        for i in range(self.iterations):
            poll(should_stop, "CLIP region edit", i)
            with torch.enable_grad(), torch.inference_mode(False):
                r = roi.detach().clone().requires_grad_(True)
                score = -clip_loss(self.clip, (r + 1) / 2, self.emb, self.n_views, self.gens)
                grad = torch.autograd.grad(score, r)[0] * m
            self.scores.append(float(score.detach()))
            norm_x = torch.linalg.vector_norm(roi * m, dim=(1, 2, 3), keepdim=True)
            norm_g = torch.linalg.vector_norm(grad, dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            roi = (roi + self.strength * norm_x / norm_g * grad).clamp(-1, 1)
        out = x.clone()
        out[..., y0:y1, x0:x1] = m * roi + (1 - m) * x[..., y0:y1, x0:x1]
        return out

    def prepare(self, x_tilde, s, t_start, sampler):
        if s == len(self.sizes) - 1 and not self.edited and t_start <= self.denoise_steps:
            self.edited = True
            return self.edit(x_tilde, getattr(sampler, "should_stop", None))
        return x_tilde

    def apply(self, x0, s, t, sampler):
        if s == len(self.sizes) - 1 and not self.edited and t <= self.denoise_steps:
            self.edited = True
            return self.edit(x0, getattr(sampler, "should_stop", None))
        return x0

    def end(self):
        self.clip.model.to("cpu")


def thresholded_grad(grad: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-threshold a gradient by its per-pixel energy; returns (gradient, mask [B, 1, H, W]).

    e = ||g||_2 over channels; tau = per-sample ``quantile`` of e ("nearest"
    interpolation); mask = e > tau; g <- max(e - tau, 0) * g / e.
    """
    energy = torch.linalg.vector_norm(grad, dim=1)  # [B, H, W]
    tau = torch.quantile(energy.flatten(1), quantile, dim=1, interpolation="nearest")[:, None, None]
    excess = energy - tau
    mask = (excess > 0)[:, None].float()
    unit = torch.nan_to_num(grad / energy[:, None], nan=0.0, posinf=0.0, neginf=0.0)
    return excess.clamp_min(0)[:, None] * unit, mask
