"""Reconstruction metrics of the High-Fidelity rectifier's evaluation (Hou et al., AAAI 2024).

Table 1 of the paper ("High-Fidelity Diffusion-based Image Editing") compares how well
each method reconstructs its input image with four numbers: L1, L2, LPIPS and SSIM.
This module provides the three that need no pretrained network:

* :func:`l1`: mean absolute error per image;
* :func:`l2`: mean squared error per image (the paper's "L2" is the squared error,
  not its square root);
* :func:`ssim`: the structural similarity index of Wang et al. 2004 ("Image quality
  assessment: from error visibility to structural similarity", eq. 13) with an 11x11
  Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, computed per channel over the
  "valid" part of the image and averaged.  It matches scikit-image's
  ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0, channel_axis=0)``.

LPIPS is omitted: it needs pretrained VGG/AlexNet weights, which the pack does not ship.

All functions are pure torch on images [B, C, H, W] (C = 3 for RGB) in [0, 1], run on
any device and return one value per image ([B]); :func:`reconstruction_report`
averages them over the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K1 = 0.01
K2 = 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise a ValueError naming the argument unless ``a`` and ``b`` are matching [B, C, H, W] float images."""
    for name, x in zip(names, (a, b)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape [B, C, H, W], got {tuple(x.shape)} ({x.ndim}-D)")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{names[1]} has shape {tuple(b.shape)} but {names[0]} has shape {tuple(a.shape)}; "
                         "they must match")


def _work_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """float64 if either input is float64, else float32 (half inputs are computed in float32)."""
    return torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per image: [B, C, H, W] x 2 -> [B] (Table 1's "L1")."""
    _check_pair(a, b)
    dt = _work_dtype(a, b)
    return (a.to(dt) - b.to(dt)).abs().flatten(1).mean(1)  # [B]


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: [B, C, H, W] x 2 -> [B] (Table 1's "L2")."""
    _check_pair(a, b)
    dt = _work_dtype(a, b)
    return (a.to(dt) - b.to(dt)).pow(2).flatten(1).mean(1)  # [B]


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps [size] centred on the middle tap (size odd).

    The same taps as scipy's ``gaussian_filter`` with radius (size - 1) / 2, which
    scikit-image's SSIM uses (radius = int(3.5 * sigma + 0.5) = 5 for sigma = 1.5).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = (size - 1) // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)  # [size]
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(device=device, dtype=dtype)


def _filter_valid(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' part only: [N, C, H, W] -> [N, C, H - k + 1, W - k + 1]."""
    c, k = x.shape[1], taps.numel()
    row = taps.reshape(1, 1, 1, k).expand(c, 1, 1, k)  # [C, 1, 1, k] depthwise
    col = taps.reshape(1, 1, k, 1).expand(c, 1, k, 1)  # [C, 1, k, 1]
    x = F.conv2d(x, row, groups=c)  # [N, C, H, W - k + 1]
    return F.conv2d(x, col, groups=c)  # [N, C, H - k + 1, W - k + 1]


def effective_window(window: int, height: int, width: int) -> int:
    """The window actually used: ``window`` shrunk to the image's smaller side, kept odd."""
    size = min(window, height, width)
    return size if size % 2 == 1 else size - 1


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image: [B, C, H, W] x 2 -> [B] (Table 1's "SSIM").

    Wang et al. 2004 with a Gaussian window (``window`` taps, ``sigma``) and population
    (co)variances: local means mu, variances s^2 and covariance s_ab from Gaussian
    filtering, then
        SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),
    C1 = (K1 L)^2, C2 = (K2 L)^2 with L = ``data_range``, averaged over the positions where
    the window fits entirely ('valid') and over the channels.  An image smaller than the
    window uses a window the size of its smaller side (made odd); the taps stay Gaussian
    with the same ``sigma``.
    """
    _check_pair(a, b)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range}")
    n, _, h, w = a.shape
    dt = _work_dtype(a, b)
    taps = gaussian_window(effective_window(window, h, w), sigma, dtype=dt, device=a.device)  # [k]
    x, y = a.to(dt), b.to(dt)  # [B, C, H, W]
    stats = _filter_valid(torch.cat([x, y, x * x, y * y, x * y]), taps)  # [5B, C, H', W']
    mu_x, mu_y, xx, yy, xy = stats.split(n)  # each [B, C, H', W']
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)  # [B]: mean over channels and valid positions


def reconstruction_report(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    """Batch means of :func:`l1`, :func:`l2` and :func:`ssim`: ``{"l1": ..., "l2": ..., "ssim": ...}``.

    Both arguments are images [B, C, H, W] in [0, 1]; lower L1/L2 and higher SSIM are
    better (Hou et al. 2024, Table 1, without LPIPS).
    """
    _check_pair(originals, reconstructions, ("originals", "reconstructions"))
    with torch.no_grad():
        return {
            "l1": float(l1(originals, reconstructions).mean()),
            "l2": float(l2(originals, reconstructions).mean()),
            "ssim": float(ssim(originals, reconstructions).mean()),
        }
