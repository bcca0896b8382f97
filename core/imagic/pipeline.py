"""Imagic end to end outside ComfyUI (Kawar et al., CVPR 2023): stages 1-3 on one image.

Stages: (1) optimise e_tgt into e_opt (:mod:`.embedding`), (2) fine-tune the UNet at
e_opt (:mod:`.finetune`, LoRA by default), (3) sample with DDIM and classifier-free
guidance at e = eta e_tgt + (1 - eta) e_opt (:mod:`.interpolate`,
:func:`core.sampling.ddim_sample`).  The CLI is ``python -m core.imagic``.
"""


from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Plan
from ..fit import pace_text
from ..sampling import ddim_sample
from ..seam import LatentDiffusion
from .artifact import Trained, save_trained
from .embedding import Draws, EmbeddingConfig, EmbeddingResult, optimize_embedding
from .finetune import FineTuneConfig, FineTuneResult, finetune
from .interpolate import interpolate


@dataclass
class ImagicEdit:
    e_tgt: torch.Tensor
    embedding: EmbeddingResult
    tuned: FineTuneResult

    def render(self, model: LatentDiffusion, eta: float, shape, steps: int = 50, guidance: float = 7.5,
               seed: int = 0) -> torch.Tensor:
        """Decoded image(s) [B, 3, H, W] in [0, 1] for one eta."""
        uncond = model.encode_text([""])
        e = interpolate(self.e_tgt, self.embedding.e_opt, eta)
        with model.adapted(self.tuned.weight_functions()) as tuned:
            latent = ddim_sample(tuned, e, uncond, shape=shape, steps=steps, guidance=guidance, seed=seed)
        return model.decode(latent)


def edit(model: LatentDiffusion, image: torch.Tensor, prompt: str, emb_config: EmbeddingConfig,
         ft_config: FineTuneConfig, log=print, checkpoints: Plan | None = None) -> ImagicEdit:
    """Run stages 1 and 2 for ``image`` [1, 3, H, W] in [0, 1] and target ``prompt``."""
    return train_stages(model, model.encode(image), model.encode_text([prompt]), emb_config, ft_config, log,
                        checkpoints=checkpoints)


def resumed(result) -> str:
    return f", continued from step {result.resumed_from}" if result.resumed_from else ""


def train_stages(model: LatentDiffusion, latent: torch.Tensor, e_tgt: torch.Tensor, emb_config: EmbeddingConfig,
                 ft_config: FineTuneConfig, log=print,
                 draws: tuple[Draws | None, Draws | None] = (None, None),
                 checkpoints: Plan | None = None) -> ImagicEdit:
    """Stage 1 (e_tgt -> e_opt, the model frozen), then stage 2 (the model at that e_opt) on
    ``latent`` [1, 4, h, w] (model space); ``draws``: each stage's (t, eps) per step (default:
    seeded by the configs' seeds); ``checkpoints``: both stages' checkpoints (one folder, a file
    prefix per stage)."""

    def progress(name):
        def on_step(i, n, info):
            if i == 1 or i % max(1, n // 10) == 0 or i == n:
                pace = pace_text(info)
                log(f"  {name} {i}/{n}  loss {info['loss']:.4f}" + (f"  ({pace})" if pace else ""))
        return on_step

    t0 = time.perf_counter()
    emb = optimize_embedding(model, latent, e_tgt, emb_config, on_step=progress("embedding"), draws=draws[0],
                             checkpoints=checkpoints)
    log(f"stage 1 (embedding, {emb_config.steps} steps{resumed(emb)}): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    tuned = finetune(model, latent, emb.e_opt, ft_config, on_step=progress(f"fine-tune ({ft_config.mode})"),
                     draws=draws[1], checkpoints=checkpoints)
    log(f"stage 2 (fine-tune, {ft_config.steps} steps{resumed(tuned)}, {tuned.trainable_parameters:,} trainable): "
        f"{time.perf_counter() - t0:.1f} s")
    return ImagicEdit(e_tgt, emb, tuned)


def save_edit(result: ImagicEdit, path: str | Path, precision: str = "fp32") -> Path:
    """Keep the trained delta (in ``precision``, "fp32" or "fp16") and e_opt in the pack's ``sie.trained``
    file (the nodes' Save Trained format)."""
    trained = Trained(dict(result.tuned.delta), result.tuned.mode, result.embedding.e_opt,
                      {"steps": len(result.tuned.losses), "final_loss": result.tuned.losses[-1]})
    return save_trained(trained, path, precision)




