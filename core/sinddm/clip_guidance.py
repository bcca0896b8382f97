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

The official code feeds non-square 224 x 280 views to a CLIP with interpolated position
embeddings; a stock OpenCLIP model has a fixed input size, so views are resized to it.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .guidance import Guidance

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


def _perspective_grid(b: int, h: int, w: int, distortion: float, device) -> torch.Tensor:
    """A random perspective warp: each corner moves by up to ``distortion``/2 of the size."""
    ys, xs = torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    jitter = (torch.rand(b, 4, 2, device=device) * 2 - 1) * distortion / 2
    u, v = (gx + 1) / 2, (gy + 1) / 2  # bilinear blend of the four corner offsets
    weights = torch.stack([(1 - u) * (1 - v), u * (1 - v), (1 - u) * v, u * v])  # [4, h, w]
    offset = torch.einsum("khw,bkc->bhwc", weights, jitter)
    return torch.stack([gx, gy], -1)[None] + offset


def augment_views(x: torch.Tensor, n_views: int, size: int, generator: random.Random) -> torch.Tensor:
    """[1, 3, H, W] in [0, 1] -> [n_views, 3, size, size], CLIP-normalised (differentiable)."""
    h, w = x.shape[-2:]
    views = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)]
    for _ in range(n_views - 1):
        u = generator.uniform(0.6, 1.0)
        ch, cw = max(1, int(h * u)), max(1, int(w * u))
        top, left = generator.randint(0, h - ch), generator.randint(0, w - cw)
        crop = x[..., top : top + ch, left : left + cw]
        views.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    v = torch.cat(views)  # [n, 3, S, S]
    n, dev = v.shape[0], v.device
    flip = torch.tensor([generator.random() < 0.5 for _ in range(n)], device=dev)
    v = torch.where(flip[:, None, None, None], v.flip(-1), v)
    # affine with p 0.8: +-15 degrees, translation up to 10 % of the size (0.2 in [-1, 1] units)
    on = torch.tensor([generator.random() < 0.8 for _ in range(n)], device=dev)
    ang = torch.tensor([generator.uniform(-15, 15) for _ in range(n)], device=dev) * on
    tr = torch.tensor([[generator.uniform(-0.2, 0.2), generator.uniform(-0.2, 0.2)] for _ in range(n)],
                      device=dev) * on[:, None]
    v = _warp(v, F.affine_grid(_affine_grid(n, ang, tr, dev), v.shape, align_corners=False))
    on = torch.tensor([generator.random() < 0.5 for _ in range(n)], device=dev)
    if bool(on.any()):  # perspective: p 0.5, distortion 0.4
        grid = _perspective_grid(n, size, size, 0.4, dev)
        ident = _perspective_grid(n, size, size, 0.0, dev)
        v = _warp(v, torch.where(on[:, None, None, None], grid, ident))
    jit = torch.tensor([generator.random() < 0.7 for _ in range(n)], device=dev)[:, None, None, None]
    b = torch.tensor([generator.uniform(0.9, 1.1) for _ in range(n)], device=dev)[:, None, None, None]
    c = torch.tensor([generator.uniform(0.9, 1.1) for _ in range(n)], device=dev)[:, None, None, None]
    sat = torch.tensor([generator.uniform(0.9, 1.1) for _ in range(n)], device=dev)[:, None, None, None]
    grey = (0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2])[:, None]
    jittered = v * b
    jittered = (jittered - jittered.mean(dim=(1, 2, 3), keepdim=True)) * c + jittered.mean(dim=(1, 2, 3), keepdim=True)
    jittered = grey + (jittered - grey) * sat
    v = torch.where(jit, jittered.clamp(0, 1), v)
    to_grey = torch.tensor([generator.random() < 0.15 for _ in range(n)], device=dev)[:, None, None, None]
    grey = (0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2])[:, None].expand_as(v)
    v = torch.where(to_grey, grey, v)
    mean = torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1)
    return (v - mean) / std


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
        self.n_views, self.stop_steps, self.seed = n_views, stop_steps, seed

    def begin(self, sizes, count, device):
        super().begin(sizes, count, device)
        self.rng = random.Random(self.seed)
        self.clip.model.to(device)
        with torch.no_grad():
            self.emb_hr = F.normalize(self.clip.encode_text([t.format(self.text) for t in TEMPLATES_HR], device), dim=-1)
            self.emb_lr = F.normalize(self.clip.encode_text([t.format(self.text) for t in TEMPLATES_LR], device), dim=-1)
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
        """1.2 (1 - cos) averaged over views and chosen templates, summed over images."""
        emb = self.emb_lr if s == 0 else self.emb_hr
        k = emb.shape[0]
        chosen = emb[[self.rng.randrange(k) for _ in range(self.rng.randint(1, k))]]  # [n, D]
        total = x01.new_zeros(())
        for b in range(x01.shape[0]):
            views = augment_views(x01[b : b + 1], self.n_views, self.clip.image_size, self.rng)
            img = F.normalize(self.clip.encode_image(views), dim=-1)  # [V, D]
            cos = img @ chosen.T  # [V, n]
            total = total + (1.2 * (1 - cos.mean(0))).sum() / chosen.shape[0]
        return total

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
        self.scores.append(float(score))
        if self.mask is None:
            grad, self.mask = thresholded_grad(grad, 1.0 - self.fill)
        norm_x = torch.linalg.vector_norm(x0 * self.mask, dim=(1, 2, 3), keepdim=True)
        norm_g = torch.linalg.vector_norm(grad * self.mask, dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        x0 = (x0 + self.strength * norm_x / norm_g * grad * self.mask).clamp(-1, 1)
        self.prev = x0.detach()
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
