"""SINE fine-tuning on one image (Zhang et al., CVPR 2023, §3.3 and §4), on the engine's fit loop.

Loss: the paper's plain eps-MSE (LDM objective, t ~ U{0..T-1}) at the fine-tune prompt
("a photo of a sks dog").  Two schedules:

* without patches (paper: 800 steps): the whole image, encoded once, no positional map;
* with patches (``patches=True``, paper: 10,000 steps): each step draws a random crop and its
  box from :class:`~core.sine.patches.PatchSampler` (a seeded generator), **encodes that crop with
  ``model.encode``** (nothing is cached across steps: a crop of the 1024 image's latent is not the
  latent of the resized crop, so the official code's per-crop encoding is kept), and the UNet sees
  ``Features(input_map=PositionalMap(channels, grid), crop_box=box)``: F(v) added to its first block.

Optional extra term (official patch config only, ``scale_recon_loss: 1.0``; not in the paper):
``(t/T)^2 * L1(avgpool(x0_hat), avgpool(z0))`` in latent space, ``pooled_x0_weight`` (default 0:
the paper's plain eps-MSE; set 1.0 for the official patch code).  Its pool kernel
(``pooled_x0_pool``, default 64: the reference notes' "avgpool64", clamped to the latent size, so on
the 64x64 latent of a 512 crop it is each channel's mean) was not re-checked against the code.
The term is always recorded as its own loss curve ("pooled_x0"); with weight 0 it adds nothing.

Modes, as in :mod:`core.imagic.finetune` (same helpers, same delta layout):

* ``lora`` (default): LoRA on every UNet conv/linear weight, lr 1e-4 (Imagic's LoRA default and the
  usual SD LoRA rate; the paper's 1e-6 is for full weights and barely moves a zero-initialised LoRA);
* ``full``: every UNet parameter, AdamW lr 1e-6, weight decay 0.01 (paper §4; official configs use
  torch's default AdamW decay 0.01).

Left for later: training the text encoder too (the official code does, ``cond_stage_trainable``),
and batch sizes above 1.  The first block's channel count (for F(v)) is read from the model's
first conv weight (``input_blocks.0.0.weight``, SD's ``model_channels``; ``conv_in.weight`` for
diffusers-named models), else ``config.channels`` (default 320, SD 1.x).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..diffusion import predict_x0, q_sample
from ..fit import FitConfig, OnStep, ShouldStop, Term, fit
from ..lora import LoRAConfig, trainable_functions, trained_delta
from ..losses import NoiseDraw, masked_mse
from ..seam import DeltaFunction, Features, LatentDiffusion
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
    pooled_x0_pool: int = 64
    size: int = 512  # without patches: the square working size the caller resized to (informative)
    channels: int | None = None  # None: the model's first conv weight, else 320
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.mode not in DEFAULT_LR:
            raise ValueError(f"mode must be 'lora' or 'full', got {self.mode!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.pooled_x0_weight < 0:
            raise ValueError(f"pooled_x0_weight must be >= 0, got {self.pooled_x0_weight}")
        if self.whole_fraction is not None and not 0.0 <= self.whole_fraction <= 1.0:
            raise ValueError(f"whole_fraction must lie in [0, 1], got {self.whole_fraction}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

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
    deltas: dict[str, torch.Tensor]  # {canonical parameter name: dense delta}
    losses: list[float]  # weighted total per step
    terms: dict[str, list[float]]  # "eps_mse", "pooled_x0" (unweighted) per step
    seconds: float
    trainable_parameters: int
    positional: bool  # trained with F(v) (patches): edit with the whole-grid map
    channels: int = MODEL_CHANNELS
    grid_size: int = 128

    def weight_functions(self, strength: float = 1.0) -> dict[str, DeltaFunction]:
        """W -> W + strength * delta for every trained parameter (to apply through the seam)."""
        return {name: DeltaFunction(d, strength) for name, d in self.deltas.items()}

    def positional_map(self) -> PositionalMap | None:
        return PositionalMap(self.channels, self.grid_size) if self.positional else None


def first_block_channels(model, default: int | None = None) -> int:
    """Channels out of the UNet's first block, from its first conv weight (no protocol addition)."""
    params = model.unet_parameters()
    for name in FIRST_BLOCK_NAMES:
        if name in params:
            return int(params[name].shape[0])
    return int(default) if default is not None else MODEL_CHANNELS


def _pool(x: torch.Tensor, k: int) -> torch.Tensor:
    k = max(1, min(k, x.shape[-2], x.shape[-1]))
    return F.avg_pool2d(x, k)


def finetune_sine(model: LatentDiffusion, image: torch.Tensor, prompt_cond: torch.Tensor,
                  config: SineFineTuneConfig = SineFineTuneConfig(), on_step: OnStep | None = None,
                  should_stop: ShouldStop | None = None) -> SineFineTuneResult:
    """Fine-tune ``model`` on ``image`` [1, 3, H, W] in [0, 1] at ``prompt_cond`` [1, 77, D].

    Without patches the image is encoded as given (resize it to the working size first, e.g.
    :func:`core.imagic.load_image`); with patches it is resized to ``patch.high_resolution``.
    """
    device = torch.device(model.device)
    cond = prompt_cond.detach().to(device, torch.float32)
    T = len(model.alphas_cumprod)
    ab = model.alphas_cumprod
    params = model.unet_parameters()
    channels = first_block_channels(model, config.channels)
    pcfg = config.patch_config
    pmap = PositionalMap(channels, pcfg.grid) if config.patches else None
    fns = trainable_functions(config.mode, params, config.lora, config.seed, device)
    trainable = [p for fn in fns.values() for p in fn.parameters()]

    draw = NoiseDraw(derive_seed(config.seed, 1), T)
    if config.patches:
        sampler = PatchSampler(image.float().cpu(), pcfg)
        crop_gen = torch.Generator().manual_seed(derive_seed(config.seed, 2))

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

    t0 = time.perf_counter()
    with model.adapted(fns, config.gradient_checkpointing) as m:

        def predict(batch):  # one UNet pass per step, shared by both terms
            if "pred" not in batch:
                z0, t, eps = batch["z0"], batch["t"], batch["eps"]
                a = ab.to(device)[t.cpu()].to(device)
                x_t = q_sample(z0, a, eps)
                f = Features(input_map=pmap, crop_box=batch["box"]) if pmap is not None else None
                batch["x_t"], batch["a"] = x_t, a
                batch["pred"] = m.eps(x_t, t, cond.expand(t.shape[0], -1, -1), f)
            return batch["pred"]

        def eps_mse(batch):
            return masked_mse(predict(batch), batch["eps"])

        def pooled_x0(batch):
            pred = predict(batch)
            x0 = predict_x0(batch["x_t"], pred.float(), batch["a"])
            k = config.pooled_x0_pool
            per = (_pool(x0, k) - _pool(batch["z0"], k)).abs().flatten(1).mean(1)
            return ((batch["t"].float() / T) ** 2 * per).mean()

        terms = [Term("eps_mse", eps_mse), Term("pooled_x0", pooled_x0, config.pooled_x0_weight)]
        res = fit(trainable, batches, terms,
                  FitConfig(config.total_steps, config.learning_rate, optimizer=config.optimizer,
                            weight_decay=config.weight_decay, what="SINE fine-tuning"),
                  device, on_step=on_step, should_stop=should_stop)
    delta, deltas = trained_delta(config.mode, fns, params)
    return SineFineTuneResult(config.mode, delta, deltas, res.losses, res.terms, time.perf_counter() - t0,
                              sum(p.numel() for p in trainable), config.patches, channels, pcfg.grid)
