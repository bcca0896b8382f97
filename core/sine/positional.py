"""SINE's positional map F(v) (paper §3.3, "normalization and Fourier embedding of the area v").

The map is the official code's, not a re-derivation from the paper's words
(``zhang-zx/SINE``, ``ldm/modules/diffusionmodules/positional_encoding.py`` and
``openaimodel.py``, checked at HEAD ``c0df950``):

* ``SinusoidalPositionalEmbedding.get_embedding`` (the SPE of Xu et al., CVPR 2021, via mmgen):
  per axis ``embedding_dim = model_channels // 2`` channels, ``half = embedding_dim // 2``
  frequencies ``freq_i = exp(-i * ln(10000) / (half - 1))`` for i = 0..half-1
  (``div_half_dim: false`` in every config), and the embedding of position p is
  ``[sin(p * freq_0..half-1), cos(p * freq_0..half-1)]``: all sines first, then all cosines.  The
  frequencies are computed in float32 (``torch.arange(half, dtype=float) * -(ln(1e4)/(half-1))``,
  then ``exp``), and so is ``p * freq`` before sin/cos; :func:`sinusoidal_table` does the same.
* ``make_grid2d`` / ``make_positions``: the positions are 1..N, never 0 (index 0 is the padding
  index and would give zeros).  ``center_shift: 100`` in the yaml has no effect, because
  ``make_positions`` rebuilds the positions as a cumulative sum of a non-padding mask.  The x
  embedding comes first (channels 0..C/2-1, a function of the column only), the y embedding
  second (channels C/2..C-1, a function of the row only).
* ``UNetModelPatch.forward``: the grid is ``init_size x init_size = 128 x 128`` (the latent grid of
  the 1024 x 1024 training image), ``model_channels = 320`` channels.  With crop boxes
  ``[y1, x1, y2, x2]`` each sample's map is ``F.interpolate(grid[:, :, y1:y2, x1:x2], (H, W),
  mode='bilinear', align_corners=True)``; with none the whole grid is resized to the latent size
  (``interpolation_mode: nearest`` in ``v1-inference_patch_nearest_interp.yaml`` uses
  ``mode='nearest'``, PyTorch's legacy nearest, for both).  The map is added to the output of
  ``input_blocks[0]`` (``conv_in``) before it is pushed on the skip stack: exactly where
  :class:`core.seam.Features` puts ``input_map``.

Boxes here follow :class:`core.seam.Features`: ``(top, left, height, width)`` in grid units, i.e.
the official ``[y1, x1, y2, x2]`` is ``(y1, x1, y2 - y1, x2 - x1)``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

MODEL_CHANNELS = 320
"""SD 1.x UNet's ``model_channels`` (channels out of ``conv_in``): the map's channel count."""
GRID_SIZE = 128
"""The official ``init_size``: 1024-pixel training image / 8 (VAE factor)."""
MODES = ("bilinear", "nearest")


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, dim] sinusoidal embeddings of ``positions`` (float32, CPU): ``[sin(p f_i)..., cos(p f_i)...]``
    with ``f_i = exp(-i ln(10000) / (dim/2 - 1))``.

    Mirrors ``SinusoidalPositionalEmbedding.get_embedding(..., div_half_dim=False)`` row by row
    (the official table is indexed by the position, so row p is this function at p).
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"the sinusoidal embedding needs an even dimension of at least 4, got {dim}")
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    arg = positions.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


@lru_cache(maxsize=16)
def _grid(channels: int, size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    dim = channels // 2
    axis = sinusoidal_table(torch.arange(1, size + 1), dim).t()  # [dim, size]: 1-based positions
    x = axis.reshape(1, dim, 1, size).expand(1, dim, size, size)  # varies along columns
    y = axis.reshape(1, dim, size, 1).expand(1, dim, size, size)  # varies along rows
    return torch.cat([x, y], dim=1).to(device=device, dtype=dtype).contiguous()


def positional_grid(channels: int = MODEL_CHANNELS, size: int = GRID_SIZE, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full positional grid [1, channels, size, size] (x embedding first, then y), cached per
    (channels, size, device, dtype).  Shared: do not modify it in place.

    Mirrors ``SinusoidalPositionalEmbedding.make_grid2d(init_size, init_size)`` as called by
    ``UNetModelPatch.forward`` (official: ``channels = model_channels = 320``, ``size = 128``).
    """
    if channels % 4:
        raise ValueError(f"the positional map needs a channel count divisible by 4 (two axes of sin and cos), "
                         f"got {channels}")
    if size < 1:
        raise ValueError(f"grid size must be positive, got {size}")
    return _grid(int(channels), int(size), str(torch.device(device or "cpu")), dtype)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"interpolation mode must be one of {MODES}, got {mode!r}")
    return mode


