"""Text guidance of SinDDM sampling with CLIP (paper Sec. 4, App. E).

At each guided step the clean estimate x0_hat is pushed along the gradient of a CLIP
similarity between augmented views of x0_hat and augmented phrasings of the prompt:

* loss: 1.2 (1 - cos) between the image embedding of each of 16 views (view 1 the whole
  image, views 2-16 random crops of 60-100 % of each side; flips, small affine and
  perspective warps with white fill, colour jitter, grey) and each of n text
  embeddings drawn with replacement from the template set (n ~ U{1..K}), averaged over
  views, summed over images, divided by n;
* fill mask (content mode): at the first guided step, m = pixels whose gradient energy
  ||g||_2 (over channels) exceeds its (1 - f) quantile, and the first gradient is soft
  thresholded (energy minus the quantile); m is kept and upsampled across scales;
* step (eq. 3 with App. E.1's momentum): x0 <- (1 - m) x0 + m ((1 - lambda) x0_prev +
  lambda x0); x0 <- clamp(x0 + eta * delta * g * m, -1, 1) with
  delta = ||x0 m|| / ||g m|| per sample;
* content mode: every scale but the coarsest, lambda = 0.2, the last 3 steps of the
  finest scale unguided; style mode: the finest scale only, prompt + " Style",
  strength 0.3 and the whole image (f = 1), lambda = 0.05.

Text in a region (:class:`CLIPRegionGuidance`, the official ``clip_roi``; paper Sec. 4,
"editing of local regions via text", Figs. 2 and S3): at the finest scale the pixels of a
user mask (the official code: a box) are optimised directly, 100 steps of
x <- clamp(x + eta * (||x m|| / ||g m||) * g m, -1, 1) with eta = 0.1 and g the gradient of
the CLIP score of the box's crop (the "lr" template set, as the official code), pasted back
through the mask; the last 3 denoising steps of the finest scale then blend the edit in.

Randomness (views, crops, template choices) comes from one ``torch.Generator`` seeded by
the guidance's seed, so a guided sample depends on its seeds only and the process's
random state is never touched.

The official code feeds non-square 224 x 280 views to a CLIP with interpolated position
embeddings; a stock OpenCLIP model has a fixed input size, so views are resized to it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fit import ShouldStop, poll
from .guidance import Guidance
from .model import private_rng
from .pyramid import resize_to

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Our own phrasings, in the spirit of the official template sets: sharp ("hr") for the
# finer scales, blurry/low-resolution ("lr") for the coarsest.
TEMPLATES_HR = [
    "{}.", "a photo of {}.", "a picture of {}.", "an image of {}.", "a high quality photo of {}.",
    "a detailed photo of {}.", "a sharp photo of {}.", "a beautiful photo of {}.", "a close-up photo of {}.",
    "a good photo of {}.", "a rendering of {}.", "a photograph showing {}.", "a clear picture of {}.",
    "a nice image of {}.",
]
TEMPLATES_LR = [
    "a blurry photo of {}.", "a low resolution photo of {}.", "a pixelated photo of {}.", "a blurred image of {}.",
    "a jpeg-compressed photo of {}.", "a low quality photo of {}.", "a small photo of {}.", "a tiny picture of {}.",
    "a downsampled image of {}.", "a fuzzy photo of {}.", "an out of focus photo of {}.", "a grainy photo of {}.",
    "a low resolution image of {}.", "a blurry picture of {}.", "a coarse image of {}.", "a soft-focus photo of {}.",
    "a thumbnail of {}.", "a pixelated image of {}.", "a washed-out photo of {}.", "a smeared photo of {}.",
    "a low-detail picture of {}.", "a hazy photo of {}.", "a very small image of {}.", "a rough sketch of {}.",
    "a blurred picture of {}.", "a low resolution picture of {}.",
]


@dataclass
class OpenCLIP:
    """An OpenCLIP model with its tokenizer (the SIE_OPEN_CLIP object)."""

    model: torch.nn.Module
    tokenizer: object
    arch: str
    image_size: int = 224

    def encode_text(self, texts: list[str], device) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] already normalised."""
        return self.model.encode_image(images).float()


def load_open_clip(path: str | os.PathLike, arch: str = "ViT-B-32", device="cpu") -> OpenCLIP:
    """Build OpenCLIP architecture ``arch`` and load its weights from a local file.

    safetensors files load directly; .bin/.pt/.pth checkpoints (OpenCLIP's release
    format) are read with ``torch.load(weights_only=True)``, which refuses arbitrary
    pickled objects.  Nothing is downloaded.
    """
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint not found: {path}")
    if arch not in open_clip.list_models():
        raise ValueError(f"arch: unknown OpenCLIP architecture {arch!r} (see open_clip.list_models())")
    with private_rng():  # the random initial weights are replaced below; leave the process RNG alone
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path.name} does not match OpenCLIP architecture {arch}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return OpenCLIP(model, open_clip.get_tokenizer(arch), arch, size)


# --------------------------------------------------------------------------------------
# Augmentations (differentiable, torch only)
# --------------------------------------------------------------------------------------
def _affine_grid(b: int, angle_deg: torch.Tensor, translate: torch.Tensor, device) -> torch.Tensor:
    a = angle_deg * math.pi / 180
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = translate
    return theta


