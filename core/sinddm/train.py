"""SinDDM training (paper Alg. 1) with the official optimiser, LR milestones and EMA.

One step: draw one scale s uniformly, a batch of B copies of x^s with independent
t ~ U{0..T-1} and eps ~ N(0, I); mix in the blurry reference (eq. 1,
x_mix = gamma_t^s x~^s + (1 - gamma_t^s) x^s for s >= 1), noise it
(x_t = sqrt(alpha_bar_t) x_mix + sqrt(1 - alpha_bar_t) eps) and take an Adam step on
the L1 loss |eps - eps_theta(x_t, t, s)|.

Defaults are the paper's (120k steps, batch 32, Adam 1e-3, LR halved at
20k/40k/70k/80k/90k/110k, EMA 0.995 every 10 steps from step 2000).  For shorter runs
the milestones, the EMA start and the EMA interval are scaled by steps / 120k, so a
short run keeps the same shape of schedule, and so is the EMA's horizon (see
:attr:`TrainConfig.ema_update_decay`).

Randomness: the scale, t and eps of every step come from a ``torch.Generator`` seeded
``seed``, and the initial weights are drawn inside :func:`core.sinddm.model.private_rng`
(the weights seeding the global generator with ``seed`` would give), so training never
changes the process's random state.

Speed (same maths as the official code): channels-last memory format, and bf16
autocast where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or
AMX); weights, optimiser state and the EMA stay in float32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..checkpoint import Plan, settings_of, stage_checkpointing
from ..diffusion import q_sample
from ..fit import FitConfig, OnStep, Term, fit
from .model import NetConfig, SinDDMNet, private_rng, seeded_net
from .pyramid import Pyramid
from .schedule import MultiScaleSchedule

PAPER_STEPS = 120_000
PAPER_MILESTONES = (20_000, 40_000, 70_000, 80_000, 90_000, 110_000)
PAPER_EMA_START, PAPER_EMA_EVERY = 2000, 10

@dataclass(frozen=True)
class TrainConfig:
    steps: int = PAPER_STEPS
    batch_size: int = 32
    lr: float = 1e-3
    lr_gamma: float = 0.5
    ema_decay: float = 0.995
    seed: int = 0
    precision: str = "auto"  # "auto" | "fp32" | "bf16"
    channels_last: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")

    @property
    def milestones(self) -> list[int]:
        """The official LR milestones scaled to ``steps``."""
        return sorted({max(1, round(m * self.steps / PAPER_STEPS)) for m in PAPER_MILESTONES})

    @property
    def ema_start(self) -> int:
        return round(PAPER_EMA_START * self.steps / PAPER_STEPS)

    @property
    def ema_every(self) -> int:
        return max(1, round(PAPER_EMA_EVERY * self.steps / PAPER_STEPS))

    @property
    def ema_update_decay(self) -> float:
        """Decay per EMA update, chosen so that the EMA's horizon is the paper's, scaled by steps / 120k.

        ``ema_decay`` is the paper's decay per update at the paper's interval (0.995 every
        10 steps).  An EMA with decay d updated every k steps forgets as exp(-n / tau)
        after n steps, with time constant tau = -k / ln d steps; the paper's is
        tau_paper = -10 / ln 0.995 = 1995 steps, 1.66 % of its 120k steps.  A run of S
        steps should keep tau_S = tau_paper S / 120k, so with its interval k_S
        (``ema_every``) the decay is d_S = exp(-k_S / tau_S) = 0.995 ** (k_S 120k / (10 S)).
        At 120k steps this is 0.995 exactly (the official EMA, ``SinDDM/trainer.py``).
        Keeping 0.995 with the scaled interval is proportional only while k_S = 10 S / 120k
        exactly (k_S is rounded); once k_S is clamped to 1 (S <= 6000) tau stays 199.5
        steps: 3.3 % of a 6,000-step run, 10 % of a 2,000-step run (6x too long), 66 % of a
        300-step run.  With the rule here 2,000 steps give k = 1, d = 0.995 ** 6 = 0.9704
        and tau = 33.25 steps (1.66 %).  tests/test_sinddm.py measures tau on a step input.
        """
        ratio = self.ema_every * PAPER_STEPS / (PAPER_EMA_EVERY * self.steps)
        return float(self.ema_decay ** ratio)

    @property
    def ema_time_constant(self) -> float:
        """The EMA's time constant in steps, -ema_every / ln(ema_update_decay) (see there)."""
        d = self.ema_update_decay
        return math.inf if d >= 1 else (0.0 if d <= 0 else -self.ema_every / math.log(d))


