"""LayerDiffusion stage 2: layered diffusion fine-tuning at the frozen e_opt (Li et al. 2023, §3.2.2, eqs. 4-6).

    L_obj = E || M_t * (eps - f_theta(x_t, t, e_opt)) ||^2                 (4)
    L_bg  = E || (1 - M_r) * (eps - f_theta(x_t, t, e_opt)) ||^2           (5)
    L     = lambda_1 L_obj + lambda_2 L_bg,   lambda_1 = 2, lambda_2 = 1   (6)

(lambda_1 = 3 "for smaller foreground objects", §4.3.)  lr 2e-6 on the full UNet, 250 steps (§3.3);
both terms are :class:`core.fit.Term` s, one loss curve each ("obj", "bg"); a lambda of 0 gives the
ablations of Table 1 (a), (b).

**Which latent each term's x_t comes from (the paper does not say; methods.md §4.2).**  Default:
L_obj on the *input image* (``object_source="image"``): the subject whose "unique characteristics"
the method preserves is the input image's; L_bg on the *reference image*
(``background_source="reference"``): the edit should make "the edited image as close as possible
to the reference background image" (§4.2).  Either source can be switched (``"image"`` /
``"reference"``), e.g. both terms on the input image when the reference is a foreground reference
or when only the object is edited in its own scene.  Both terms share each step's (t, eps) draw and
run as one batch-2 call (:class:`.masks.SharedDraw`).

**Where M_t comes from (``object_mask``).**  The paper takes M_t with SAM "from O_t", the image SD
generates from the target text T (§3.2.2), and M_r from the reference O_r.  ``object_mask="image"``
(default, our choice): M_t is the object mask *of the image L_obj noises* (the input photo's, with
the default source), because a pixel mask only selects the object on the image it was taken on: the
photo's subject sits where the photo's mask is, not where the subject of a generated O_t happens to
be.  ``object_mask="target"`` (the paper as written): M_t is the object mask of O_t, applied to the
latent L_obj noises (so L_obj fits the photo's content inside the region the target gives the
object, its new place and size).  The callers (:func:`.pipeline.prepare_masks`, the fine-tune node)
pick the mask; :func:`finetune_layered` uses the ``mask_t`` it is given.  ``mask_r`` is always the
object mask of the image L_bg noises.

Modes, as :mod:`core.imagic.finetune` (same helpers, same delta layout, :func:`core.lora.trained_delta`):
``"lora"`` (default, the pack's rule for memory: LoRA on every UNet conv/linear weight, lr 1e-4 as
Imagic's LoRA default) and ``"full"`` (the paper: every UNet parameter, lr 2e-6, as a float32 copy).
The base model is never modified; the result is a delta in ComfyUI's LoRA-file layout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..fit import FitConfig, OnStep, ShouldStop, Term, check_optimizer, fit
from ..inplace import trainables
from ..lora import LoRAConfig, check_fine_tune, delta_functions
from ..checkpoint import Plan, settings_of, stage_checkpointing
from ..losses import NoiseDraw
from ..previews import Previews, one_step_x0, with_previews
from ..seam import Denoiser, LatentDiffusion
from ..seeds import derive_seed
from .masks import REDUCTIONS, SharedDraw, background_mask, masked_eps_mse

DEFAULT_LR = {"lora": 1e-4, "full": 2e-6}
SOURCES = ("image", "reference")
OBJECT_MASKS = ("image", "target")  # where M_t comes from: the image L_obj noises, or O_t (the paper)


@dataclass(frozen=True)
class LayeredFineTuneConfig:
    mode: str = "lora"
    steps: int = 250  # §3.3
    lr: float | None = None  # None: DEFAULT_LR[mode] (full: the paper's 2e-6)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    lambda_obj: float = 2.0  # lambda_1 (3 for small objects)
    lambda_bg: float = 1.0  # lambda_2
    object_source: str = "image"  # the latent L_obj noises
    background_source: str = "reference"  # the latent L_bg noises
    object_mask: str = "image"  # M_t: the object mask of the image L_obj noises, or "target": O_t's (the paper)
    reduction: str = "image"  # :func:`.masks.masked_eps_mse`
    seed: int = 0
    gradient_checkpointing: bool = False
    optimizer: str = "adam"  # "adam8bit": 8-bit moments (bitsandbytes, core.fit.make_optimizer)
    in_place: bool = True  # full: train the model's own float32 weights, restored after (core.inplace), where allowed

    def __post_init__(self):
        check_fine_tune(self.mode, self.steps, self.lr)
        check_optimizer(self.optimizer)
        if not (self.lambda_obj >= 0 and self.lambda_bg >= 0) or self.lambda_obj + self.lambda_bg == 0:
            raise ValueError(f"lambda_obj and lambda_bg must be >= 0 and not both 0, got {self.lambda_obj}, "
                             f"{self.lambda_bg}")
        for name in ("object_source", "background_source"):
            if getattr(self, name) not in SOURCES:
                raise ValueError(f"{name} must be 'image' or 'reference', got {getattr(self, name)!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")
        if self.object_mask not in OBJECT_MASKS:
            raise ValueError(f"object_mask must be one of {', '.join(OBJECT_MASKS)}, got {self.object_mask!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def needs_reference(self) -> bool:
        return "reference" in (self.object_source, self.background_source)

    @property
    def needs_target(self) -> bool:
        """Whether M_t is the object mask of the SD-generated target O_t (give that mask)."""
        return self.object_mask == "target"


@dataclass
class LayeredFineTuneResult:
    mode: str
    delta: dict[str, torch.Tensor]  # ComfyUI LoRA-file layout (core.lora)
    deltas: Mapping[str, torch.Tensor]  # {canonical parameter name: delta} (core.lora.Deltas: LoRA ones as factors)
    losses: list[float]  # lambda_1 L_obj + lambda_2 L_bg per step
    terms: dict[str, list[float]]  # "obj", "bg": each term's (unweighted) value per step
    seconds: float
    trainable_parameters: int

    def weight_functions(self, strength: float = 1.0) -> dict[str, nn.Module]:
        """W -> W + strength * delta for every trained parameter (to apply through the seam)."""
        return delta_functions(self.deltas, strength)


def layered_terms(model: Denoiser, obj_latent: torch.Tensor, bg_latent: torch.Tensor, e_opt: torch.Tensor,
                  mask_t: torch.Tensor, mask_r: torch.Tensor, lambda_obj: float = 2.0, lambda_bg: float = 1.0,
                  reduction: str = "image") -> tuple[list[Term], SharedDraw]:
    """Eqs. 4-6 as two weighted terms on batches ``(t, eps)`` (both terms at the same draw), and
    their shared predictor.  ``mask_r`` is the *object* mask of ``bg_latent``'s image: L_bg uses 1 - M_r."""
    bg_mask = background_mask(mask_r, "M_r (reference object mask)")
    draw = SharedDraw(model, torch.cat([obj_latent, bg_latent]), torch.cat([e_opt, e_opt]))
    return [Term("obj", lambda b: masked_eps_mse(draw(b)[0:1], b[1], mask_t, reduction), lambda_obj),
            Term("bg", lambda b: masked_eps_mse(draw(b)[1:2], b[1], bg_mask, reduction), lambda_bg)], draw


