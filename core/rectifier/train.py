"""Training the rectifier: reconstruction (eq. 3) and editing (Alg. 1, eqs. 4-6) (Hou et al. 2024).

Both modes draw, per step, images x_0 of the training set, t ~ U{0..T-1} and eps ~ N(0, I),
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, and evaluate the rectified model
(:class:`core.rectifier.sample.Rectified`) at x_t; the denoiser stays frozen, only R learns.

* ``mode="recon"``: L_rec = || eps - eps_hat(x_t) ||^2 (eq. 3).  Adam, weight decay 1e-5,
  lr 1e-3 x 0.9 every 5,000 steps (supplement B).
* ``mode="edit"``: x0_hat = P_t[eps_hat(x_t)];
  L_edit = lambda_CLIP L_direction(x0_hat, t_tar; x_0, t_src) + lambda_recon L1(x0_hat, x_0),
  both lambdas 1 (eq. 6, supplement B); Adam, weight decay 0, lr 1e-3 x 0.9 every 10 steps.
  Every step starts from the original trajectory (x_t of the *original* image), never from
  a previously edited sample: the paper's score-matching-like strategy (Fig. 3b).  It
  continues from a reconstruction rectifier (pass one in).  For SD latents, x0_hat is
  decoded by the VAE (differentiably) for CLIP, and L1 is taken on the latents.

  Our choice where the paper is silent: both terms see x0_hat **clipped** to +-``x0_clip``
  (default: R's ``estimate_clip``, 1 for pixels, the data range, as DDPM samplers clip x0;
  4 for SD latents), the x0_hat the CLIP term's image already showed for pixels.  Unclipped,
  |x0_hat - x0| = sqrt((1 - a_t) / a_t) |eps_hat - eps| reaches ~157x the eps error at t = 999
  of the linear schedule: on the tests' tiny DDPM the L1 term is 10.0 there against a CLIP
  term <= 2 (1.0), and its gradient grows with t (8x the CLIP term's at t = 999).  Clipped, L1
  is bounded by 2 x0_clip like L_direction by 2, so lambda_recon means the same at every t
  (measured, 12 t from 0 to 999, lambda 1 each: L1 0.008 -> 0.80, CLIP 0.89 -> 1.16; mean
  |gradient| over t CLIP 1.13, L1 0.13, ratio 8.6 < 20; unclipped L1 0.73, ratio 1.6;
  tests/test_rectifier_quality.py).  The price: a pixel whose x0_hat is outside the range gives
  no L1 gradient (hence the lower mean).  Weighting L1 by t was the alternative; it would leave
  the CLIP term's x0_hat unbounded for SD latents.  ``x0_clip=0`` gives the unclipped loss.

Batches are drawn from one generator seeded by (seed, step) for the *global* batch
(``batch`` x world size); a process of a torch.distributed job takes its slice, and
DistributedDataParallel averages gradients, so N processes with batch b train exactly
like one process with batch N b (``python -m torch.distributed.run``, :mod:`.distributed`).
Every tensor a step indexes or combines is on the model's device.  A loss term that is not
finite on any process stops every process at the same step, before the backward pass
(:func:`agreed_finite`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoint import Plan, settings_of, stage_checkpointing
from ..diffusion import predict_x0, q_sample
from ..fit import FitConfig, FitResult, OnStep, ShouldStop, Term, fit
from ..seam import Denoiser, ViewSpec
from ..seeds import derive_seed
from .clip_direction import DirectionalCLIP
from .distributed import nonfinite_ranks
from .hypernet import Rectifier
from .sample import ESTIMATES, Rectified

MODES = ("recon", "edit")
PAPER = {  # supplement B
    "recon": {"weight_decay": 1e-5, "decay_every": 5000},
    "edit": {"weight_decay": 0.0, "decay_every": 10},
}


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "recon"
    steps: int = 5000
    batch: int = 8  # per process
    lr: float = 1e-3
    weight_decay: float | None = None  # None: the paper's value for the mode
    decay_every: int | None = None  # None: the paper's value for the mode (0: constant lr)
    decay_gamma: float = 0.9
    lambda_clip: float = 1.0
    lambda_recon: float = 1.0
    estimate: str = "base"  # R's input P_t: the unmodulated model (eq. 1) or the modulated one
    x0_clip: float | None = None  # edit: both terms see x0_hat clipped to +-this; None: R's estimate_clip; 0: off
    seed: int = 0
    precision: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {self.estimate!r}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError("steps and batch must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lambda_clip < 0 or self.lambda_recon < 0 or self.lambda_clip + self.lambda_recon == 0:
            raise ValueError("lambda_clip and lambda_recon must be >= 0 and not both 0")
        if self.x0_clip is not None and not self.x0_clip >= 0:
            raise ValueError(f"x0_clip must be >= 0 (0: unclipped) or None, got {self.x0_clip}")

    def fit_config(self) -> FitConfig:
        paper = PAPER[self.mode]
        wd = paper["weight_decay"] if self.weight_decay is None else self.weight_decay
        every = paper["decay_every"] if self.decay_every is None else self.decay_every
        return FitConfig(steps=self.steps, lr=self.lr, optimizer="adam", weight_decay=wd, decay_every=every,
                         decay_gamma=self.decay_gamma if every else 1.0, precision=self.precision,
                         what=f"rectifier {self.mode} training")


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def draw(step: int, seed: int, n_images: int, batch: int, shape: tuple[int, ...], T: int, rank: int = 0,
         world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's slice of the global batch of ``step``: (image indices [b], t [b], eps [b, *shape])."""
    g = torch.Generator().manual_seed(derive_seed(seed, step))
    n = batch * world_size
    idx = torch.randint(0, n_images, (n,), generator=g)
    t = torch.randint(0, T, (n,), generator=g)
    eps = torch.randn((n, *shape), generator=g)
    s = slice(rank * batch, (rank + 1) * batch)
    return idx[s], t[s], eps[s]


