"""Imagic's training recipe (:mod:`core.recipes`): what the shared nodes run when no recipe is connected.

* embedding stage: eq. 2 over e from e_tgt, the model frozen (:func:`.embedding.optimize_embedding`;
  SD ports: 500 Adam steps at lr 1e-3);
* fine-tune stage: eq. 2 over theta at the frozen e_opt (:func:`.finetune.finetune`; SD ports: 1,000
  steps; lr 1e-4 for LoRA, 2e-6 for the full UNet); the result is a :class:`core.trained.Trained`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..lora import LoRAConfig
from ..recipes import EmbeddingOutcome, FineTuneOutcome, StageRequest
from ..trained import Trained
from .embedding import EmbeddingConfig, optimize_embedding
from .finetune import FineTuneConfig, finetune


@dataclass(frozen=True)
class ImagicRecipe:
    method: str = "imagic"

    @property
    def title(self) -> str:
        return "Imagic (no recipe connected)"

    def inputs(self, stage: str) -> frozenset[str]:
        return frozenset()

    def default_steps(self, stage: str) -> int:
        return EmbeddingConfig().steps if stage == "embedding" else FineTuneConfig().steps

    def check(self, stage: str, connected) -> None:
        """Imagic needs no optional input."""

    def trains_at(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return image_hw

    def optimize_embedding(self, r: StageRequest) -> EmbeddingOutcome:
        latent = r.model.encode(r.image).clone()  # [1, 4, H/8, W/8]
        config = EmbeddingConfig(int(r.steps), float(r.lr), int(r.seed), r.gradient_checkpointing)
        res = optimize_embedding(r.model, latent, r.cond.to(latent.device), config, on_step=r.on_step,
                                 should_stop=r.should_stop, checkpoints=r.checkpoints, previews=r.previews)
        return EmbeddingOutcome(res.e_opt, res.losses, res.seconds, "Imagic embedding optimisation loss")

    def finetune(self, r: StageRequest) -> FineTuneOutcome:
        config = FineTuneConfig(mode=r.mode, steps=int(r.steps), lr=r.lr,
                                lora=LoRAConfig(rank=int(r.rank), alpha=float(r.rank)), seed=int(r.seed),
                                gradient_checkpointing=r.gradient_checkpointing, optimizer=r.optimizer("adam"))
        latent = r.model.encode(r.image).clone()
        res = finetune(r.model, latent, r.cond.to(latent.device), config, on_step=r.on_step,
                       should_stop=r.should_stop, checkpoints=r.checkpoints, previews=r.previews)
        trained = Trained(res.delta, r.mode, r.cond.cpu(), {"steps": int(r.steps), "lr": config.learning_rate,
                                                            "rank": int(r.rank) if r.mode == "lora" else None,
                                                            "final_loss": res.losses[-1]})
        return FineTuneOutcome(res.delta, res.losses, res.seconds, f"Imagic fine-tuning loss ({r.mode})", trained,
                               summary=f"Imagic fine-tune ({r.mode}, {res.trainable_parameters} trainable "
                                       "parameters)")
