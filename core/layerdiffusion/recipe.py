"""LayerDiffusion's training recipe (:mod:`core.recipes`) — Li et al. 2023, not the "LayerDiffuse" project.

* embedding stage (eq. 2): the object text's e_a (the node's ``conditioning``) and the background
  text's e_b (``conditioning_b``) optimised jointly under the image's object mask (``mask``); the
  ``separate_reference`` reading also trains e_b on the reference image (``reference_image``,
  ``reference_mask``);
* fine-tune stage (eqs. 4-6): lambda_1 L_obj under M_t + lambda_2 L_bg under 1 - M_r at e_opt, on the
  images and masks the recipe's sources name (:mod:`.routing`); the result is a
  :class:`core.trained.Trained` with ``method`` "layerdiffusion".

The choices the paper leaves open (which image each loss noises, how [e_a, e_b] enters the UNet, where
M_t comes from, the mask rule) and the loss weights are the recipe's fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora import LoRAConfig
from ..recipes import EmbeddingOutcome, FineTuneOutcome, RecipeInputError, StageRequest
from ..trained import Trained
from .embedding import LayerEmbeddingConfig, optimize_layers
from .finetune import LayeredFineTuneConfig, finetune_layered
from .routing import NODE_NAMES, stage1_masks, stage2_masks

FIX_MASK = "segment the same image (same size), with the object inside it"


@dataclass(frozen=True)
class LayerRecipe:
    lambda_obj: float = 2.0
    lambda_bg: float = 1.0
    object_source: str = "image"
    background_source: str = "reference"
    reading: str = "concat"  # eq. 2 as written
    reduction: str = "image"
    mask_rule: str = "area"
    object_mask: str = "image"  # M_t: the object mask of the image L_obj noises, or "target" (O_t's; the paper)
    method: str = "layerdiffusion"

    @property
    def title(self) -> str:
        return "LayerDiffusion: Recipe"

    @property
    def stage1_needs_reference(self) -> bool:
        return LayerEmbeddingConfig(reading=self.reading).needs_reference

    def inputs(self, stage: str) -> frozenset[str]:
        if stage == "embedding":
            return frozenset({"conditioning_b", "mask", "reference_image", "reference_mask"})
        return frozenset({"mask", "reference_image", "reference_mask", "target_mask"})

    def default_steps(self, stage: str) -> int:
        return LayerEmbeddingConfig().steps if stage == "embedding" else LayeredFineTuneConfig().steps

    def check(self, stage: str, connected) -> None:
        """The inputs each stage needs, present (their sizes and contents are checked when it runs)."""
        has = {name for name, value in connected.items() if value is not None}
        if stage == "embedding":
            if "conditioning_b" not in has:
                raise RecipeInputError("conditioning_b", "LayerDiffusion's layered optimisation needs the background "
                                       "text" + (" (a mask was given)" if "mask" in has else ""), "connect the "
                                       "encoded background text T_b (LayerDiffusion), or disconnect the mask")
            if "mask" not in has:
                raise RecipeInputError("mask", "LayerDiffusion's layered optimisation needs the image's object mask",
                                       "connect a MASK (Segment (SAM points / box))")
            if self.stage1_needs_reference:
                why = f"the {self.reading} reading trains e_b on the reference image's background"
                if "reference_image" not in has:
                    raise RecipeInputError("reference_image", why, "connect the reference (background) image, the "
                                           "same size as the image")
                if "reference_mask" not in has:
                    raise RecipeInputError("reference_mask", why + ", outside its object mask", "connect the "
                                           "reference's object mask (an all-black mask for a pure background)")
            return
        config = LayeredFineTuneConfig(object_source=self.object_source, background_source=self.background_source,
                                       object_mask=self.object_mask)
        used = [self.background_source] + ([] if config.needs_target else [self.object_source])
        if "image" in used and "mask" not in has:
            raise RecipeInputError("mask", "a LayerDiffusion fine-tune needs the image's object mask",
                                   "connect the input image's object mask (Segment (SAM points / box))")
        if config.needs_target and "target_mask" not in has:
            raise RecipeInputError("target_mask", "the recipe's object_mask 'target' takes M_t from the target image "
                                   "O_t", FIXES["missing"]["target_mask"])
        if config.needs_reference:
            if "reference_image" not in has:
                raise RecipeInputError("reference_image", "the recipe computes a loss on the reference image (or set "
                                       "both sources to image)", "connect the reference (background) image, the "
                                       "same size as the image")
            if "reference_mask" not in has:
                raise RecipeInputError("reference_mask", "the recipe computes a loss on the reference image, which "
                                       "needs its object mask M_r", FIXES["missing"]["reference_mask"])

    def trains_at(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return image_hw

    # ------------------------------------------------------------------------------------------ stage 1
    def optimize_embedding(self, r: StageRequest) -> EmbeddingOutcome:
        self.check("embedding", r.extra)
        e_b, mask = r.extra["conditioning_b"], r.extra["mask"]
        config = LayerEmbeddingConfig(steps=int(r.steps), lr=float(r.lr), reading=self.reading,
                                      reduction=self.reduction, seed=int(r.seed),
                                      gradient_checkpointing=r.gradient_checkpointing)
        ref = _reference(r) if config.needs_reference else None
        ref_mask = r.extra.get("reference_mask") if config.needs_reference else None
        latent = r.model.encode(r.image).clone()  # [1, 4, h, w]
        hw = tuple(latent.shape[-2:])
        m, m_ref = _routed(lambda: stage1_masks(_first(mask, "mask"), _first(ref_mask, "reference_mask"), hw, config,
                                                tuple(r.image.shape[-2:]), _hw(ref), self.mask_rule))
        ref_latent = r.model.encode(ref).clone() if ref is not None else None
        e_a = r.cond.to(latent.device)
        res = optimize_layers(r.model, latent, e_a, e_b.to(latent.device), m, config, ref_latent,
                              m_ref if config.needs_reference else None, on_step=r.on_step,
                              should_stop=r.should_stop, checkpoints=r.checkpoints, previews=r.previews)
        return EmbeddingOutcome(res.e_a, res.losses, res.seconds, f"LayerDiffusion embedding loss ({res.reading})",
                                e_b=res.e_b)

    # ------------------------------------------------------------------------------------------ stage 2
    def finetune(self, r: StageRequest) -> FineTuneOutcome:
        config = LayeredFineTuneConfig(mode=r.mode, steps=int(r.steps), lr=r.lr,
                                       lora=LoRAConfig(rank=int(r.rank), alpha=float(r.rank)),
                                       lambda_obj=self.lambda_obj, lambda_bg=self.lambda_bg,
                                       object_source=self.object_source, background_source=self.background_source,
                                       object_mask=self.object_mask, reduction=self.reduction, seed=int(r.seed),
                                       gradient_checkpointing=r.gradient_checkpointing, optimizer=r.optimizer("adam"))
        self.check("finetune", r.extra)
        ref = _reference(r) if config.needs_reference else None
        mask, ref_mask, target = (r.extra.get(k) for k in ("mask", "reference_mask", "target_mask"))
        latent = r.model.encode(r.image).clone()
        hw = tuple(latent.shape[-2:])
        m_t, m_r = _routed(lambda: stage2_masks(
            _first(mask, "mask"), _first(ref_mask, "reference_mask"), _first(target, "target_mask"), hw, config,
            tuple(r.image.shape[-2:]), _hw(ref), tuple(r.image.shape[-2:]), self.mask_rule))
        ref_latent = r.model.encode(ref).clone() if ref is not None else None
        res = finetune_layered(r.model, latent, ref_latent, r.cond.to(latent.device), m_t, m_r, config,
                               on_step=r.on_step, should_stop=r.should_stop, checkpoints=r.checkpoints,
                               previews=r.previews)
        trained = Trained(res.delta, r.mode, r.cond.cpu(), {"method": "layerdiffusion", "steps": int(r.steps),
                                                            "lambda_obj": self.lambda_obj,
                                                            "lambda_bg": self.lambda_bg,
                                                            "final_loss": res.losses[-1]})
        return FineTuneOutcome(res.delta, res.losses, res.seconds, f"LayerDiffusion fine-tuning loss ({r.mode})",
                               trained, summary=f"LayerDiffusion fine-tune ({r.mode})")


FIXES = {"missing": {"mask": "connect the input image's object mask (Segment (SAM points / box))",
                     "target_mask": "connect the SAM mask of O_t (the image SD generates from the target text), or "
                                    "set the recipe's object_mask to image",
                     "reference_mask": "connect it (an all-black mask for a pure background)"},
         "background": "the object mask must leave some background (the background terms train on it)"}


def _routed(call):
    """Run a routing function; its ValueError (which starts with the mask's name) becomes a RecipeInputError."""
    try:
        return call()
    except ValueError as e:
        name, _, problem = str(e).partition(": ")
        name = name.split(" ")[0]
        if problem.startswith("missing"):
            fix = FIXES["missing"].get(name, "")
        elif "background" in problem:
            fix = FIXES["background"]
        else:
            fix = FIX_MASK
        raise RecipeInputError(name if name in NODE_NAMES.__dict__.values() else "mask", problem, fix) from None


def _first(mask, name: str) -> torch.Tensor | None:
    """A ComfyUI MASK ([B, H, W] or [H, W]): its first mask, float32; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise RecipeInputError(name, f"expected a MASK, got {type(mask).__name__}",
                               "connect a MASK (e.g. from Segment (SAM points / box))")
    m = mask.float()
    return m[:1] if m.ndim == 3 else m


def _hw(image: torch.Tensor | None):
    return tuple(image.shape[-2:]) if image is not None else None


def _reference(r: StageRequest) -> torch.Tensor:
    """The reference image [1, 3, H, W] (present: :meth:`LayerRecipe.check`), the size of the image."""
    ref = r.extra["reference_image"]
    if ref.shape[-2:] != r.image.shape[-2:]:
        raise RecipeInputError("reference_image", f"it is {ref.shape[-1]}x{ref.shape[-2]} but the image is "
                               f"{r.image.shape[-1]}x{r.image.shape[-2]}", "scale both to the same size (Upscale "
                               "Image)")
    return ref
