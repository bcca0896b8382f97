"""SINE's training recipe (:mod:`core.recipes`): the fine-tune stage of the shared Fine-Tune Model node.

SINE (Zhang et al., CVPR 2023) has no embedding stage.  Its fine-tune stage is
:func:`.finetune.finetune_sine` at the fine-tune prompt c^: the whole image (paper: 800 steps) or
patches with the positional map F(v) (paper: 10,000 steps), optionally the text encoder too (the
official code), in which case the stage needs the model's text encoder (a CLIP on the node) and the
output carries the text delta.  A patch-trained model needs F(v) at every sampling: the outcome's
``input_map`` is that map, which the output MODEL keeps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..lora import LoRAConfig
from ..recipes import EmbeddingOutcome, FineTuneOutcome, RecipeInputError, StageRequest
from .finetune import DEFAULT_STEPS, SineFineTuneConfig, SineFineTuneResult, finetune_sine
from .positional import PositionalMap

log = logging.getLogger("comfyui-single-image-edit")

PATCH_SIZE = 512  # with patches the UNet sees 512x512 crops whatever the image size


@dataclass
class SineTrained:
    """The ``trained`` output of a SINE fine-tune: the result and the prompt it was tuned at."""

    result: SineFineTuneResult
    prompt: str


@dataclass(frozen=True)
class SineRecipe:
    """SINE's fine-tuning choices (everything Imagic's fine-tune does not have)."""

    prompt: str = "a photo of a sks dog"
    patches: bool = False
    whole_fraction: float = 0.0
    pooled_x0_weight: float = 0.0
    train_text_encoder: bool = False
    text_learning_rate: float = 0.0  # 0: the UNet's when text_mode == the UNet's mode, else text_mode's default
    method: str = "sine"
    text_mode: str = "full"  # full: every text-model parameter (official code); lora: adapters

    @property
    def title(self) -> str:
        return "SINE: Fine-Tune Recipe"

    def inputs(self, stage: str) -> frozenset[str]:
        return frozenset({"clip"})  # the text encoder, trained when the recipe says so

    def default_steps(self, stage: str) -> int:
        return DEFAULT_STEPS[bool(self.patches)]

    def check(self, stage: str, connected) -> None:
        if stage == "embedding":
            raise RecipeInputError("recipe", "SINE has no embedding stage (it fine-tunes at the fine-tune prompt)",
                                   "connect SINE: Fine-Tune Recipe to Fine-Tune Model only")
        if self.train_text_encoder and connected.get("clip") is None:
            raise RecipeInputError("clip", "the recipe trains the text encoder, but no CLIP is connected",
                                   "connect the checkpoint's CLIP to Fine-Tune Model, or turn train_text_encoder "
                                   "off")

    def trains_at(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return (PATCH_SIZE, PATCH_SIZE) if self.patches else image_hw

    def optimize_embedding(self, r: StageRequest) -> EmbeddingOutcome:
        self.check("embedding", r.extra)
        raise AssertionError("unreachable")

    def finetune(self, r: StageRequest) -> FineTuneOutcome:
        self.check("finetune", {**r.extra, "clip": True if r.text_encoder else None})
        if self.train_text_encoder and getattr(r.model, "pooled_dim", 0):
            raise RecipeInputError("train_text_encoder", "the pack trains SD 1.x's text encoder, not SDXL's two "
                                   "(this MODEL is SDXL)", "turn train_text_encoder off on SINE: Fine-Tune Recipe: "
                                   "the UNet is fine-tuned alone")
        config = SineFineTuneConfig(mode=r.mode, steps=int(r.steps), lr=r.lr,
                                    lora=LoRAConfig(rank=int(r.rank), alpha=float(r.rank)), patches=self.patches,
                                    whole_fraction=self.whole_fraction if self.patches else None,
                                    pooled_x0_weight=self.pooled_x0_weight, seed=int(r.seed),
                                    gradient_checkpointing=r.gradient_checkpointing,
                                    train_text_encoder=self.train_text_encoder,
                                    text_lr=self.text_learning_rate or None, text_mode=self.text_mode,
                                    optimizer=r.optimizer(SineFineTuneConfig.optimizer))
        if not self.train_text_encoder and r.text_encoder:
            check_conditioning_text(r.model, r.cond, self.prompt)
        res = finetune_sine(r.model, r.image, r.cond, config, on_step=r.on_step, should_stop=r.should_stop,
                            prompt=self.prompt if self.train_text_encoder else None, checkpoints=r.checkpoints,
                            previews=r.previews)
        kind = f"{r.mode}{', patches' if self.patches else ''}{', text encoder' if self.train_text_encoder else ''}"
        return FineTuneOutcome(res.file_delta, res.losses, res.seconds, f"SINE fine-tuning loss ({kind})",
                               SineTrained(res, self.prompt), text_trained=bool(res.text_delta),
                               input_map=PositionalMap(res.channels, mode="bilinear") if res.positional else None,
                               summary=f"SINE fine-tune ({kind}, {res.trainable_parameters} trainable parameters)")


def check_conditioning_text(model, cond: torch.Tensor, prompt: str) -> None:
    """Log when the conditioning training will use is not the recipe's prompt through the model's text encoder
    (the file records the conditioning, so an edit still gets exactly the trained c^; the prompt is then a label)."""
    own = model.encode_text([prompt])[0].float().cpu()
    c = cond.detach().float().cpu().reshape(-1, *cond.shape[-2:])[0]
    if c.shape != own.shape or float((own - c).abs().max()) > 1e-3 * float(own.abs().max()):
        log.warning("SINE fine-tune: the conditioning input is not the recipe's prompt %r through this CLIP; "
                    "training uses the conditioning, and Save SINE records it as c^ (the prompt is only a label)",
                    prompt)
