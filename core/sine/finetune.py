"""SINE fine-tuning on one image (Zhang et al., CVPR 2023, §3.3 and §4), on the engine's fit loop.

Loss: the paper's plain eps-MSE (LDM objective, t ~ U{0..T-1}) at the fine-tune prompt
("a photo of a sks dog").  Two schedules:

* without patches (paper: 800 steps): the whole image, encoded once, no positional map;
* with patches (``patches=True``, paper: 10,000 steps): each step draws a random crop and its
  box from :class:`~core.sine.patches.PatchSampler` (a seeded generator), **encodes that crop with
  ``model.encode``** (nothing is cached across steps: a crop of the 1024 image's latent is not the
  latent of the resized crop, so the official code's per-crop encoding is kept), and the UNet sees
  ``Features(input_map=PositionalMap(channels, grid), crop_box=box)``: F(v) added to its first block.

Optional extra term (official patch config only, ``scale_recon_loss: 1.0``; not in the paper),
:func:`pooled_x0_loss`: ``mean_b (t_b/T)^2 * mean |P(x0_hat_b) - P(z0_b)|`` in latent space, where
P is ``F.adaptive_avg_pool2d(., 64)`` (``LatentDiffusion.p_losses``, ``recon_loss_size: 64``): an
*output size*, so on the 64x64 latent of a 512 crop P is the identity and the term is a per-pixel
(t/T)^2-weighted L1, and on a 96x96 latent each output cell averages its adaptive 2x2 / 1x1 bins.
``pooled_x0_weight`` (default 0: the paper's plain eps-MSE; 1.0: the official patch code);
``pooled_x0_pool`` is the output size (64).  The term is always recorded as its own loss curve
("pooled_x0"); with weight 0 it adds nothing.

Modes, as in :mod:`core.imagic.finetune` (same helpers, same delta layout):

* ``lora`` (default): LoRA on every UNet conv/linear weight, lr 1e-4 (Imagic's LoRA default and the
  usual SD LoRA rate; the paper's 1e-6 is for full weights and barely moves a zero-initialised LoRA);
* ``full``: every UNet parameter, AdamW lr 1e-6, weight decay 0.01 (paper §4; official configs use
  torch's default AdamW decay 0.01).

Text encoder (``train_text_encoder``, default off): the official code trains CLIP's text encoder
with the UNet in every config (``cond_stage_trainable: true``: ``configure_optimizers`` puts
``cond_stage_model.parameters()``, every parameter of the text model, token and position
embeddings included, into the UNet's one AdamW group at lr 1e-6); the paper only says "eps_theta
and tau_theta are jointly optimized" when describing LDM.  Off by default here: it is the costlier
half of the official memory problem and the paper's §3.3 describes fine-tuning the diffusion
model.  On, the fine-tune prompt is re-encoded at every step through the adapted encoder (the
back end must be a :class:`core.seam.TrainableText`) and the result carries a second delta under
:data:`core.lora.TEXT_PREFIX`.  ``text_mode``:

* ``full`` (default, the official code): every text-model parameter (:data:`core.lora.TEXT_TRAINABLE`:
  the token embedding, so the rare token's row, the position embedding, the layers, the final
  norm), AdamW with the UNet's decay;
* ``lora``: adapters on the layers' projections and MLPs (:data:`core.lora.TEXT_LORA`), our option.

``text_lr`` None: the UNet's rate when ``text_mode`` equals ``mode`` (one group's rate, as the
official code), else the text mode's default (full: the official 1e-6; lora: 1e-4).

The c^ that training used is returned as ``c_hat`` [1, 77, D]: ``prompt_cond`` as given, or, with
the text encoder trained, the fine-tune prompt through the trained encoder.  Edit with it.
Batch sizes above 1 are left out.  The first block's channel count (for F(v)) is read from the model's
first conv weight (``input_blocks.0.0.weight``, SD's ``model_channels``; ``conv_in.weight`` for
diffusers-named models), else ``config.channels`` (default 320, SD 1.x).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import predict_x0, q_sample
from ..fit import FitConfig, OnStep, ShouldStop, Term, check_optimizer, fit
from ..lora import (TEXT_PREFIX, LoRAConfig, check_fine_tune, delta_functions, text_trainable, trainable_functions,
                    trained_delta)
from ..checkpoint import Plan, settings_of, stage_checkpointing
from ..losses import NoiseDraw, masked_mse
from ..previews import Previews, one_step_x0, with_previews
from ..seam import Features, LatentDiffusion, TrainableText
from ..inplace import trainables
from ..seeds import derive_seed
from .patches import PatchConfig, PatchSampler
from .positional import MODEL_CHANNELS, PositionalMap

DEFAULT_LR = {"lora": 1e-4, "full": 1e-6}
DEFAULT_STEPS = {False: 800, True: 10_000}  # paper §4: without / with patches
FIRST_BLOCK_NAMES = ("input_blocks.0.0.weight", "conv_in.weight")


@dataclass(frozen=True)
class SineFineTuneConfig:
    mode: str = "lora"
    steps: int | None = None  # None: 800 (no patches) / 10,000 (patches), paper §4
    lr: float | None = None  # None: DEFAULT_LR[mode]
    optimizer: str = "adamw"
    weight_decay: float = 0.01  # torch's AdamW default, as the official configs
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    patches: bool = False
    patch: PatchConfig = field(default_factory=PatchConfig)
    whole_fraction: float | None = None  # None: patch.whole_fraction (official train set: 0)
    pooled_x0_weight: float = 0.0  # 0: the paper; 1.0: the official patch config
    pooled_x0_pool: int = 64  # the output size of adaptive_avg_pool2d (official recon_loss_size)
    size: int = 512  # without patches: the square working size the caller resized to (informative)
    channels: int | None = None  # None: the model's first conv weight, else 320
    seed: int = 0
    gradient_checkpointing: bool = False
    train_text_encoder: bool = False  # the official code: on; the paper: not described; default off
    text_lr: float | None = None  # None: the UNet's rate if text_mode == mode, else DEFAULT_LR[text_mode]
    text_mode: str = "full"  # full: every text-model parameter (the official code); lora: adapters (ours)
    in_place: bool = True  # full: train the model's own float32 weights, restored after (core.inplace), where allowed

    def __post_init__(self):
        check_fine_tune(self.mode, self.steps, self.lr)
        if self.text_lr is not None and not self.text_lr > 0:
            raise ValueError(f"text_lr must be positive, got {self.text_lr}")
        if self.text_mode not in DEFAULT_LR:
            raise ValueError(f"text_mode must be 'lora' or 'full', got {self.text_mode!r}")
        check_optimizer(self.optimizer)
        if self.pooled_x0_weight < 0:
            raise ValueError(f"pooled_x0_weight must be >= 0, got {self.pooled_x0_weight}")
        if self.pooled_x0_pool < 1:
            raise ValueError(f"pooled_x0_pool (an output size) must be at least 1, got {self.pooled_x0_pool}")
        if self.whole_fraction is not None and not 0.0 <= self.whole_fraction <= 1.0:
            raise ValueError(f"whole_fraction must lie in [0, 1], got {self.whole_fraction}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def text_learning_rate(self) -> float:
        if self.text_lr is not None:
            return self.text_lr
        return self.learning_rate if self.text_mode == self.mode else DEFAULT_LR[self.text_mode]

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.patches]

    @property
    def patch_config(self) -> PatchConfig:
        if self.whole_fraction is None:
            return self.patch
        return dataclasses.replace(self.patch, whole_fraction=self.whole_fraction)


@dataclass
class SineFineTuneResult:
    mode: str
    delta: dict[str, torch.Tensor]  # ComfyUI LoRA-file layout (see core.lora)
    deltas: Mapping[str, torch.Tensor]  # {canonical parameter name: delta} (core.lora.Deltas: LoRA ones as factors)
    losses: list[float]  # weighted total per step
    terms: dict[str, list[float]]  # "eps_mse", "pooled_x0" (unweighted) per step
    seconds: float
    trainable_parameters: int
    positional: bool  # trained with F(v) (patches): edit with the whole-grid map
    channels: int = MODEL_CHANNELS
    grid_size: int = 128
    text_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA layout, TEXT_PREFIX keys
    text_deltas: Mapping[str, torch.Tensor] = field(default_factory=dict)  # {canonical text name: delta}
    c_hat: torch.Tensor | None = None  # [1, 77, D] float32 CPU: the fine-tune conditioning training used

    @property
    def file_delta(self) -> dict[str, torch.Tensor]:
        """UNet and text-encoder deltas in one LoRA-layout mapping (what ComfyUI's LoRA loader reads)."""
        return {**self.delta, **self.text_delta}

    def text_weight_functions(self, strength: float = 1.0) -> dict[str, nn.Module]:
        return delta_functions(self.text_deltas, strength)

    def weight_functions(self, strength: float = 1.0) -> dict[str, nn.Module]:
        """W -> W + strength * delta for every trained parameter (to apply through the seam)."""
        return delta_functions(self.deltas, strength)

    def positional_map(self) -> PositionalMap | None:
        return PositionalMap(self.channels, self.grid_size) if self.positional else None


def first_block_channels(model, default: int | None = None) -> int:
    """Channels out of the UNet's first block, from its first conv weight (no protocol addition)."""
    params = model.unet_parameters()
    for name in FIRST_BLOCK_NAMES:
        if name in params:
            return int(params[name].shape[0])
    return int(default) if default is not None else MODEL_CHANNELS


def pooled_x0_loss(x0_hat: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, T: int, size: int = 64) -> torch.Tensor:
    """The official patch config's extra term (not in the paper), a scalar:
    ``mean_b (t_b / T)^2 * mean_{c,i,j} |P(x0_hat)_b - P(z0)_b|`` with P = ``adaptive_avg_pool2d(., size)``
    (an output size of ``size`` x ``size``; the official ``recon_loss_size`` is 64).

    x0_hat, z0: [B, C, H, W] latents; t: [B] integer timesteps; T: the number of training timesteps.
    """
    diff = F.adaptive_avg_pool2d(x0_hat, size) - F.adaptive_avg_pool2d(z0, size)  # [B, C, size, size]
    per = diff.abs().flatten(1).mean(1)  # [B]
    return ((t.float() / T) ** 2 * per).mean()


def finetune_sine(model: LatentDiffusion, image: torch.Tensor, prompt_cond: torch.Tensor | None,
                  config: SineFineTuneConfig = SineFineTuneConfig(), on_step: OnStep | None = None,
                  should_stop: ShouldStop | None = None, prompt: str | None = None,
                  checkpoints: Plan | None = None, previews: Previews | None = None) -> SineFineTuneResult:
    """Fine-tune ``model`` on ``image`` [1, 3, H, W] in [0, 1] at ``prompt_cond`` [1, 77, D].

    Without patches the image is encoded as given (resize it to the working size first, e.g.
    :func:`core.imagic.load_image`); with patches it is resized to ``patch.high_resolution``.
    With ``config.train_text_encoder`` the text ``prompt`` is needed instead of (or besides)
    ``prompt_cond``, and ``model`` must be a :class:`core.seam.TrainableText`.  ``checkpoints``: write
    the run's state and / or continue one (:mod:`core.checkpoint`).  ``previews``: the tuned model's
    one-step x0 every N steps (:mod:`core.previews`), of the image, or with patches of one fixed crop (drawn
    from the previews' own seed) with its positional map.
    """
    device = torch.device(model.device)
    if config.train_text_encoder:
        if not isinstance(model, TrainableText):
            raise ValueError(f"{type(model).__name__} cannot train its text encoder (no text_adapted)")
        if not prompt:
            raise ValueError("training the text encoder needs the fine-tune prompt as text (prompt=...)")
    elif prompt_cond is None:
        if not prompt:
            raise ValueError("give the fine-tune prompt: prompt_cond or prompt")
        prompt_cond = model.encode_text([prompt])
    cond = prompt_cond.detach().to(device, torch.float32) if prompt_cond is not None else None
    T = len(model.alphas_cumprod)
    ab = model.alphas_cumprod
    params = model.unet_parameters()
    channels = first_block_channels(model, config.channels)
    pcfg = config.patch_config
    pmap = PositionalMap(channels, pcfg.grid) if config.patches else None
    text_fns: dict = {}
    if config.train_text_encoder:
        text_params = text_trainable(model.text_parameters(), config.text_mode)
        text_fns = trainable_functions(config.text_mode, text_params, config.lora, derive_seed(config.seed, 3),
                                       device)

    draw = NoiseDraw(derive_seed(config.seed, 1), T)
    rngs = {"noise": draw.gen}
    if config.patches:
        sampler = PatchSampler(image.float().cpu(), pcfg)
        crop_gen = torch.Generator().manual_seed(derive_seed(config.seed, 2))
        rngs["crops"] = crop_gen

        def batches(step):
            crop, box = sampler(1, crop_gen)
            z0 = model.encode(crop).detach().to(device, torch.float32)
            t, eps = draw(z0)
            return {"z0": z0, "t": t, "eps": eps, "box": box.to(device)}
    else:
        latent = model.encode(image).detach().to(device, torch.float32)

        def batches(step):
            t, eps = draw(latent)
            return {"z0": latent, "t": t, "eps": eps, "box": None}

    base = dict(params)
    if config.train_text_encoder:
        base.update({f"text.{k}": v for k, v in model.text_parameters().items()})
    settings = {**settings_of(config, ("steps", "gradient_checkpointing", "in_place")), "prompt": prompt}
    ck = stage_checkpointing(checkpoints, "sine", "finetune", base, settings,
                             {"image": image, "cond": cond}, rngs)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        tr = stack.enter_context(trainables(model, config.mode, params, config.lora, config.seed, device,
                                            config.in_place))
        groups = [{"params": tr.params, "lr": config.learning_rate}]
        if text_fns:
            groups.append({"params": [p for fn in text_fns.values() for p in fn.parameters()],
                           "lr": config.text_learning_rate})
        # the UNet first: a back end may free every other model when it loads it for training
        m = stack.enter_context(model.adapted(tr.fns, config.gradient_checkpointing))
        encode = stack.enter_context(model.text_adapted(text_fns)) if config.train_text_encoder else None

        def predict(batch):  # one UNet pass per step, shared by both terms
            if "pred" not in batch:
                z0, t, eps = batch["z0"], batch["t"], batch["eps"]
                a = ab.to(device)[t.cpu()].to(device)
                x_t = q_sample(z0, a, eps)
                f = Features(input_map=pmap, crop_box=batch["box"]) if pmap is not None else None
                c = encode(prompt).to(device, torch.float32) if encode is not None else cond
                batch["x_t"], batch["a"] = x_t, a
                batch["pred"] = m.eps(x_t, t, c.expand(t.shape[0], -1, -1), f)
            return batch["pred"]

        def preview_x0(p: Previews) -> torch.Tensor:
            if config.patches:  # one fixed crop, from the previews' own generator (never the training crops')
                crop, box = sampler(1, torch.Generator().manual_seed(p.seed))
                z0, f = model.encode(crop).detach().to(device, torch.float32), \
                    Features(input_map=pmap, crop_box=box.to(device))
            else:
                z0, f = latent, None
            with torch.no_grad():
                c = encode(prompt).to(device, torch.float32) if encode is not None else cond
            return one_step_x0(lambda x, t, cc: m.eps(x, t, cc, f), z0, c, ab, p.timesteps, p.seed)

        def eps_mse(batch):
            return masked_mse(predict(batch), batch["eps"])

        def pooled_x0(batch):
            pred = predict(batch)
            x0 = predict_x0(batch["x_t"], pred.float(), batch["a"])
            return pooled_x0_loss(x0, batch["z0"], batch["t"], T, config.pooled_x0_pool)

        terms = [Term("eps_mse", eps_mse), Term("pooled_x0", pooled_x0, config.pooled_x0_weight)]
        show = with_previews(on_step, previews, lambda: preview_x0(previews))
        res = fit(groups, batches, terms,
                  FitConfig(config.total_steps, config.learning_rate, optimizer=config.optimizer,
                            weight_decay=config.weight_decay, what="SINE fine-tuning",
                            step_in_backward=config.mode == "full"),
                  device, on_step=show, should_stop=should_stop, checkpointing=ck)
        if encode is not None:  # c^ as the trained encoder gives it (what the edit must use)
            with torch.no_grad():
                c_hat = encode(prompt).detach().float().cpu()
        else:
            c_hat = cond.detach().float().cpu()
        delta, deltas = tr.result(config.mode, params)
        count = sum(p.numel() for g in groups for p in g["params"])
    text_delta, text_deltas = trained_delta(config.text_mode, text_fns, model.text_parameters(), TEXT_PREFIX) \
        if text_fns else ({}, {})
    return SineFineTuneResult(config.mode, delta, deltas, res.losses, res.terms, time.perf_counter() - t0,
                              count, config.patches, channels, pcfg.grid, text_delta, text_deltas, c_hat[:1])
