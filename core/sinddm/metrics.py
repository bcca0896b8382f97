"""Quality measures for single-image generative models that need no pretrained network.

* :func:`pixel_diversity`: the paper's Table 1 "pixel diversity" (after SinGAN): the
  standard deviation over samples of each pixel, averaged over pixels and channels,
  divided by the standard deviation of the training image's pixels.
* :func:`patch_swd`: sliced Wasserstein distance between the distributions of k x k
  patches of the samples and of the training image (a pretrained-network-free stand-in
  for SIFID): patches are projected on random unit directions and the sorted
  projections compared (quantiles where the patch counts differ).
* :func:`multiscale_patch_swd`: :func:`patch_swd` at every pyramid size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..seeds import derive_seed


def pixel_diversity(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """samples [N, C, H, W] (N >= 2) and the training image [1, C, H, W], both in [0, 1]."""
    if samples.shape[0] < 2:
        raise ValueError("pixel_diversity needs at least two samples")
    if samples.shape[-2:] != reference.shape[-2:]:
        reference = F.interpolate(reference, size=samples.shape[-2:], mode="bilinear", antialias=True)
    per_pixel = samples.float().std(dim=0, unbiased=True).mean()
    return float(per_pixel / reference.float().std().clamp_min(1e-8))


def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, C, H, W] -> [P, C*k*k] every k x k patch (stride 1)."""
    return F.unfold(x.float(), kernel_size=k).transpose(1, 2).reshape(-1, x.shape[1] * k * k)


def patch_swd(samples: torch.Tensor, reference: torch.Tensor, k: int = 7, projections: int = 256,
              seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between k x k patch distributions (pixel units of [0, 1])."""
    a, b = _patches(samples, k), _patches(reference, k)
    g = torch.Generator().manual_seed(derive_seed(seed))
    dirs = F.normalize(torch.randn(a.shape[1], projections, generator=g), dim=0)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values  # [P, K]
    n = max(pa.shape[0], pb.shape[0])
    q = torch.linspace(0, 1, n)

    def at(p: torch.Tensor) -> torch.Tensor:
        idx = q * (p.shape[0] - 1)
        lo, hi = idx.floor().long(), idx.ceil().long()
        w = (idx - lo)[:, None]
        return p[lo] * (1 - w) + p[hi] * w

    return float((at(pa) - at(pb)).abs().mean())


def multiscale_patch_swd(samples: torch.Tensor, reference: torch.Tensor, sizes, k: int = 7,
                         projections: int = 256) -> list[float]:
    """:func:`patch_swd` after resizing samples and reference to each (H, W) in ``sizes``."""
    out = []
    for size in sizes:
        rs = F.interpolate(samples.float(), size=tuple(size), mode="bilinear", antialias=True)
        rr = F.interpolate(reference.float(), size=tuple(size), mode="bilinear", antialias=True)
        out.append(patch_swd(rs, rr, k, projections))
    return out