@dataclass
class Objective:
    """What a training step evaluates (:func:`objective`): ``batches(step)`` draws this process's batch,
    ``batch(idx, t, eps, step)`` builds one from given draws (tests: the terms at a chosen t), ``terms`` are
    the named, weighted losses of the mode."""

    batches: Callable[[int], dict]
    batch: Callable[..., dict]
    terms: list[Term]
    device: torch.device


@contextmanager
def objective(model: Denoiser, rectifier: Rectifier, x0: torch.Tensor, config: TrainConfig,
              cond: torch.Tensor | None = None, clip: DirectionalCLIP | None = None,
              to_image: Callable[[torch.Tensor], torch.Tensor] | None = None,
              source_images: torch.Tensor | None = None) -> Iterator[Objective]:
    """The losses :func:`train_rectifier` minimises, with the denoiser's views open (arguments as there)."""
    if x0.ndim != 4 or x0.shape[0] < 1:
        raise ValueError(f"images: expected a batch [N, C, H, W], got {tuple(x0.shape)}")
    if x0.shape[1] != rectifier.config.channels:
        raise ValueError(f"images have {x0.shape[1]} channels in model space, the rectifier was made for "
                         f"{rectifier.config.channels}")
    if config.mode == "edit" and (clip is None or to_image is None):
        raise ValueError("edit training needs a CLIP model (clip) and source/target text")
    device = torch.device(model.device)
    rank, size = world()
    # every tensor the steps index or combine lives on the model's device (indices are drawn there)
    x0 = x0.to(device, torch.float32)
    cond = None if cond is None else cond.to(device)
    ab = model.alphas_cumprod.to(device)
    T = len(ab)
    rectifier.to(device).train()
    net = rectifier
    if size > 1:
        net = torch.nn.parallel.DistributedDataParallel(rectifier)
    if config.mode == "edit" and source_images is None:  # decoded in chunks of the batch (an SD VAE at 512^2)
        with torch.no_grad():
            source_images = torch.cat([to_image(x0[i:i + config.batch]) for i in range(0, x0.shape[0], config.batch)])
    if source_images is not None:
        if source_images.shape[0] != x0.shape[0]:
            raise ValueError(f"source_images: {source_images.shape[0]} images for {x0.shape[0]} training images")
        source_images = source_images.to(device, torch.float32)
    x0_clip = rectifier.config.estimate_clip if config.x0_clip is None else config.x0_clip

    def batch(idx: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, step: int = 0) -> dict:
        idx, t, eps = idx.to(device), t.to(device), eps.to(device)
        x = x0[idx]
        c = None if cond is None else (cond[idx] if cond.shape[0] == x0.shape[0] else cond.expand(len(idx), -1, -1))
        return {"x0": x, "t": t, "eps": eps, "x_t": q_sample(x, ab[t], eps), "cond": c, "idx": idx, "step": step}

    def batches(step: int) -> dict:
        return batch(*draw(step, config.seed, x0.shape[0], config.batch, tuple(x0.shape[1:]), T, rank, size), step)

    with model.views(ViewSpec(modulates=rectifier.layer_names), differentiable=True) as (base, mod):
        rect = Rectified(base, mod, net, x0, estimate=config.estimate)

        def eps_hat(b: dict) -> torch.Tensor:
            if "eps_hat" not in b:  # one modulated pass per step, shared by the terms
                rect.x0 = b["x0"]
                p = rect.base_estimate(b["x_t"], b["t"], b["cond"])
                if config.estimate == "modulated":
                    with torch.no_grad():
                        p = predict_x0(b["x_t"], rect.eps_with(b["x_t"], b["t"], p, b["cond"]), ab[b["t"]])
                b["eps_hat"] = rect.eps_with(b["x_t"], b["t"], p, b["cond"])
            return b["eps_hat"]

        def x0_hat(b: dict) -> torch.Tensor:
            """P_t[eps_hat(x_t)], clipped to +-x0_clip for both edit terms (module docstring)."""
            x = predict_x0(b["x_t"], eps_hat(b).float(), ab[b["t"]])
            return x.clamp(-x0_clip, x0_clip) if x0_clip else x

        if config.mode == "recon":
            terms = [Term("eps", lambda b: F.mse_loss(eps_hat(b).float(), b["eps"]))]
        else:
            terms = [Term("clip", lambda b: clip.loss(to_image(x0_hat(b)), source_images[b["idx"]]).mean(),
                          config.lambda_clip),
                     Term("l1", lambda b: (x0_hat(b) - b["x0"]).abs().mean(), config.lambda_recon)]
        yield Objective(batches, batch, [agreed_finite(term, config.mode, size) for term in terms], device)


