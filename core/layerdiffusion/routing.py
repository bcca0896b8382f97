"""Which mask each LayerDiffusion term uses: the routing, once, for the nodes' recipe and the CLI.

Stage 1 (eq. 2): M, the input image's object mask; with a reading that trains e_b on the reference,
M_ref, the reference's object mask (all background is legitimate there: e_b trains on 1 - M_ref).

Stage 2 (eqs. 4-6): M_t, the object mask of the image L_obj noises (``object_source``), or, with
``object_mask="target"``, the object mask of the SD-generated target O_t (the paper's M_t); M_r, the
object mask of the image L_bg noises (``background_source``), whose complement must leave some
background.

Masks are pixel masks [H, W] or [B, H, W] in [0, 1]; each function returns them on the latent grid
[1, 1, h, w] (:func:`.masks.latent_mask`).  A ValueError starts with the name of the mask at fault, as
the caller calls it (:class:`MaskNames`: the nodes' inputs or the CLI's options).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .embedding import LayerEmbeddingConfig
from .finetune import LayeredFineTuneConfig
from .masks import background_mask, latent_mask

HW = Sequence[int] | None


@dataclass(frozen=True)
class MaskNames:
    image: str = "mask"  # the input image's object mask
    reference: str = "reference_mask"  # the reference's object mask M_r
    target: str = "target_mask"  # O_t's object mask


NODE_NAMES = MaskNames()
CLI_NAMES = MaskNames("mask_image", "mask_reference", "mask_target")


def stage1_masks(mask_image: torch.Tensor, mask_reference: torch.Tensor | None, latent_hw: Sequence[int],
                 config: LayerEmbeddingConfig, image_hw: HW = None, reference_hw: HW = None, rule: str = "area",
                 names: MaskNames = NODE_NAMES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M, M_ref or None) for the embedding stage."""
    m_img = latent_mask(mask_image, latent_hw, image_hw, names.image, rule)
    if config.reading == "separate":
        background_mask(m_img, f"{names.image} (stage 1 trains e_b on the background)")
    if mask_reference is None:
        if config.needs_reference:
            raise ValueError(f"{names.reference}: missing; the {config.reading} reading trains e_b on the "
                             "reference image's background")
        return m_img, None
    m_ref = latent_mask(mask_reference, latent_hw, reference_hw, names.reference, rule, allow_empty=True)
    if config.needs_reference:
        background_mask(m_ref, f"{names.reference} (stage 1 trains e_b on the reference's background)")
    return m_img, m_ref


def stage2_masks(mask_image: torch.Tensor | None, mask_reference: torch.Tensor | None,
                 mask_target: torch.Tensor | None, latent_hw: Sequence[int], config: LayeredFineTuneConfig,
                 image_hw: HW = None, reference_hw: HW = None, target_hw: HW = None, rule: str = "area",
                 names: MaskNames = NODE_NAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_t, M_r) for the fine-tune stage."""
    sources = {"image": (names.image, mask_image, image_hw, "the fine-tuning needs the image's object mask"),
               "reference": (names.reference, mask_reference, reference_hw,
                             "the fine-tuning computes a term on the reference image")}
    used = [config.background_source] + ([] if config.needs_target else [config.object_source])
    for source in used:
        name, mask, _, why = sources[source]
        if mask is None:
            raise ValueError(f"{name}: missing; {why}")
    if config.needs_target:
        if mask_target is None:
            raise ValueError(f"{names.target}: missing; object_mask 'target' takes M_t from the target image O_t")
        m_t = latent_mask(mask_target, latent_hw, target_hw, names.target, rule)
    else:
        name, mask, hw, _ = sources[config.object_source]
        m_t = latent_mask(mask, latent_hw, hw, name, rule)
    name, mask, hw, _ = sources[config.background_source]
    m_r = latent_mask(mask, latent_hw, hw, name, rule, allow_empty=True)
    background_mask(m_r, name)
    return m_t, m_r
