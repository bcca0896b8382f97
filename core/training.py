"""Small pieces shared by the pack's optimisation loops (no ComfyUI here).

Loops take ``on_step(i, total, info)`` (progress; may raise to cancel) and
``should_stop()`` (polled every step; True raises :class:`Interrupted`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

OnStep = Callable[[int, int, dict], None]
ShouldStop = Callable[[], bool]


class Interrupted(RuntimeError):
    """Raised inside a core loop when ``should_stop()`` returns True."""


def poll(should_stop: ShouldStop | None, what: str, step: int) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted(f"{what} stopped after {step} steps")


def check_finite(loss: float, step: int, what: str) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"{what} diverged at step {step} (loss {loss}); lower the learning rate")


def autocast_for(device: torch.device):
    """bf16 (or fp16) autocast on a GPU, nothing on the CPU (fp32 there)."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)