def train_rectifier(model: Denoiser, rectifier: Rectifier, x0: torch.Tensor, config: TrainConfig,
                    cond: torch.Tensor | None = None, clip: DirectionalCLIP | None = None,
                    to_image: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    source_images: torch.Tensor | None = None, on_step: OnStep | None = None,
                    should_stop: ShouldStop | None = None, checkpoints: Plan | None = None) -> FitResult:
    """Train ``rectifier`` in place on the model-space images ``x0`` [N, C, H, W].

    ``cond`` [1 or N, 77, D]: the text condition for SD models (None for pixel DDPMs).
    Edit mode needs ``clip`` and ``to_image`` (model space -> [0, 1] images, differentiable);
    ``source_images`` (the originals in [0, 1]) default to ``to_image(x0)``: for SD the originals as the same
    decoder renders x0_hat, so the VAE's own reconstruction error is no part of the image direction dI.
    Every tensor is moved to the model's device first.  ``checkpoints``: write the run's state and / or
    continue one (:mod:`core.checkpoint`; in a distributed run rank 0 writes, every rank resumes).  The
    batches are drawn from a generator seeded per step (:func:`draw`), so no generator state is kept.
    """
    rank, _ = world()
    ck = stage_checkpointing(checkpoints, "rectifier", config.mode, model.unet_parameters(), settings_of(config),
                             {"x0": x0, "cond": cond,  # edit mode: the source -> target text direction too
                              "text_direction": clip.text_direction if clip is not None else None}, {},
                             write=rank == 0)
    with objective(model, rectifier, x0, config, cond, clip, to_image, source_images) as obj:
        return fit(rectifier.parameters(), obj.batches, obj.terms, config.fit_config(), device=obj.device,
                   on_step=on_step, should_stop=should_stop, checkpointing=ck)


def agreed_finite(term: Term, mode: str, size: int) -> Term:
    """``term`` whose value is checked for NaN / inf on every process before the backward pass.

    Every process evaluates the terms in the same order, so the check is one collective per term
    (:func:`.distributed.nonfinite_ranks`); when any rank's value is not finite, **every** rank raises
    the same FloatingPointError at the same step.  Without it the rank with the bad batch stopped
    alone (the fit loop checks the loss after its step) and the others waited for it forever in
    DistributedDataParallel's gradient all-reduce."""

    def fn(b: dict) -> torch.Tensor:
        value = term.fn(b)
        bad = nonfinite_ranks(value)
        if bad:
            where = f" on rank {', '.join(map(str, bad))} of {size} (every process stops)" if size > 1 else ""
            raise FloatingPointError(f"rectifier {mode} training: the {term.name} loss is not finite at step "
                                     f"{b['step']}{where}; check the images for NaN / inf values, or lower the "
                                     "learning rate")
        return value

    return Term(term.name, fn, term.weight)
