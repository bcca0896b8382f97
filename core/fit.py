"""The one fit loop: every optimisation in the pack (embeddings, adapters, trainable copies,
hypernetworks) is ``fit(parameters, batches, terms, config)``.

* ``parameters``: tensors, or torch parameter groups (dicts with their own ``lr``);
* ``batches(step) -> batch``: a per-step batch provider (random crops and crop boxes,
  several images, masks, timesteps and noise), called once per step, in order;
* ``terms``: named, weighted loss terms ``fn(batch) -> scalar``; the objective is
  sum_k weight_k * term_k (e.g. LayerDiffusion eq. 6, lambda_1 L_obj + lambda_2 L_bg);
  each term's value is recorded per step (one loss curve per term);
* :class:`FitConfig`: Adam or AdamW (or their 8-bit versions from bitsandbytes), step-decay
  schedule (lr * gamma every N steps, the rectifier's schedule), autocast (bf16 where the GPU
  has it, else fp16 with a GradScaler; fp32 on the CPU unless asked), gradient clipping,
  progress and cancel; ``step_in_backward`` takes each tensor's optimiser step inside backward
  and frees its gradient (:class:`StepInBackward`: a full fine-tune holds no whole set of
  gradients).

Checkpoints (:mod:`core.checkpoint`): with ``checkpointing``, the loop writes its state every
N steps and when the run is cancelled or fails, and continues a run from a checkpoint exactly
(``checkpointing.resume``): N steps, then M more from the checkpoint, equal N + M in one go.

Gradient checkpointing belongs to the model view (``model.views(...,
gradient_checkpointing=True)``); the loop runs forward *and* backward inside
``scope()`` (e.g. ``view.activated``) so that recomputation sees the same view.

    res = fit([e], lambda step: draw(latent), [Term("eps", lambda b: eps_mse(m, latent, e, *b))],
              FitConfig(steps=500, lr=1e-3))
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .checkpoint import Checkpointing

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


OPTIMIZERS = ("adam", "adamw", "adam8bit", "adamw8bit")


def check_optimizer(name: str) -> None:
    """``name`` is one of :data:`OPTIMIZERS` (a config's own check, before any work)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


@dataclass(frozen=True)
class FitConfig:
    steps: int
    lr: float
    optimizer: str = "adam"  # "adam" | "adamw" | "adam8bit" | "adamw8bit" (8-bit moments: bitsandbytes, below)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    decay_every: int = 0  # step decay: lr * decay_gamma every decay_every steps (0: constant lr)
    decay_gamma: float = 1.0
    milestones: tuple[int, ...] = ()  # or: lr * decay_gamma at each of these steps (SinDDM's schedule)
    precision: str = "auto"  # "auto" (GPU: bf16 or fp16 autocast; CPU: fp32) | "fp32" | "bf16" | "fp16"
    grad_clip: float | None = None
    what: str = "optimisation"
    step_in_backward: bool = False  # each parameter's optimiser step as soon as its gradient is complete (below)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_optimizer(self.optimizer)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.decay_every < 0 or not self.decay_gamma > 0:
            raise ValueError("decay_every must be >= 0 and decay_gamma > 0")
        if self.decay_every and self.milestones:
            raise ValueError("give decay_every or milestones, not both")
        if self.step_in_backward and self.grad_clip:
            raise ValueError("step_in_backward cannot clip gradients by their global norm (no step sees them all)")


class Pace:
    """Seconds per step as an exponential moving average over about ``window`` steps, and the time left.

    The first step (which often pays for loading and warm-up) seeds the average and is forgotten as
    the steps go by, so the estimate follows the steady pace instead of the start."""

    def __init__(self, window: int = 20):
        self.alpha = 2.0 / (window + 1)
        self.seconds_per_step: float | None = None

    def update(self, seconds: float) -> float:
        s = max(float(seconds), 0.0)
        prev = self.seconds_per_step
        self.seconds_per_step = s if prev is None else prev + self.alpha * (s - prev)
        return self.seconds_per_step

    def left(self, steps_left: int) -> float:
        return (self.seconds_per_step or 0.0) * max(int(steps_left), 0)


def duration(seconds: float) -> str:
    """A time span for people: "42 s", "3 min 05 s", "2 h 07 min"."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def pace_text(info: dict) -> str:
    """ "0.57 s/step, 19 min 00 s left" from a step's ``info`` (empty when it has no pace)."""
    if info.get("sec_per_step") is None:
        return ""
    return f"{info['sec_per_step']:.3g} s/step, {duration(info.get('eta_s', 0.0))} left"


@dataclass
class FitResult:
    losses: list[float]  # the weighted total per step
    terms: dict[str, list[float]] = field(default_factory=dict)  # each term's (unweighted) value per step
    seconds: float = 0.0
    steps_done: int = 0
    checkpoint: Path | None = None  # the last checkpoint written (None: none was)
    resumed_from: int = 0  # the step the run continued from (0: a fresh run)


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


def optimizer_library(name: str):
    """bitsandbytes for an 8-bit optimiser ``name`` (None for torch's own), or an ImportError naming the fix."""
    check_optimizer(name)
    if not name.endswith("8bit"):
        return None
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"optimizer {name!r} needs bitsandbytes, which is not installed ({e}); install it "
                          f"(pip install bitsandbytes) or use optimizer {name[:-4]!r}") from None
    return bitsandbytes