def _resize(grid: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if mode == "bilinear":
        return F.interpolate(grid, size, mode="bilinear", align_corners=True)
    return F.interpolate(grid, size, mode="nearest")


def whole_map(grid: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """The whole grid resized to the latent ``size`` (h, w): [1, C, h, w], the sampling-time map
    (``crop_boxes=None`` in ``UNetModelPatch.forward``).  Any size and aspect ratio: positions are
    relative to the image, and a non-square size stretches the grid as the official code does."""
    return _resize(grid, size, _check_mode(mode))


def _box_list(boxes: torch.Tensor, grid_h: int, grid_w: int) -> list[tuple[int, int, int, int]]:
    b = torch.as_tensor(boxes).detach().to("cpu", torch.float64)
    if b.ndim == 1:
        b = b.unsqueeze(0)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"crop boxes must be [B, 4] (top, left, height, width), got shape {tuple(b.shape)}")
    if (b - b.round()).abs().max() > 1e-6:
        raise ValueError(f"crop boxes must be whole grid cells (the official code slices the grid), got {b.tolist()}")
    out = []
    for top, left, hh, ww in b.round().long().tolist():
        if hh < 1 or ww < 1 or top < 0 or left < 0 or top + hh > grid_h or left + ww > grid_w:
            raise ValueError(f"crop box (top={top}, left={left}, height={hh}, width={ww}) does not lie inside "
                             f"the {grid_h}x{grid_w} positional grid")
        out.append((top, left, hh, ww))
    return out


def crop_map(grid: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """F(v) per sample: [B, C, h, w], each box's sub-grid resized to ``size`` (h, w).

    ``boxes`` [B, 4] are ``(top, left, height, width)`` in grid units (whole cells).  Mirrors the
    per-sample ``F.interpolate(hg[:, :, y1:y2, x1:x2], (H, W), mode='bilinear', align_corners=True)``
    of ``UNetModelPatch.forward`` (``mode='nearest'``: its nearest variant).
    """
    _check_mode(mode)
    parts = [_resize(grid[:, :, top:top + hh, left:left + ww], size, mode)
             for top, left, hh, ww in _box_list(boxes, grid.shape[-2], grid.shape[-1])]
    return torch.cat(parts, dim=0)


class PositionalMap:
    """SINE's F(v) as a :class:`core.seam.Features` ``input_map``: ``(h, crop_box) -> map``.

    ``h`` [B, C, H, W] is the output of the UNet's first input block; ``crop_box`` [B, 4] (or [1, 4],
    broadcast) gives each sample's patch in grid units, and ``None`` means the whole image (the
    grid resized to H x W, for sampling at any resolution).  The map is computed in float32 on
    ``h``'s device (the official code uses the UNet's dtype, float32 in its configs) and returned
    in ``h``'s dtype.  ``channels`` must equal the model's ``model_channels`` (320 for SD 1.x).

    >>> f = Features(input_map=PositionalMap(), crop_box=torch.tensor([[0, 0, 64, 128]]))
    """

    def __init__(self, channels: int = MODEL_CHANNELS, grid_size: int = GRID_SIZE, mode: str = "bilinear"):
        positional_grid(channels, grid_size)  # validates channels and size early
        self.channels, self.grid_size, self.mode = int(channels), int(grid_size), _check_mode(mode)

    def grid(self, device: torch.device | str | None = None) -> torch.Tensor:
        return positional_grid(self.channels, self.grid_size, device, torch.float32)

    def __call__(self, h: torch.Tensor, crop_box: torch.Tensor | None = None) -> torch.Tensor:
        if h.ndim != 4:
            raise ValueError(f"SINE's positional map expects a feature map [B, C, H, W], got shape {tuple(h.shape)}")
        b, c, hh, ww = h.shape
        if c != self.channels:
            raise ValueError(
                f"SINE's positional map has {self.channels} channels but this model's first block gives {c} "
                f"(its model_channels); SINE is defined for SD 1.x UNets (320), or build "
                f"PositionalMap(channels={c})")
        grid = self.grid(h.device)
        if crop_box is None:
            out = _resize(grid, (hh, ww), self.mode)
        else:
            n = 1 if crop_box.ndim == 1 else crop_box.shape[0]
            if n not in (1, b):
                raise ValueError(f"{n} crop boxes for a batch of {b}: give one box per sample (or one for all)")
            out = crop_map(grid, crop_box, (hh, ww), self.mode)
        return out.to(h.dtype)

    def __repr__(self) -> str:
        return f"PositionalMap(channels={self.channels}, grid_size={self.grid_size}, mode={self.mode!r})"
