"""LayerDiffusion end to end outside ComfyUI (Li et al. 2023): stages 1-3 on one image and a reference.

(1) e_a, e_b (the encodings of the object text T_a and the background text T_b) optimised on the
input image under its object mask (:mod:`.embedding`, eq. 2); (2) e_opt = alpha e^_a + (1 - alpha) e^_b
(:mod:`.interpolate`, eq. 3); (3) the UNet fine-tuned at e_opt on L_obj + L_bg (:mod:`.finetune`,
eqs. 4-6); (4) DDIM from noise with the iterative guidance of eq. 8 (:mod:`.guidance`).  The CLI
is ``python -m core.layerdiffusion``.

**Masks belong to images.**  ``mask_image`` is the object mask of the input image, ``mask_reference``
the object mask of the reference (all zero for a pure background reference), ``mask_target`` the
object mask of the SD-generated target O_t (only for ``object_mask="target"``).  Stage 1's M is
``mask_image`` (and, for the ``separate_reference`` reading, e_b's mask is 1 - ``mask_reference``
on the reference); stage 2's M_t is the object mask of the image L_obj is computed on, or
``mask_target`` (the paper's M_t, :mod:`.finetune`), and its M_r the object mask of the image L_bg
is computed on (with the default sources: ``mask_image`` and ``mask_reference``).  Images and masks
are brought to one square working size with the same geometry (shorter side resized, centre crop),
masks then onto the latent grid by :func:`.masks.latent_mask`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..checkpoint import Plan
from ..images import load_image, pil_to_tensor, square
from ..seam import LatentDiffusion
from .embedding import LayerEmbeddingConfig, LayerEmbeddings, optimize_layers
from .finetune import LayeredFineTuneConfig, LayeredFineTuneResult, finetune_layered
from .guidance import GuidanceConfig, iterative_sample
from .interpolate import ALPHA, interpolate_layers
from .routing import CLI_NAMES, stage1_masks, stage2_masks

__all__ = ["LayerDiffusionEdit", "edit", "load_image", "load_mask", "prepare_masks"]


@dataclass
class LayerDiffusionEdit:
    e_a: torch.Tensor  # the encodings of T_a, T_b before stage 1
    e_b: torch.Tensor
    layers: LayerEmbeddings  # e^_a, e^_b
    alpha: float
    e_opt: torch.Tensor
    tuned: LayeredFineTuneResult

    def render(self, model: LatentDiffusion, shape: tuple[int, ...], config: GuidanceConfig = GuidanceConfig(),
               seed: int = 0, trace: list[int] | None = None) -> torch.Tensor:
        """Decoded image(s) [B, 3, H, W] in [0, 1]: eq. 8 with the fine-tuned model."""
        uncond = model.encode_text([""])
        with model.adapted(self.tuned.weight_functions()) as tuned:
            latent = iterative_sample(tuned, self.layers.e_a, self.e_opt, uncond, shape, config, seed, trace=trace)
        return model.decode(latent)


def load_mask(mask: str | Path | Image.Image, size: int) -> torch.Tensor:
    """A mask image (white = object; any mode, read as grey levels) -> [1, S, S] in [0, 1], with the
    geometry of :func:`load_image` (box filter: each output pixel is its area's mean coverage)."""
    img = (mask if isinstance(mask, Image.Image) else Image.open(mask)).convert("L")
    return pil_to_tensor(square(img, size, Image.BOX))[:1]


def prepare_masks(mask_image: torch.Tensor, mask_reference: torch.Tensor | None, latent_hw: tuple[int, int],
                  emb_config: LayerEmbeddingConfig, ft_config: LayeredFineTuneConfig,
                  image_hw: tuple[int, int] | None = None, reference_hw: tuple[int, int] | None = None,
                  rule: str = "area", mask_target: torch.Tensor | None = None,
                  target_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor | None]:
    """The latent masks every term needs, checked before any work: {"M": stage 1's object mask of the
    image, "M_ref": the reference's object mask (None without one), "M_t", "M_r": stage 2}
    (:mod:`.routing`, the nodes' routing too, with the CLI's names).

    ValueErrors name the mask ("mask_image", "mask_reference", "mask_target"): a wrong size, an empty
    object mask, no background left where a background term needs one, a mask a setting needs missing.
    """
    m_img, m_ref = stage1_masks(mask_image, mask_reference, latent_hw, emb_config, image_hw, reference_hw, rule,
                                CLI_NAMES)
    m_t, m_r = stage2_masks(mask_image, mask_reference, mask_target, latent_hw, ft_config, image_hw, reference_hw,
                            target_hw, rule, CLI_NAMES)
    return {"M": m_img, "M_ref": m_ref, "M_t": m_t, "M_r": m_r}


def edit(model: LatentDiffusion, image: torch.Tensor, reference: torch.Tensor | None, object_text: str,
         background_text: str, mask_image: torch.Tensor, mask_reference: torch.Tensor | None,
         emb_config: LayerEmbeddingConfig = LayerEmbeddingConfig(), alpha: float = ALPHA,
         ft_config: LayeredFineTuneConfig = LayeredFineTuneConfig(), rule: str = "area",
         log=print, mask_target: torch.Tensor | None = None, checkpoints: Plan | None = None) -> LayerDiffusionEdit:
    """Stages 1-2 (and eq. 3) for ``image``, ``reference`` [1, 3, H, W] in [0, 1] (same size) and pixel
    masks [1, H, W] in [0, 1] (``mask_target``: the object mask of O_t, for ``object_mask="target"``;
    ``checkpoints``: both stages' checkpoints, :mod:`core.checkpoint`)."""
    if reference is None and (emb_config.needs_reference or ft_config.needs_reference):
        raise ValueError("reference: missing; " + ("the fine-tuning computes a term on the reference image"
                                                   if ft_config.needs_reference else
                                                   f"the {emb_config.reading} reading trains e_b on it"))
    latent = model.encode(image)
    ref_latent = model.encode(reference) if reference is not None else None
    hw = tuple(latent.shape[-2:])
    masks = prepare_masks(mask_image, mask_reference, hw, emb_config, ft_config, tuple(image.shape[-2:]),
                          tuple(reference.shape[-2:]) if reference is not None else None, rule, mask_target,
                          tuple(mask_target.shape[-2:]) if mask_target is not None else None)
    e_a, e_b = model.encode_text([object_text]), model.encode_text([background_text])

    def progress(name):
        def on_step(i, n, info):
            if i == 1 or i % max(1, n // 10) == 0 or i == n:
                terms = "  ".join(f"{k} {v:.4f}" for k, v in info["terms"].items())
                log(f"  {name} {i}/{n}  loss {info['loss']:.4f}  ({terms})")
        return on_step

    t0 = time.perf_counter()
    layers = optimize_layers(model, latent, e_a, e_b, masks["M"], emb_config, ref_latent, masks["M_ref"],
                             on_step=progress("embeddings"), checkpoints=checkpoints)
    log(f"stage 1 (layered embeddings, {emb_config.reading}, {emb_config.steps} steps): "
        f"{time.perf_counter() - t0:.1f} s")
    e_opt = interpolate_layers(layers.e_a, layers.e_b, alpha)
    t0 = time.perf_counter()
    tuned = finetune_layered(model, latent, ref_latent, e_opt, masks["M_t"], masks["M_r"], ft_config,
                             on_step=progress(f"fine-tune ({ft_config.mode})"), checkpoints=checkpoints)
    log(f"stage 2 (layered fine-tune, {ft_config.steps} steps, {tuned.trainable_parameters:,} trainable): "
        f"{time.perf_counter() - t0:.1f} s")
    return LayerDiffusionEdit(e_a, e_b, layers, float(alpha), e_opt, tuned)