def make_optimizer(parameters: Iterable, config: FitConfig) -> torch.optim.Optimizer:
    """torch's Adam / AdamW, or (``adam8bit`` / ``adamw8bit``) bitsandbytes' 8-bit versions: the two moments
    stored blockwise-quantised in one byte each instead of four (tensors under 4,096 entries keep 32-bit
    moments), so a full fine-tune's optimiser state takes a quarter of the memory; the update is Adam's up to
    that quantisation.  bitsandbytes is optional (not in the requirements; 0.45 and later run on the CPU too)."""
    params = list(parameters)
    if config.optimizer.endswith("8bit"):
        bnb = optimizer_library(config.optimizer)
        cls = bnb.optim.AdamW8bit if config.optimizer == "adamw8bit" else bnb.optim.Adam8bit
        return cls(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)


def fit(parameters: Iterable, batches: Callable[[int], Any], terms: Sequence[Term], config: FitConfig,
        device: torch.device | str = "cpu", scope: Callable[[], AbstractContextManager] | None = None,
        on_step: OnStep | None = None, should_stop: ShouldStop | None = None,
        after_step: Callable[[int], dict | None] | None = None,
        optimizer: torch.optim.Optimizer | None = None, checkpointing: Checkpointing | None = None,
        extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None) -> FitResult:
    """Minimise sum_k w_k term_k over ``parameters`` for ``config.steps`` steps.

    ``on_step(i, n, info)`` gets ``info["loss"]`` (the total), ``info["terms"]``, the pace
    ``info["sec_per_step"]`` (a moving average, :class:`Pace`) and ``info["eta_s"]`` (the
    seconds left at that pace); it may raise to cancel, and ``should_stop()`` True raises
    :class:`Interrupted`.
    ``after_step(i)`` runs after each optimiser step (e.g. an EMA update); a dict it
    returns is merged into ``info``.  ``optimizer``: an existing optimiser to continue
    (its parameters replace ``parameters``).  ``checkpointing``: write checkpoints and / or
    resume one (see :mod:`core.checkpoint`); ``extra_state``: (get, set) of further tensors a
    checkpoint keeps (an EMA), by name.
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
    in_backward = StepInBackward(opt, trainable) if config.step_in_backward and scaler is None else None
    result = FitResult([], {t.name: [] for t in terms})
    if checkpointing is not None and checkpointing.resume is not None:
        result.resumed_from = _restore(checkpointing, trainable, opt, sched, scaler, extra_state, result, config)
    t0 = time.perf_counter()
    done = result.resumed_from  # optimiser steps taken, counting those before a resume
    saved_at = result.resumed_from  # the step of the newest checkpoint on disk for this run
    current = done  # the step under way
    rngs_before: dict[str, torch.Tensor] = {}  # the generators at the start of the current step

    def snapshot(step: int, rngs: dict[str, torch.Tensor]) -> ckpt.Snapshot:
        return ckpt.Snapshot(step, trainable, opt.state_dict(), sched.state_dict() if sched else None,
                             scaler.state_dict() if scaler else None, rngs, list(result.losses),
                             {k: list(v) for k, v in result.terms.items()},
                             extra_state[0]() if extra_state is not None else {})

    pace = Pace()
    try:
        for step in range(done + 1, config.steps + 1):
            current = step
            if checkpointing is not None:
                rngs_before = checkpointing.rng_states()
            started = time.perf_counter()
            _one_step(step, opt, sched, scaler, trainable, batches, terms, config, device, scope, should_stop,
                      result, in_backward)
            done = step
            per_step = pace.update(time.perf_counter() - started)
            info = {"loss": result.losses[-1], "terms": {k: v[-1] for k, v in result.terms.items()},
                    "lr": opt.param_groups[0]["lr"], "sec_per_step": per_step,
                    "eta_s": pace.left(config.steps - step)}
            if after_step is not None:
                info.update(after_step(step) or {})
            if checkpointing is not None and checkpointing.every and (step % checkpointing.every == 0
                                                                      or step == config.steps):
                result.checkpoint = ckpt.save(checkpointing, snapshot(step, checkpointing.rng_states()))
                saved_at = step
            if on_step is not None:
                on_step(step, config.steps, info)
    except FloatingPointError:
        raise  # a diverged state is not worth keeping
    except BaseException:
        # cancelled or failed: keep the steps completed.  A step interrupted before its optimiser step
        # did not count, so the generators are saved as they were before it drew its batch.
        if checkpointing is not None and done > saved_at:
            try:
                finished = done == current  # stopped after its optimiser step (in on_step or after_step)
                rngs = checkpointing.rng_states() if finished else rngs_before
                result.checkpoint = ckpt.save(checkpointing, snapshot(done, rngs))
                if result.checkpoint is not None:
                    logging.getLogger("comfyui-single-image-edit").warning(
                        "%s stopped after %d steps; its state is saved in %s (resume from it to continue)",
                        config.what, done, result.checkpoint)
            except Exception as e:  # never hide why the run stopped
                logging.getLogger("comfyui-single-image-edit").error("could not write the checkpoint: %s", e)
        if checkpointing is not None and checkpointing.on_kept is not None and result.checkpoint is not None:
            try:
                checkpointing.on_kept(result.checkpoint)  # the newest file of this run, written now or before
            except Exception as e:  # never hide why the run stopped
                logging.getLogger("comfyui-single-image-edit").error("could not report the checkpoint: %s", e)
        raise
    finally:
        if in_backward is not None:
            in_backward.remove()
    result.seconds = time.perf_counter() - t0
    return result


class StepInBackward:
    """The optimiser step taken parameter by parameter inside backward (``FitConfig.step_in_backward``).

    Each trained tensor gets a post-accumulate-grad hook that runs the optimiser on that tensor alone
    (its own group's settings and state: the same update as one step over all of them, since Adam's
    update of a tensor reads only that tensor's gradient and state) and frees its gradient at once.
    So no complete set of gradients is ever held: for a full fine-tune the peak drops by one copy of the
    trained weights (the community pipelines hold weights, gradients and two Adam moments; this holds
    weights and the moments).  The step cannot see every gradient at once, so it excludes clipping
    by global norm and fp16 loss scaling (the fit loop steps as usual under a GradScaler).  A tensor
    whose gradient arrives twice in one backward (used by two separately recomputed segments) would
    be stepped twice: that is refused, naming it."""

    def __init__(self, opt: torch.optim.Optimizer, trainable: Sequence[torch.Tensor]):
        self.opt = opt
        # the group's index, not the group: load_state_dict (a resume) replaces the group dicts, and the
        # scheduler then sets the learning rate on the new ones
        self.group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        self.stepped: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in trainable]

    def _step(self, p: torch.Tensor) -> None:
        if id(p) in self.stepped:
            raise RuntimeError(f"a trained tensor of shape {tuple(p.shape)} received two gradients in one backward; "
                               "step_in_backward needs one: turn it off for this model")
        self.stepped.add(id(p))
        groups = self.opt.param_groups
        self.opt.param_groups = [{**groups[self.group_of[id(p)]], "params": [p]}]
        try:
            self.opt.step()
        finally:
            self.opt.param_groups = groups
        p.grad = None

    def begin(self) -> None:
        self.stepped.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _one_step(step, opt, sched, scaler, trainable, batches, terms, config, device, scope, should_stop,
              result: FitResult, in_backward: StepInBackward | None = None) -> None:
    """Draw the step's batch, back-propagate the weighted terms, take the optimiser step, record the losses."""
    poll(should_stop, config.what, step - 1)
    batch = batches(step)
    with scope() if scope is not None else nullcontext():
        with autocast_for(device, config.precision):
            values = [term.fn(batch) for term in terms]
            loss = sum(term.weight * v.float() for term, v in zip(terms, values))
        opt.zero_grad(set_to_none=True)
        if in_backward is not None:
            in_backward.begin()
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
    elif in_backward is None:
        opt.step()
    if sched is not None:
        sched.step()
    total = loss.item()
    result.losses.append(total)
    for term, v in zip(terms, values):
        result.terms[term.name].append(v.item())
    result.steps_done = step
    check_finite(total, step, config.what)


def _restore(ck: Checkpointing, trainable, opt, sched, scaler, extra_state, result: FitResult,
             config: FitConfig) -> int:
    """Load ``ck.resume`` into the trained tensors, optimiser, scheduler, scaler, generators and curves;
    returns the step it was saved at."""
    snap = ckpt.load(ck, ck.resume, trainable)
    if snap.step > config.steps:
        raise ckpt.ResumeError(f"{Path(ck.resume).name} was saved after {snap.step} steps; this run asks for "
                                   f"{config.steps} in all: ask for more steps than {snap.step}")
    with torch.no_grad():
        for p, t in zip(trainable, snap.params):
            p.copy_(t)
    opt.load_state_dict(snap.optimizer)
    if sched is not None and snap.scheduler is not None:
        state = dict(snap.scheduler)
        if "milestones" in state:  # JSON made the milestone keys strings
            state["milestones"] = Counter({int(k): v for k, v in state["milestones"].items()})
        sched.load_state_dict(state)
    if scaler is not None and snap.scaler:
        scaler.load_state_dict(snap.scaler)
    for name, g in ck.rngs.items():
        g.set_state(snap.rngs[name])
    if extra_state is not None:
        extra_state[1](snap.extra)
    result.losses[:] = snap.losses
    for name in result.terms:
        result.terms[name][:] = snap.terms.get(name, [])
    result.steps_done = snap.step
    return snap.step
