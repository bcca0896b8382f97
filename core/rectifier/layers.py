"""Which denoiser weights the rectifier modulates (Hou et al. 2024, Sec. "Rectifier", Fig. 2).

The paper modulates "the middle and up-sampling blocks of U-Net" and, in the supplement,
"all convolutional layers' kernel weights" there.  Our reading, per layout of canonical
names (:meth:`core.seam.Denoiser.unet_parameters`):

* diffusers ``UNet2DModel`` (pixel DDPMs): every 4-D ``weight`` under ``mid_block.`` and
  ``up_blocks.``: the ResNet blocks' ``conv1``/``conv2``, their 1x1 ``conv_shortcut`` and the
  up-samplers' ``conv``;
* the original LDM layout (SD 1.x, ComfyUI and our diffusers SD back end): every 4-D
  ``weight`` under ``middle_block.`` and ``output_blocks.``: ``in_layers.2``, ``out_layers.3``,
  the 1x1 ``skip_connection`` and the up-samplers' ``conv``.

Left out, with the reason:

* attention projections (``proj_in``/``proj_out`` of SD's transformers, the q/k/v/out of
  pixel attention blocks): they are not convolutions of the paper's backbones (iDDPM and
  DDPM++ attention is linear), and in SD whether ``proj_in`` is a 1x1 conv or a Linear
  depends on the checkpoint (``use_linear_in_transformer``), so including them would make
  the layer list depend on a storage detail;
* biases and norms ("kernel weights" only);
* the final ``conv_out`` / ``out.2`` (after the last up block, not part of it).

SD 1.5 gives 43 layers (middle 4, output blocks 24 ResNet convs + 12 skips + 3 up-sampler
convs); the 256x256 CelebA-HQ DDPM gives 63 (mid 4, up 36 ResNet convs + 18 shortcuts + 5 up-samplers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

PIXEL_BLOCKS = ("mid_block.", "up_blocks.")
LDM_BLOCKS = ("middle_block.", "output_blocks.")
_ATTENTION = ("attentions.", "proj_in", "proj_out", "transformer_blocks", ".to_q", ".to_k", ".to_v", ".to_out")


@dataclass(frozen=True)
class LayerSpec:
    """One modulated convolution: canonical weight name and kernel shape (C_out, C_in, k_h, k_w)."""

    name: str
    shape: tuple[int, int, int, int]

    @property
    def c_out(self) -> int:
        return self.shape[0]

    @property
    def c_in(self) -> int:
        return self.shape[1]

    @property
    def taps(self) -> int:
        return self.shape[2] * self.shape[3]


def layout(names) -> str:
    """"pixel" (diffusers UNet2DModel names) or "ldm" (the original SD layout)."""
    names = list(names)
    if any(n.startswith(LDM_BLOCKS) for n in names):
        return "ldm"
    if any(n.startswith(PIXEL_BLOCKS) for n in names):
        return "pixel"
    raise ValueError("the denoiser has neither mid_block/up_blocks (diffusers UNet2DModel) nor "
                     "middle_block/output_blocks (SD) parameters: the rectifier supports these two U-Net layouts")


def modulated_layers(params: Mapping[str, torch.Tensor]) -> list[LayerSpec]:
    """The conv kernels the rectifier modulates, in the network's order (see the module docstring)."""
    blocks = PIXEL_BLOCKS if layout(params) == "pixel" else LDM_BLOCKS
    out = []
    for name, p in params.items():
        if not (name.startswith(blocks) and name.endswith(".weight") and p.ndim == 4):
            continue
        if any(a in name for a in _ATTENTION):
            continue
        out.append(LayerSpec(name, tuple(int(s) for s in p.shape)))
    if not out:
        raise ValueError("no convolution kernels found in the middle and up blocks")
    return out


def generated_values(layers: list[LayerSpec]) -> int:
    """Values R emits per sample: sum_l k_h k_w (C_in + C_out) (the paper's separable count)."""
    return sum(s.taps * (s.c_in + s.c_out) for s in layers)


def full_values(layers: list[LayerSpec]) -> int:
    """Values a full per-sample offset would need: sum_l k_h k_w C_in C_out."""
    return sum(s.taps * s.c_in * s.c_out for s in layers)
