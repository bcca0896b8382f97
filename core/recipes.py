"""Training recipes: how one method runs the two training stages the shared nodes offer.

Imagic, SINE and LayerDiffusion each train in (up to) two stages: optimise a text embedding with the
model frozen, then fine-tune the model.  One *Optimize Text Embedding* node and one *Fine-Tune Model*
node serve every method; what a method does in each stage is its **recipe**, a frozen dataclass of
the method's choices that also runs them:

* ``method``, ``title``: the method's name and the recipe node's display name (for messages);
* ``inputs(stage)``: the shared node's optional inputs the stage reads (a connected input the recipe
  does not read is refused, naming it);
* ``default_steps(stage)``: the paper's step count (the fine-tune node's steps 0);
* ``check(stage, connected)``: refuse, before any work, an input the stage needs and does not have
  (``connected``: the node's optional inputs by name, None where unconnected);
* ``trains_at(image_hw)``: the pixel size the UNet sees while training (SINE's patches: 512x512), for
  the memory check;
* ``optimize_embedding(request)`` -> :class:`EmbeddingOutcome` (stage 1), and
  ``finetune(request)`` -> :class:`FineTuneOutcome` (stage 2); both pass the request's checkpoint plan
  and previews on to the method's trainer (:mod:`core.checkpoint`, :mod:`core.previews`).

Recipes live in their method's package (``core/imagic/recipe.py``, ``core/sine/recipe.py``,
``core/layerdiffusion/recipe.py``); the nodes only build a :class:`StageRequest` from their inputs,
call the recipe and turn the outcome into ComfyUI types.  A stage runs on the engine's seam
(:class:`core.seam.LatentDiffusion`), with pixel images [1, 3, H, W] in [0, 1] and pixel masks
[B, H, W]; an input it cannot use raises :class:`RecipeInputError` naming that input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .checkpoint import Plan
from .fit import OnStep, ShouldStop
from .previews import Previews

STAGES = ("embedding", "finetune")


class RecipeInputError(ValueError):
    """An input a recipe cannot use: ``name`` is the node input, ``problem`` what is wrong, ``fix`` the remedy."""

    def __init__(self, name: str, problem: str, fix: str = ""):
        self.name, self.problem, self.fix = name, problem, fix
        super().__init__(f"{name}: {problem}" + (f" ({fix})" if fix else ""))


@dataclass
class StageRequest:
    """One training stage as the shared nodes (or a script) ask for it."""

    model: Any  # core.seam.LatentDiffusion: encodes images, predicts noise, trains views (and the text encoder)
    image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    cond: torch.Tensor  # [1, 77, D] float32: e_tgt (embedding stage), e_opt / c^ (fine-tune stage)
    steps: int
    lr: float | None  # None: the recipe's default for the stage and mode
    seed: int
    device: torch.device
    mode: str = "lora"  # fine-tune: lora or full
    rank: int = 8
    extra: Mapping[str, Any] = field(default_factory=dict)  # the optional inputs as connected (None left out)
    text_encoder: bool = False  # the model carries a text encoder (a CLIP is connected)
    on_step: OnStep | None = None
    should_stop: ShouldStop | None = None
    checkpoints: Plan | None = None  # write the stage's checkpoints and / or continue one (core.checkpoint)
    previews: Previews | None = None  # the model's one-step x0 every N steps (core.previews)
    checkpointing: bool | None = None  # gradient checkpointing; None: on a GPU, off on the CPU
    eight_bit: bool = False  # fine-tune: the optimiser's moments in 8 bits (bitsandbytes, core.fit.make_optimizer)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.device.type == "cuda" if self.checkpointing is None else bool(self.checkpointing)

    def optimizer(self, method_default: str) -> str:
        """The method's optimiser (``adam``, ``adamw``), in its 8-bit version when asked."""
        return method_default + "8bit" if self.eight_bit else method_default


@dataclass
class EmbeddingOutcome:
    e: torch.Tensor  # [1, 77, D]: e_opt (Imagic), e^_a (LayerDiffusion)
    losses: list[float]
    seconds: float
    title: str  # the loss curve's title
    e_b: torch.Tensor | None = None  # LayerDiffusion's e^_b


@dataclass
class FineTuneOutcome:
    delta: dict[str, torch.Tensor]  # ComfyUI's LoRA layout: UNet keys, and text-encoder keys when text_trained
    losses: list[float]
    seconds: float
    title: str
    trained: Any  # what the method's save node writes
    text_trained: bool = False  # the delta also changes the text encoder (the output CLIP carries it)
    input_map: Callable | None = None  # a feature added after the UNet's first block (SINE's F(v)), kept by the MODEL
    summary: str = ""  # one line for the log


@runtime_checkable
class Recipe(Protocol):
    method: str

    @property
    def title(self) -> str: ...

    def inputs(self, stage: str) -> frozenset[str]: ...

    def default_steps(self, stage: str) -> int: ...

    def check(self, stage: str, connected: Mapping[str, Any]) -> None: ...

    def trains_at(self, image_hw: tuple[int, int]) -> tuple[int, int]: ...

    def optimize_embedding(self, request: StageRequest) -> EmbeddingOutcome: ...

    def finetune(self, request: StageRequest) -> FineTuneOutcome: ...


def check_unused(recipe: Recipe, stage: str, connected: Mapping[str, Any]) -> None:
    """Refuse a connected optional input the recipe's stage does not read, naming it."""
    reads = recipe.inputs(stage)
    for name, value in connected.items():
        if value is not None and name not in reads:
            raise RecipeInputError(name, f"{recipe.title} does not use {name} in its {stage} stage",
                                   "disconnect it, or connect the recipe of the method that uses it")