def native_bf16(device: torch.device) -> bool:
    """Does this device run bf16 convolutions natively (so autocast is a speed-up)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_has_bf16_units()
        except (AttributeError, RuntimeError):
            return False
    return False


def _cpu_has_bf16_units() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class TrainResult:
    net: SinDDMNet  # EMA weights: the model used for sampling
    losses: list[float]
    steps_done: int
    seconds: float
    config: TrainConfig

    def info(self) -> dict:
        return {"train": asdict(self.config), "steps_done": self.steps_done, "seconds": round(self.seconds, 2),
                "final_loss": self.losses[-1] if self.losses else None}


def training_batch(pyramid: Pyramid, schedule: MultiScaleSchedule, s: int, batch: int,
                   generator: torch.Generator, device: torch.device):
    """(x_t, t, eps) for one Alg.-1 step at scale s (tensors on ``device``)."""
    x = pyramid.images[s].to(device).expand(batch, -1, -1, -1)
    t = torch.randint(0, schedule.num_timesteps, (batch,), generator=generator, device=device)
    eps = torch.randn(x.shape, generator=generator, device=device)
    if s > 0:
        g = schedule.gamma_train(s, t).view(-1, 1, 1, 1)
        x = g * pyramid.blurry[s].to(device) + (1 - g) * x  # eq. 1: x_mix
    ab = schedule.alphas_cumprod.to(device)[t]
    return q_sample(x, ab, eps), t, eps


class TrainStep:
    """Alg. 1 at a given scale: the network being trained, its Adam optimiser, the batch
    (:meth:`batch`) and the L1 loss (:meth:`loss`).  ``train`` runs it through the engine's
    fit loop; ``step(s)`` (one optimiser step, the loop's own) is what
    ``benchmarks/sinddm_speed.py`` times.
    """

    def __init__(self, net: SinDDMNet, pyramid: Pyramid, config: TrainConfig, device: torch.device,
                 generator: torch.Generator):
        self.pyramid, self.config, self.device, self.gen = pyramid, config, device, generator
        self.schedule = MultiScaleSchedule.build(pyramid.spec.errors)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.net = net.to(device=device, memory_format=self.memory_format).train()
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and native_bf16(device))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)

    def fit_config(self, steps: int) -> FitConfig:
        return FitConfig(steps=steps, lr=self.config.lr, milestones=tuple(self.config.milestones),
                         decay_gamma=self.config.lr_gamma, precision="bf16" if self.bf16 else "fp32",
                         what="SinDDM training")

    def batch(self, s: int):
        x_t, t, eps = training_batch(self.pyramid, self.schedule, s, self.config.batch_size, self.gen, self.device)
        return x_t.contiguous(memory_format=self.memory_format), t, eps, s

    def loss(self, batch) -> torch.Tensor:
        x_t, t, eps, s = batch
        pred = self.net(x_t, t, torch.full_like(t, s))
        return (eps - pred.float()).abs().mean()  # L1 on eps (official loss_type "l1")

    def step(self, s: int) -> float:
        """One optimiser step at scale s (constant lr); returns the loss."""
        cfg = FitConfig(steps=1, lr=self.config.lr, precision="bf16" if self.bf16 else "fp32", what="SinDDM step")
        return fit([], lambda _: self.batch(s), [Term("l1", self.loss)], cfg, self.device, optimizer=self.opt).losses[0]


def train(
    pyramid: Pyramid,
    net_config: NetConfig = NetConfig(),
    config: TrainConfig = TrainConfig(),
    device: str | torch.device = "cpu",
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
    preview_every: int = 0,
    preview: Callable[[SinDDMNet], torch.Tensor] | None = None,
    init: SinDDMNet | None = None,
    checkpoints: Plan | None = None,
) -> TrainResult:
    """Train a SinDDM denoiser on one image's pyramid (paper Alg. 1) with the engine's fit loop.

    ``on_step(i, total, info)`` is called after every step with ``info["loss"]`` (and
    ``info["preview"]``, an image [3, H, W] in [0, 1] made by ``preview(ema_net)``,
    every ``preview_every`` steps); it may raise to cancel.  ``should_stop()`` is polled
    every step and raises :class:`core.fit.Interrupted`.  Returns the EMA network on the CPU.
    ``checkpoints``: write the run's state (the network, Adam, the schedule, the generator, the EMA)
    and / or continue one (:mod:`core.checkpoint`).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    net = copy.deepcopy(init) if init is not None else seeded_net(net_config, config.seed)
    step_fn = TrainStep(net, pyramid, config, device, gen)
    ema = copy.deepcopy(step_fn.net).eval().requires_grad_(False)
    n_scales = pyramid.spec.n_scales
    scales: list[int] = []

    def batches(step: int):
        s = int(torch.randint(0, n_scales, (1,), generator=gen, device=device))
        scales.append(s)
        return step_fn.batch(s)

    def after_step(step: int) -> dict:
        if step % config.ema_every == 0:
            _ema_update(ema, step_fn.net, config.ema_update_decay if step >= config.ema_start else 0.0)
        info = {"scale": scales[-1]}
        if preview is not None and preview_every > 0 and step % preview_every == 0:
            info["preview"] = preview(ema)
        return info

    def ema_state() -> dict:
        return {**{f"ema.{k}": v for k, v in ema.state_dict().items()},
                **{f"buffer.{k}": v for k, v in step_fn.net.named_buffers()}}

    def set_ema_state(saved: dict) -> None:
        ema.load_state_dict({k[len("ema."):]: v for k, v in saved.items() if k.startswith("ema.")})
        buffers = dict(step_fn.net.named_buffers())
        with torch.no_grad():
            for k, v in saved.items():
                if k.startswith("buffer."):
                    buffers[k[len("buffer."):]].copy_(v)

    # the step count is part of the identity: the EMA and learning-rate schedules are scaled to it
    settings = {**settings_of(config, exclude=()), "net": asdict(net_config) if init is None else asdict(init.config)}
    ck = stage_checkpointing(checkpoints, "sinddm", "train", dict(init.state_dict()) if init is not None else {},
                             settings, {f"scale{s}": img for s, img in enumerate(pyramid.images)}, {"noise": gen})
    res = fit([], batches, [Term("l1", step_fn.loss)], step_fn.fit_config(config.steps), device,
              on_step=on_step, should_stop=should_stop, after_step=after_step, optimizer=step_fn.opt,
              checkpointing=ck, extra_state=(ema_state, set_ema_state))
    tail = config.steps % config.ema_every
    if tail:  # make the returned EMA include the last steps (a partial interval decays in proportion)
        decay = config.ema_update_decay ** (tail / config.ema_every)
        _ema_update(ema, step_fn.net, decay if config.steps >= config.ema_start else 0.0)
    with private_rng():  # its initial weights are overwritten below
        out = SinDDMNet(step_fn.net.config)
    out.load_state_dict({k: v.float().contiguous() for k, v in ema.state_dict().items()})
    return TrainResult(out.eval(), res.losses, config.steps, res.seconds, config)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net; decay 0 copies (the official warm-up)."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
