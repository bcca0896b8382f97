"""The rectifier R(x_0, P_t[eps_theta(x_t)], t): a hypernetwork emitting separable weight offsets
(Hou et al. 2024, Fig. 2 and supplement A / Fig. 9).

* **Global encoder**: torchvision's ResNet-34 (BasicBlock, layers 3-4-6-3, random init;
  ImageNet weights optional from a local file, :func:`load_encoder_weights`), its stem
  widened to 2 x channels inputs: concat(x_0, P_t) (6 channels for pixels, 8 for SD
  latents; the paper found a 3-channel difference worse).  Output: the stage-4 map
  [B, 512, H/32, W/32].
* **One subnet branch per modulated layer** (:mod:`core.rectifier.layers`): a stride-2 3x3
  conv to ``width`` channels, the time embedding added "as in the U-Net": SiLU, then a
  per-branch linear projection of the shared embedding, added to the first conv's output (a
  DDPM / iDDPM ResBlock's ``temb_proj(silu(temb))`` after its first conv), LeakyReLU,
  ``branch_convs - 1`` further stride-2 3x3 convs, global average pooling
  to 1x1, then two 1x1 convs (linears on the pooled vector) emitting the slim factors
  C [C_in, k, k] and A [C_out, k, k]; Delta = A outer C per tap (:mod:`.modulation`).
* **Time embedding**: the DDPM U-Net's sinusoidal embedding of the integer timestep,
  then Linear-SiLU-Linear (shared by all branches).

Choices the paper leaves open, and ours:

* Delta = 0 at the start (HyperStyle's sanity check: a fresh rectifier must reproduce the
  base model): the A head is zero-initialised.  Only one factor may be zero, or neither
  would receive a gradient; the C head keeps its default init with bias 1, so the first
  updates learn a per-output-channel scale (Delta[o, i] ~ A[o]) and the input-channel
  structure follows.
* Raw offsets, no output activation (HyperStyle emits raw values too).
* Normalisation in the encoder is per sample: batch statistics would make one sample's
  Delta depend on the other samples of its batch (ComfyUI batches cond and uncond, and the
  images of a batch are unrelated), and at the batch sizes this trains with (1-8) they are
  noise.  A randomly initialised encoder therefore uses GroupNorm (32 groups) in place of
  BatchNorm (``encoder_norm="group"``, the default): with BatchNorm frozen at its initial
  identity statistics, the un-normalised residual stream grows by orders of magnitude within
  a few Adam steps at the paper's lr 1e-3 and training diverges.  An encoder loaded with
  ImageNet weights (``encoder_norm="batch"``) keeps torchvision's BatchNorm, run with
  ImageNet's fixed statistics (eval mode) even in training.
* P_t is clipped to +-``estimate_clip`` before R sees it: at large t the x_0 estimate is the
  noise amplified by 1/sqrt(alpha_bar_t) (~156 at t = 999 of the linear schedule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerSpec

RESNET34 = (3, 4, 6, 3)


@dataclass(frozen=True)
class RectifierConfig:
    """Architecture of a rectifier (saved in its file's header)."""

    layers: tuple[LayerSpec, ...]
    channels: int = 3  # channels of x_0 (3 pixels, 4 SD latents); the encoder sees 2 x channels
    encoder_layers: tuple[int, ...] = RESNET34
    width: int = 64
    branch_convs: int = 2
    time_dim: int = 128
    estimate_clip: float = 1.0
    seed: int = 0
    encoder_norm: str = "group"  # "group" (random init) | "batch" (frozen statistics; ImageNet weights)
    branch_silu: bool = True  # SiLU before each branch's time projection (files saved before it existed: False)
    layer_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.layers:
            raise ValueError("a rectifier needs at least one layer to modulate")
        if self.channels < 1 or self.width < 1 or self.branch_convs < 1 or self.time_dim < 2 or self.time_dim % 2:
            raise ValueError("channels, width and branch_convs must be positive and time_dim even")
        if len(self.encoder_layers) != 4 or min(self.encoder_layers) < 1:
            raise ValueError(f"encoder_layers must be four positive block counts, got {self.encoder_layers}")
        if self.encoder_norm not in ("group", "batch"):
            raise ValueError(f"encoder_norm must be 'group' or 'batch', got {self.encoder_norm!r}")
        if not self.estimate_clip > 0:
            raise ValueError("estimate_clip must be positive")
        object.__setattr__(self, "layer_names", tuple(s.name for s in self.layers))

    def to_json(self) -> dict:
        return {"layers": [[s.name, list(s.shape)] for s in self.layers], "channels": self.channels,
                "encoder_layers": list(self.encoder_layers), "width": self.width, "branch_convs": self.branch_convs,
                "time_dim": self.time_dim, "estimate_clip": self.estimate_clip, "seed": self.seed,
                "encoder_norm": self.encoder_norm, "branch_silu": self.branch_silu}

    @classmethod
    def from_json(cls, d: dict) -> "RectifierConfig":
        layers = tuple(LayerSpec(str(n), tuple(int(v) for v in s)) for n, s in d["layers"])
        return cls(layers, int(d["channels"]), tuple(int(v) for v in d["encoder_layers"]), int(d["width"]),
                   int(d["branch_convs"]), int(d["time_dim"]), float(d["estimate_clip"]), int(d.get("seed", 0)),
                   str(d.get("encoder_norm", "batch")), bool(d.get("branch_silu", False)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The DDPM U-Net's sinusoidal embedding: [B] -> [B, dim] (sin half, cos half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class Encoder(nn.Module):
    """torchvision's ResNet (BasicBlock) trunk on 2 x channels inputs -> [B, 512, H/32, W/32]."""

    def __init__(self, in_channels: int, layers: Sequence[int], norm: str = "group"):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet

        norm_layer = (lambda c: nn.GroupNorm(32, c)) if norm == "group" else None
        net = ResNet(BasicBlock, list(layers), norm_layer=norm_layer)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        del net.fc, net.avgpool
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class Branch(nn.Module):
    """One subnet: features [B, 512, h, w] + temb [B, T] -> (A [B, C_out, k, k], C [B, C_in, k, k])."""

    def __init__(self, spec: LayerSpec, width: int, time_dim: int, convs: int, features: int = 512,
                 silu: bool = True):
        super().__init__()
        self.spec, self.silu = spec, silu
        self.conv_in = nn.Conv2d(features, width, 3, stride=2, padding=1)
        self.temb = nn.Linear(time_dim, width)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(convs - 1))
        kh, kw = spec.shape[2:]
        self.head_c = nn.Linear(width, spec.c_in * kh * kw)
        self.head_a = nn.Linear(width, spec.c_out * kh * kw)
        nn.init.zeros_(self.head_a.weight)
        nn.init.zeros_(self.head_a.bias)
        nn.init.ones_(self.head_c.bias)

    def forward(self, f: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = F.silu(temb) if self.silu else temb  # [B, T]: the U-Net ResBlock's temb_proj(silu(temb))
        h = F.leaky_relu(self.conv_in(f) + self.temb(e)[:, :, None, None], 0.2)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        h = h.mean(dim=(2, 3))  # [B, width]
        kh, kw = self.spec.shape[2:]
        a = self.head_a(h).view(-1, self.spec.c_out, kh, kw)
        c = self.head_c(h).view(-1, self.spec.c_in, kh, kw)
        return a, c


class Rectifier(nn.Module):
    """R(x_0, P_t, t) -> {layer name: (A, C)}; see the module docstring."""

    def __init__(self, config: RectifierConfig):
        super().__init__()
        self.config = config
        from ..seeds import private_rng

        with private_rng(config.seed):  # deterministic init, the process's RNG untouched
            self.encoder = Encoder(2 * config.channels, config.encoder_layers, config.encoder_norm)
            self.time = nn.Sequential(nn.Linear(config.time_dim, 4 * config.time_dim), nn.SiLU(),
                                      nn.Linear(4 * config.time_dim, config.time_dim))
            self.branches = nn.ModuleList(Branch(s, config.width, config.time_dim, config.branch_convs,
                                                 silu=config.branch_silu) for s in config.layers)
        self.train(False)

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.config.layer_names

    def train(self, mode: bool = True) -> "Rectifier":
        super().train(mode)
        for m in self.modules():  # BatchNorm: fixed statistics, always (module docstring)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x0: torch.Tensor, estimate: torch.Tensor, t: torch.Tensor
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """x0, estimate [B, channels, H, W] (model space); t [B] integer timesteps."""
        if x0.shape != estimate.shape or x0.shape[1] != self.config.channels:
            raise ValueError(f"the rectifier expects x_0 and P_t of shape [B, {self.config.channels}, H, W], got "
                             f"{tuple(x0.shape)} and {tuple(estimate.shape)}")
        clip = self.config.estimate_clip
        dtype = next(self.parameters()).dtype
        inp = torch.cat([x0, estimate.clamp(-clip, clip)], dim=1).to(dtype)  # [B, 2c, H, W]
        f = self.encoder(inp)
        temb = self.time(timestep_embedding(t.to(inp.device), self.config.time_dim).to(dtype))
        return {b.spec.name: b(f, temb) for b in self.branches}


def load_encoder_weights(rectifier: Rectifier, path) -> list[str]:
    """Load torchvision ResNet ImageNet weights (a local ``.safetensors``, or ``.pth`` read with
    ``weights_only=True``) into the encoder; the 3-channel stem is copied onto both halves of
    a 6-channel stem (halved, so a pair of equal inputs gives ImageNet's response); a latent
    rectifier keeps its random stem.  Returns the keys that were not loaded."""
    from pathlib import Path

    p = Path(path)
    if rectifier.config.encoder_norm != "batch":
        raise ValueError("ImageNet weights need an encoder with BatchNorm: create the rectifier with "
                         "encoder_norm='batch'")
    if not p.is_file():
        raise FileNotFoundError(f"encoder weights not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p))
    else:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or "layer4.0.conv1.weight" not in sd:
        raise ValueError(f"{p.name} is not a torchvision ResNet state dict (no layer4.0.conv1.weight)")
    own = rectifier.encoder.net.state_dict()
    new, skipped = {}, []
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        if k == "conv1.weight" and own[k].shape != v.shape:
            if own[k].shape[1] == 2 * v.shape[1]:
                v = torch.cat([v, v], 1) / 2
            else:
                skipped.append(k)
                continue
        if k not in own or own[k].shape != v.shape:
            raise ValueError(f"{p.name}: {k} {tuple(v.shape)} does not fit the encoder "
                             f"(ResNet blocks {rectifier.config.encoder_layers}); a ResNet-34 file is expected")
        new[k] = v
    rectifier.encoder.net.load_state_dict(new, strict=False)
    return skipped + sorted(set(own) - set(new) - set(skipped))
