"""Small image utilities without plotting libraries: loss curves and image grids (PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from .images import tensor_to_pil


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window >= 1)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_curve(losses: Sequence[float], width: int = 640, height: int = 320, title: str = "loss") -> Image.Image:
    """A line chart of ``losses`` (raw in light grey, moving average in blue) as an RGB image."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 12, 26, 30
    d.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    d.text((left, 6), f"{title} ({len(losses)} steps)", fill=(0, 0, 0))
    vals = [float(v) for v in losses if math.isfinite(float(v))]
    if not vals:
        d.text((left + 10, height // 2), "no data", fill=(0, 0, 0))
        return img
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(losses)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(n - 1, 1))
        y = height - bottom - (height - top - bottom) * ((v - lo) / (hi - lo))
        return x, y

    for values, colour in ((losses, (200, 200, 200)), (smooth(losses, max(1, n // 50)), (30, 90, 200))):
        pts = [xy(i, float(v)) for i, v in enumerate(values) if math.isfinite(float(v))]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=1 if colour[0] == 200 else 2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        y = xy(0, v)[1]
        d.text((4, y - 6), f"{v:.4g}", fill=(80, 80, 80))
    d.text((left, height - bottom + 8), "step 1", fill=(80, 80, 80))
    d.text((width - right - 70, height - bottom + 8), f"step {n}", fill=(80, 80, 80))
    return img


def grid(rows: Sequence[Sequence[torch.Tensor]], pad: int = 4, background=(255, 255, 255)) -> Image.Image:
    """Lay out rows of images [3, H, W] (sizes may differ) into one picture."""
    widths = [sum(im.shape[-1] for im in row) + pad * (len(row) + 1) for row in rows]
    heights = [max(im.shape[-2] for im in row) for row in rows]
    canvas = Image.new("RGB", (max(widths), sum(heights) + pad * (len(rows) + 1)), background)
    y = pad
    for row, h in zip(rows, heights):
        x = pad
        for im in row:
            canvas.paste(tensor_to_pil(im), (x, y))
            x += im.shape[-1] + pad
        y += h + pad
    return canvas
