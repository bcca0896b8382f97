"""The SinDDM denoiser: a small fully-convolutional network conditioned on (t, s).

Architecture of the official code (Kulikov et al. 2023, Fig. 4; ``SinDDM/models.py``):
four blocks, each a depthwise 5x5 convolution, the broadcast (t, s) embedding, then
3x3 conv -> GELU -> 3x3 conv, with a residual; channel widths
3 -> w/2 -> w -> w -> w/2, then a 1x1 convolution back to 3 channels.  No attention
and no resampling, so any H x W works; the receptive field is 33 x 33 pixels.  At the
default width w = 160 the network has 1,106,772 parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..seeds import private_rng

EMB_DIM = 32  # width of each sinusoidal embedding and of the conditioning vector


@dataclass(frozen=True)
class NetConfig:
    width: int = 160  # the official "dim"
    channels: int = 3

    def __post_init__(self):
        if self.width < 2 or self.width % 2:
            raise ValueError(f"width must be an even number >= 2, got {self.width}")


def sinusoidal_embedding(x: torch.Tensor, dim: int = EMB_DIM) -> torch.Tensor:
    """Transformer positional encoding of a scalar per sample: [B] -> [B, dim].

    frequencies w_i = 10000^(-i / (dim/2 - 1)), i = 0..dim/2-1; output [sin(x w), cos(x w)].
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = x.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class ConvBlock(nn.Module):
    """Depthwise 5x5 -> + cond -> 3x3 -> GELU -> 3x3, plus a (1x1) residual."""

    def __init__(self, dim: int, dim_out: int, cond_dim: int = EMB_DIM):
        super().__init__()
        self.ds_conv = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.cond_mlp = nn.Sequential(nn.GELU(), nn.Linear(cond_dim, cond_dim))
        self.cond_proj = nn.Conv2d(cond_dim, dim, 1)
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim_out, 3, padding=1), nn.GELU(), nn.Conv2d(dim_out, dim_out, 3, padding=1)
        )
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x [B, dim, H, W], cond [B, cond_dim]
        h = self.ds_conv(x)
        c = self.cond_mlp(cond)[:, :, None, None]  # [B, cond_dim, 1, 1]
        h = h + self.cond_proj(c)
        return self.net(h) + self.res_conv(x)


class SinDDMNet(nn.Module):
    """epsilon_theta(x_t, t, s) of SinDDM (paper Fig. 4)."""

    def __init__(self, config: NetConfig = NetConfig()):
        super().__init__()
        self.config = config
        w, c = config.width, config.channels
        self.cond_mlp = nn.Sequential(nn.Linear(2 * EMB_DIM, 4 * EMB_DIM), nn.GELU(), nn.Linear(4 * EMB_DIM, EMB_DIM))
        self.blocks = nn.ModuleList(
            [ConvBlock(c, w // 2), ConvBlock(w // 2, w), ConvBlock(w, w), ConvBlock(w, w // 2)]
        )
        self.final_conv = nn.Conv2d(w // 2, c, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # x [B, 3, H, W]; t, s integer tensors [B] (or scalars, broadcast)
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        s = torch.as_tensor(s, device=x.device).reshape(-1).expand(b)
        emb = torch.cat([sinusoidal_embedding(t), sinusoidal_embedding(s)], dim=-1)  # [B, 64]
        cond = self.cond_mlp(emb.to(self.cond_mlp[0].weight.dtype))  # [B, 32]
        h = x
        for block in self.blocks:
            h = block(h, cond)
        return self.final_conv(h)


def seeded_net(config: NetConfig, seed: int) -> SinDDMNet:
    """A freshly initialised network whose weights depend only on ``seed`` (see :func:`private_rng`)."""
    with private_rng(seed):
        return SinDDMNet(config)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def receptive_field() -> int:
    """33: each block adds 4 (5x5) + 2 + 2 (two 3x3) pixels to a 1-pixel field."""
    return 1 + 4 * (4 + 2 + 2)


__all__ = ["NetConfig", "SinDDMNet", "sinusoidal_embedding", "private_rng", "seeded_net", "parameter_count",
           "receptive_field"]
