"""The one fit loop: every optimisation in the pack (embeddings, adapters, trainable copies,
hypernetworks) is ``fit(parameters, batches, terms, config)``.

* ``parameters``: tensors, or torch parameter groups (dicts with their own ``lr``);
* ``batches(step) -> batch``: a per-step batch provider (random crops and crop boxes,
  several images, masks, timesteps and noise), called once per step, in order;
* ``terms``: named, weighted loss terms ``fn(batch) -> scalar``; the objective is
  sum_k weight_k * term_k (e.g. LayerDiffusion eq. 6, lambda_1 L_obj + lambda_2 L_bg);
  each term's value is recorded per step (one loss curve per term);
* :class:`FitConfig`: Adam or AdamW, step-decay schedule (lr * gamma every N steps, the
  rectifier's schedule), autocast (bf16 where the GPU has it, else fp16 with a
  GradScaler; fp32 on the CPU unless asked), gradient clipping, progress and cancel.

Gradient checkpointing belongs to the model view (``model.views(...,
gradient_checkpointing=True)``); the loop runs forward *and* backward inside
``scope()`` (e.g. ``view.activated``) so that recomputation sees the same view.

    res = fit([e], lambda step: draw(latent), [Term("eps", lambda b: eps_mse(m, latent, e, *b))],
              FitConfig(steps=500, lr=1e-3))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

OnStep = Callable[[int, int, dict], None]
ShouldStop = Callable[[], bool]


class Interrupted(RuntimeError):
    """Raised inside a core loop when ``should_stop()`` returns True."""


def poll(should_stop: ShouldStop | None, what: str, step: int) -> None:
    """The pack's one cancellation check: every core loop (the fit loop, SinDDM sampling and
    its CLIP region edit) calls it once per step.  ``should_stop()`` True raises
    :class:`Interrupted` ("<what> stopped after <step> steps"); a ``should_stop`` may also
    raise its own exception (the ComfyUI nodes' ``Progress.should_stop`` raises ComfyUI's
    interrupt)."""
    if should_stop is not None and should_stop():
        raise Interrupted(f"{what} stopped after {step} steps")


def check_finite(loss: float, step: int, what: str) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"{what} diverged at step {step} (loss {loss}); lower the learning rate")


@dataclass(frozen=True)
class Term:
    """One named, weighted loss term: ``weight * fn(batch)``."""

    name: str
    fn: Callable[[Any], torch.Tensor]
    weight: float = 1.0


@dataclass(frozen=True)
class FitConfig:
    steps: int
    lr: float
    optimizer: str = "adam"  # "adam" | "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    decay_every: int = 0  # step decay: lr * decay_gamma every decay_every steps (0: constant lr)
    decay_gamma: float = 1.0
    milestones: tuple[int, ...] = ()  # or: lr * decay_gamma at each of these steps (SinDDM's schedule)
    precision: str = "auto"  # "auto" (GPU: bf16 or fp16 autocast; CPU: fp32) | "fp32" | "bf16" | "fp16"
    grad_clip: float | None = None
    what: str = "optimisation"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.decay_every < 0 or not self.decay_gamma > 0:
            raise ValueError("decay_every must be >= 0 and decay_gamma > 0")
        if self.decay_every and self.milestones:
            raise ValueError("give decay_every or milestones, not both")


@dataclass
class FitResult:
    losses: list[float]  # the weighted total per step
    terms: dict[str, list[float]] = field(default_factory=dict)  # each term's (unweighted) value per step
    seconds: float = 0.0
    steps_done: int = 0


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: fp32, no autocast)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast_for(device: torch.device, precision: str = "auto"):
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(parameters: Iterable, config: FitConfig) -> torch.optim.Optimizer:
    params = list(parameters)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def fit(parameters: Iterable, batches: Callable[[int], Any], terms: Sequence[Term], config: FitConfig,
        device: torch.device | str = "cpu", scope: Callable[[], AbstractContextManager] | None = None,
        on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
        after_step: Callable[[int], dict | None] | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> FitResult:
    """Minimise sum_k w_k term_k over ``parameters`` for ``config.steps`` steps.

    ``on_step(i, n, info)`` gets ``info["loss"]`` (the total) and ``info["terms"]``; it may
    raise to cancel, and ``should_stop()`` True raises :class:`Interrupted`.
    ``after_step(i)`` runs after each optimiser step (e.g. an EMA update); a dict it
    returns is merged into ``info``.  ``optimizer``: an existing optimiser to continue
    (its parameters replace ``parameters``).
    """
    if not terms:
        raise ValueError("fit needs at least one loss term")
    device = torch.device(device)
    opt = optimizer if optimizer is not None else make_optimizer(parameters, config)
    sched = None
    if config.decay_every:
        sched = torch.optim.lr_scheduler.StepLR(opt, config.decay_every, config.decay_gamma)
    elif config.milestones:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(config.milestones), config.decay_gamma)
    dtype = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    trainable = [p for g in opt.param_groups for p in g["params"]]
    result = FitResult([], {t.name: [] for t in terms})
    t0 = time.perf_counter()
    for step in range(1, config.steps + 1):
        poll(should_stop, config.what, step - 1)
        batch = batches(step)
        with scope() if scope is not None else nullcontext():
            with autocast_for(device, config.precision):
                values = [term.fn(batch) for term in terms]
                loss = sum(term.weight * v.float() for term, v in zip(terms, values))
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if sched is not None:
            sched.step()
        total = loss.item()
        result.losses.append(total)
        for term, v in zip(terms, values):
            result.terms[term.name].append(v.item())
        result.steps_done = step
        check_finite(total, step, config.what)
        info = {"loss": total, "terms": {k: v[-1] for k, v in result.terms.items()}, "lr": opt.param_groups[0]["lr"]}
        if after_step is not None:
            info.update(after_step(step) or {})
        if on_step is not None:
            on_step(step, config.steps, info)
    result.seconds = time.perf_counter() - t0
    return result