def finetune_layered(model: LatentDiffusion, image_latent: torch.Tensor, reference_latent: torch.Tensor | None,
                     e_opt: torch.Tensor, mask_t: torch.Tensor, mask_r: torch.Tensor,
                     config: LayeredFineTuneConfig = LayeredFineTuneConfig(), on_step: OnStep | None = None,
                     should_stop: ShouldStop | None = None, checkpoints: Plan | None = None,
                     previews: Previews | None = None) -> LayeredFineTuneResult:
    """Fine-tune ``model`` (through weight functions; the base is untouched) on eq. 6 at ``e_opt`` [1, 77, D].

    ``image_latent``, ``reference_latent``: model-space latents [1, 4, h, w] (the reference may be
    None when neither source is "reference"); ``mask_t``, ``mask_r``: object masks [1, 1, h, w] on the
    latent grid (:func:`.masks.latent_mask`): ``mask_t`` the M_t that ``config.object_mask`` names (the
    object mask of the image L_obj noises, or O_t's), ``mask_r`` the object mask of the image L_bg noises.
    ``checkpoints``: write the run's state and / or continue one (:mod:`core.checkpoint`); ``previews``:
    the tuned model's one-step x0 of the latent L_obj noises, at e_opt, every N steps (:mod:`core.previews`).
    """
    if config.needs_reference and reference_latent is None:
        raise ValueError("this configuration computes a term on the reference image: give reference_latent")
    device = torch.device(model.device)
    latents = {"image": image_latent, "reference": reference_latent if reference_latent is not None else image_latent}
    latents = {k: v.detach().to(device, torch.float32) for k, v in latents.items()}
    obj, bg = latents[config.object_source], latents[config.background_source]
    if obj.shape != bg.shape:
        raise ValueError(f"the image and reference latents differ in shape: {tuple(obj.shape)} vs {tuple(bg.shape)}; "
                         "resize both images to the same size")
    e_opt = e_opt.detach().to(device, torch.float32)
    mask_t, mask_r = (m.detach().to(device, torch.float32) for m in (mask_t, mask_r))
    params = model.unet_parameters()
    noise = NoiseDraw(derive_seed(config.seed, 1), len(model.alphas_cumprod))
    settings = {**settings_of(config, ("steps", "gradient_checkpointing", "optimizer", "in_place")),
                **({"optimizer": config.optimizer} if config.optimizer != "adam" else {})}  # as before the field
    ck = stage_checkpointing(checkpoints, "layerdiffusion", "finetune", params, settings,
                             {"object_latent": obj, "background_latent": bg, "e_opt": e_opt, "mask_t": mask_t,
                              "mask_r": mask_r}, {"noise": noise.gen})
    t0 = time.perf_counter()
    with trainables(model, config.mode, params, config.lora, config.seed, device, config.in_place) as tr, \
            model.adapted(tr.fns, config.gradient_checkpointing) as m:
        terms, draw = layered_terms(m, obj, bg, e_opt, mask_t, mask_r, config.lambda_obj, config.lambda_bg,
                                    config.reduction)
        show = with_previews(on_step, previews, lambda: one_step_x0(m.eps, obj, e_opt, model.alphas_cumprod,
                                                                    previews.timesteps, previews.seed))
        res = fit(tr.params, lambda step: noise(obj), terms,
                  FitConfig(config.steps, config.learning_rate, optimizer=config.optimizer, what="layered fine-tuning",
                            step_in_backward=config.mode == "full"), device,
                  on_step=show, should_stop=should_stop, checkpointing=ck)
        draw.clear()
        delta, deltas = tr.result(config.mode, params)
        trainable = sum(p.numel() for p in tr.params)
    return LayeredFineTuneResult(config.mode, delta, deltas, res.losses, res.terms, time.perf_counter() - t0,
                                 trainable)
