"""Per-sample weight modulation theta_hat = theta * (1 + Delta) (Hou et al. 2024, eq. 2).

Delta is separable per kernel tap (the paper's "two slim matrices h x w x C_in x 1 and
h x w x 1 x C_out, the product of which is the offset", after HyperStyle):

    Delta_b[o, i, p, q] = A_b[o, p, q] * C_b[i, p, q]          A_b [C_out, k, k], C_b [C_in, k, k]

so a layer's output under theta_hat is the plain output plus a correction,

    conv(x_b, theta * (1 + s Delta_b)) = conv(x_b, theta) + s conv(x_b, theta * Delta_b),

which is what :class:`SeparableModulation` computes through the engine's output side
(``output_delta(module, x)``, :mod:`core.views` and ``nodes.comfy_views``): the base
layer runs unchanged, so Delta = 0 (or strength 0) reproduces the base model bit for bit.

The correction is one grouped convolution over the batch (StyleGAN2's fused modulated
conv): the per-sample kernels theta * Delta_b [B, C_out, C_in, k, k] exist for one layer at
a time, never for the whole network (SD 1.5's 43 modulated kernels hold 370 M values per
sample).  Under autograd the layer's correction is recomputed in backward
(``checkpoint=True``, the default while gradients are on), so training keeps only A, C and
the layer input, not B full kernels per layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def _kernel(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The layer's kernel on x's device and dtype, usable by autograd (ComfyUI loads weights
    as inference tensors, which autograd may not save)."""
    w = weight.to(device=x.device, dtype=x.dtype)
    if w.is_inference() and torch.is_grad_enabled():
        with torch.inference_mode(False):
            w = w.clone()
    return w


def delta_conv(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, c: torch.Tensor, stride, padding,
               dilation) -> torch.Tensor:
    """sum over the batch of conv(x_b, weight * (a_b outer c_b)) as one grouped convolution.

    x [B, I, H, W]; weight [O, I, k, k]; a [B, O, k, k]; c [B, I, k, k] -> [B, O, H', W'].
    """
    b, i, h, w = x.shape
    o = weight.shape[0]
    kernels = weight[None] * a[:, :, None] * c[:, None]  # [B, O, I, k, k]
    y = F.conv2d(x.reshape(1, b * i, h, w), kernels.reshape(b * o, i, *weight.shape[2:]), None, stride, padding,
                 dilation, groups=b)  # [1, B*O, H', W']
    return y.reshape(b, o, *y.shape[2:])


def delta_conv_loop(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, c: torch.Tensor, stride, padding,
                    dilation) -> torch.Tensor:
    """Reference for :func:`delta_conv`: one ordinary convolution per sample."""
    out = [F.conv2d(x[j:j + 1], weight * (a[j][:, None] * c[j][None]), None, stride, padding, dilation)
           for j in range(x.shape[0])]
    return torch.cat(out, 0)


class SeparableModulation:
    """Weight function for one conv: theta -> theta * (1 + strength * A_b C_b), per sample b.

    ``a`` [B, C_out, k, k] and ``c`` [B, C_in, k, k] come from the rectifier for this call's
    batch (B = 1 broadcasts over any batch).  ``__call__`` leaves the shared weight alone;
    the change is applied on the layer's output (``output_delta``), the only place a
    per-sample kernel can be expressed.
    """

    def __init__(self, a: torch.Tensor, c: torch.Tensor, strength: float = 1.0, checkpoint: bool | None = None,
                 loop: bool = False):
        if a.ndim != 4 or c.ndim != 4 or a.shape[0] != c.shape[0] or a.shape[2:] != c.shape[2:]:
            raise ValueError(f"A {tuple(a.shape)} and C {tuple(c.shape)} are not [B, C_out, k, k] / [B, C_in, k, k]")
        self.a, self.c, self.strength = a, c, float(strength)
        self.checkpoint, self.loop = checkpoint, loop

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def output_delta(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = _kernel(module.weight, x)
        if tuple(weight.shape[:1] + weight.shape[2:]) != (self.a.shape[1], *self.a.shape[2:]) or \
                weight.shape[1] != self.c.shape[1]:
            raise ValueError(f"modulation of shape A {tuple(self.a.shape)} / C {tuple(self.c.shape)} does not fit "
                             f"the kernel {tuple(weight.shape)}")
        if getattr(module, "groups", 1) != 1 or getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError("only ungrouped, zero-padded convolutions can be modulated")
        a = (self.a * self.strength).to(x.dtype)
        c = self.c.to(x.dtype)
        if a.shape[0] != x.shape[0]:
            if a.shape[0] != 1:
                raise ValueError(f"the modulation was made for a batch of {a.shape[0]}, the layer sees {x.shape[0]}")
            a, c = a.expand(x.shape[0], *a.shape[1:]), c.expand(x.shape[0], *c.shape[1:])
        args = (module.stride, module.padding, module.dilation)
        fn = delta_conv_loop if self.loop else delta_conv
        use_ckpt = torch.is_grad_enabled() if self.checkpoint is None else self.checkpoint
        if use_ckpt and (a.requires_grad or c.requires_grad or x.requires_grad):
            return torch.utils.checkpoint.checkpoint(fn, x, weight, a, c, *args, use_reentrant=False)
        return fn(x, weight, a, c, *args)


def modulation_functions(deltas: Mapping[str, tuple[torch.Tensor, torch.Tensor]], strength: float = 1.0,
                         loop: bool = False) -> dict[str, SeparableModulation]:
    """{canonical weight name: its :class:`SeparableModulation`} for one call's rectifier output."""
    return {name: SeparableModulation(a, c, strength, loop=loop) for name, (a, c) in deltas.items()}


def dense_delta(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The full offset Delta [B, C_out, C_in, k, k] (tests and small layers only)."""
    return a[:, :, None] * c[:, None]
