"""Imagic stage 2: fine-tune the denoiser on the image at the frozen e_opt (Imagic Sec. 3.1).

Same loss as stage 1 (eq. 2), now over the denoiser's weights.  Two modes:

* ``lora`` (default): low-rank adapters on the UNet's convolution and linear weights
  (:mod:`core.lora`); a few MB of trainable parameters, default lr 1e-4;
* ``full``: every UNet parameter, as in the paper (Imagen) and the SD ports (diffusers'
  community pipeline uses lr 2e-6, the default here): the model's own float32 weights trained in
  place and restored afterwards (:mod:`core.inplace`: one copy in memory, as the pipeline), or a
  float32 copy where the back end does not allow that (ComfyUI's shared, half-precision MODEL); each
  tensor's Adam step is taken inside backward (``FitConfig.step_in_backward``: no whole set of
  gradients is held).

Either way the base model is unchanged afterwards: training runs through the seam's weight
functions (or in place, then restored) and the result is a *delta* in ComfyUI's LoRA-file layout
(LoRA tensors, or ``.diff`` tensors for full fine-tuning), applied later as native weight patches.
The image latent and the conditioning are computed once by the caller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..fit import FitConfig, OnStep, ShouldStop, check_optimizer, fit
from ..inplace import trainables
from ..lora import LoRAConfig, check_fine_tune, delta_functions
from ..losses import eps_term
from ..seam import LatentDiffusion
from ..seeds import derive_seed
from ..checkpoint import Plan
from ..previews import Previews, one_step_x0, with_previews
from .embedding import Draws, StepDraws, imagic_checkpointing

DEFAULT_LR = {"lora": 1e-4, "full": 2e-6}


@dataclass(frozen=True)
class FineTuneConfig:
    mode: str = "lora"
    steps: int = 1000
    lr: float | None = None  # None: DEFAULT_LR[mode]
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0
    gradient_checkpointing: bool = False
    optimizer: str = "adam"  # the SD ports'; "adam8bit": 8-bit moments (bitsandbytes, core.fit.make_optimizer)
    in_place: bool = True  # full: train the model's own float32 weights, restored after (core.inplace), where allowed

    def __post_init__(self):
        check_fine_tune(self.mode, self.steps, self.lr)
        check_optimizer(self.optimizer)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


@dataclass
class FineTuneResult:
    mode: str
    delta: dict[str, torch.Tensor]  # ComfyUI LoRA-file layout (see core.lora)
    deltas: Mapping[str, torch.Tensor]  # {canonical parameter name: delta} (core.lora.Deltas: LoRA ones as factors)
    losses: list[float]
    seconds: float
    trainable_parameters: int
    checkpoint: Path | None = None  # the last checkpoint written
    resumed_from: int = 0  # the step a resumed run continued from (0: a fresh run)

    def weight_functions(self, strength: float = 1.0) -> dict[str, nn.Module]:
        """W -> W + strength * delta for every trained parameter (to apply through the seam)."""
        return delta_functions(self.deltas, strength)


def finetune(model: LatentDiffusion, latent: torch.Tensor, cond: torch.Tensor,
             config: FineTuneConfig = FineTuneConfig(), mask: torch.Tensor | None = None,
             on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
             draws: Draws | None = None, checkpoints: Plan | None = None,
             previews: Previews | None = None) -> FineTuneResult:
    """Fine-tune ``model`` to reconstruct ``latent`` [1, 4, h, w] at ``cond`` [1, 77, D]
    (``draws``: the (t, eps) of each step, default: seeded by ``config.seed``; ``checkpoints``: write
    the run's state and / or continue one, see :mod:`core.checkpoint`; ``previews``: the fine-tuned
    model's one-step x0 of the latent every N steps, see :mod:`core.previews`)."""
    device = torch.device(model.device)
    latent = latent.detach().to(device, torch.float32)
    cond = cond.detach().to(device, torch.float32)
    params = model.unet_parameters()
    t0 = time.perf_counter()
    batches = StepDraws(draws, derive_seed(config.seed, 1), latent, len(model.alphas_cumprod))
    settings = {"mode": config.mode, "lr": config.learning_rate, "seed": config.seed, "rank": config.lora.rank,
                "alpha": config.lora.alpha, "targets": config.lora.targets,
                **({"optimizer": config.optimizer} if config.optimizer != "adam" else {})}
    ck = imagic_checkpointing(checkpoints, "finetune", model, settings, {"latent": latent, "cond": cond, "mask": mask},
                             batches)
    with trainables(model, config.mode, params, config.lora, config.seed, device, config.in_place) as tr, \
            model.adapted(tr.fns, config.gradient_checkpointing) as m:
        show = with_previews(on_step, previews, lambda: one_step_x0(m.eps, latent, cond, model.alphas_cumprod,
                                                                    previews.timesteps, previews.seed))
        res = fit(tr.params, batches, [eps_term("eps_mse", m, latent, cond, mask)],
                  FitConfig(config.steps, config.learning_rate, optimizer=config.optimizer, what="fine-tuning",
                            step_in_backward=config.mode == "full"), device,
                  on_step=show, should_stop=should_stop, checkpointing=ck)
        delta, deltas = tr.result(config.mode, params)
        trainable = sum(p.numel() for p in tr.params)
    losses = res.losses
    return FineTuneResult(config.mode, delta, deltas, losses, time.perf_counter() - t0, trainable, res.checkpoint,
                          res.resumed_from)