def _warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample with white fill outside the image."""
    out = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + 1


def _perspective_grid(jitter: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A perspective-like warp: corner offsets ``jitter`` [b, 4, 2] blended bilinearly over the image."""
    device = jitter.device
    ys, xs = torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    u, v = (gx + 1) / 2, (gy + 1) / 2  # bilinear blend of the four corner offsets
    weights = torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v])  # [4, h, w]
    offset = torch.einsum("khw,bkc->bhwc", weights, jitter)
    return torch.stack([gx, gy], -1)[None] + offset


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def augment_views(x: torch.Tensor, n_views: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1] -> [n_views, 3, size, size], CLIP-normalised (differentiable).

    Every random number is drawn from ``generator`` (a CPU ``torch.Generator``), in a fixed
    order, so the views depend on its seed only.
    """
    h, w = x.shape[-2:]
    views = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)]
    for _ in range(n_views - 1):
        u = float(_uniform(1, 0.6, 1.0, generator))
        ch, cw = max(1, int(h * u)), max(1, int(w * u))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        crop = x[..., top : top + ch, left : left + cw]
        views.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    v = torch.cat(views)  # [n, 3, S, S]
    n, dev = v.shape[0], v.device

    def draw(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, *shape, generator=generator)).to(dev)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).to(dev)

    v = torch.where(coin(0.5)[:, None, None, None], v.flip(-1), v)
    # affine with p 0.8: +-15 degrees, translation up to 10 % of the size (0.2 in [-1, 1] units)
    on = coin(0.8)
    ang = draw(-15, 15) * on
    tr = draw(-0.2, 0.2, 2) * on[:, None]
    v = _warp(v, F.affine_grid(_affine_grid(n, ang, tr, dev), v.shape, align_corners=False))
    on = coin(0.5)  # perspective: p 0.5, distortion 0.4 (each corner moves by up to 0.2)
    jitter = draw(-0.2, 0.2, 4, 2) * on[:, None, None]
    if bool(on.any()):
        v = _warp(v, _perspective_grid(jitter, size, size))
    jit = coin(0.7)[:, None, None, None]
    b = draw(0.9, 1.1)[:, None, None, None]
    c = draw(0.9, 1.1)[:, None, None, None]
    sat = draw(0.9, 1.1)[:, None, None, None]
    grey = (0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2])[:, None]
    jittered = v * b
    jittered = (jittered - jittered.mean(dim=(1, 2, 3), keepdim=True)) * c + jittered.mean(dim=(1, 2, 3), keepdim=True)
    jittered = grey + (jittered - grey) * sat
    v = torch.where(jit, jittered.clamp(0, 1), v)
    to_grey = coin(0.15)[:, None, None, None]
    grey = (0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2])[:, None].expand_as(v)
    v = torch.where(to_grey, grey, v)
    mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
    return (v - mean) / std


def clip_loss(clip: OpenCLIP, x01: torch.Tensor, emb: torch.Tensor, n_views: int,
              generator: torch.Generator) -> torch.Tensor:
    """1.2 (1 - cos) averaged over views and a random choice of templates, summed over images.

    ``emb`` [K, D] are the normalised template embeddings; n ~ U{1..K} of them are drawn
    with replacement (Text2LIVE's text augmentation), then each image [3, H, W] of
    ``x01`` [B, 3, H, W] in [0, 1] is seen through ``n_views`` augmented views.
    """
    k = emb.shape[0]
    count = int(torch.randint(1, k + 1, (1,), generator=generator))
    chosen = emb[torch.randint(0, k, (count,), generator=generator).to(emb.device)]  # [n, D]
    total = x01.new_zeros(())
    for b in range(x01.shape[0]):
        views = augment_views(x01[b : b + 1], n_views, clip.image_size, generator)
        img = F.normalize(clip.encode_image(views), dim=-1)  # [V, D]
        cos = img @ chosen.T  # [V, n]
        total = total + (1.2 * (1 - cos.mean(0))).sum() / chosen.shape[0]
    return total


def _text_embeddings(clip: OpenCLIP, text: str, templates: list[str], device) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(clip.encode_text([t.format(text) for t in templates], device), dim=-1)


# --------------------------------------------------------------------------------------
# The guidance
# --------------------------------------------------------------------------------------
class CLIPGuidance(Guidance):
    """Text guidance of content (``mode="content"``) or style (``mode="style"``)."""

    needs_ddpm = True

    def __init__(self, clip: OpenCLIP, text: str, mode: str = "content", strength: float | None = None,
                 fill_factor: float = 0.3, n_views: int = 16, stop_steps: int = 3, seed: int = 0):
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

    def begin(self, sizes, count, device):
        super().begin(sizes, count, device)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.clip.model.to(device)
        self.emb_hr = _text_embeddings(self.clip, self.text, TEMPLATES_HR, device)
        self.emb_lr = _text_embeddings(self.clip, self.text, TEMPLATES_LR, device)
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
        return clip_loss(self.clip, x01, self.emb_lr if s == 0 else self.emb_hr, self.n_views, self.gen)

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
                 denoise_steps: int = 3, n_views: int = 16, seed: int = 0):
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

    def begin(self, sizes, count, device):
        super().begin(sizes, count, device)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.clip.model.to(device)
        self.emb = _text_embeddings(self.clip, self.text, TEMPLATES_LR, device)
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
                score = -clip_loss(self.clip, (r + 1) / 2, self.emb, self.n_views, self.gen)
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
