"""A full fine-tune of the model's own float32 weights in place, with one copy of them in memory.

Training a float32 *copy* of every UNet weight beside the frozen float32 base holds two copies
(3.4 GB each for SD 1.5); the community pipelines train the weights themselves.  Here the
original values are written once to a temporary safetensors file, the model's own parameters are
trained (``requires_grad`` on, no weight functions, no copy), and on leaving the block -- normally,
cancelled or failed -- every parameter is written back from the file bit for bit, its
``requires_grad`` restored, and the file removed.  So the model is unchanged afterwards, as with a
copy, and while training the memory holds one copy of the weights plus the optimiser's state.
The trained delta (trained - original) is read one tensor at a time against the file
(:meth:`InPlace.deltas`), before the weights are restored.

Used where it is safe: float32 parameters that are ordinary leaf tensors of a module this process
owns (the diffusers back end: ``DiffusersSD.trains_in_place``).  ComfyUI's MODEL weights are shared
with other nodes and usually half precision: there the fine-tune trains a float32 copy.

    with InPlace(model.unet_parameters()) as run:
        fit(run.params, ...)
        deltas = run.deltas()          # {name: trained - original}, the parameters that moved
    # the model's weights are the originals again
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("comfyui-single-image-edit")


def can_train_in_place(model, params: Mapping[str, torch.Tensor]) -> bool:
    """The back end allows it (``model.trains_in_place``) and every tensor is a float32 leaf parameter."""
    return bool(getattr(model, "trains_in_place", False)) and all(
        isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 and not p.is_inference()
        for p in params.values())


class InPlace:
    """Context manager: ``params`` (name -> the model's own float32 parameters) trainable in place, the
    originals spilled to a temporary file in ``folder`` (default: the system's temporary folder) and
    restored on exit."""

    def __init__(self, params: Mapping[str, torch.Tensor], folder: str | os.PathLike | None = None):
        self.named = dict(params)
        self.folder = folder
        self.dir: Path | None = None
        self.file: Path | None = None
        self.requires_grad = {n: p.requires_grad for n, p in self.named.items()}

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.named.values())

    def __enter__(self) -> "InPlace":
        from safetensors.torch import save_file

        self.dir = Path(tempfile.mkdtemp(prefix="sie_inplace_", dir=self.folder))
        self.file = self.dir / "original.safetensors"
        try:
            save_file({n: p.detach().cpu().contiguous() for n, p in self.named.items()}, str(self.file))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        for p in self.named.values():
            p.requires_grad_(True)
        return self

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """{name: trained - original} (float32, CPU) of every parameter that moved, one tensor at a time."""
        from safetensors import safe_open

        out = {}
        with safe_open(str(self.file), "pt") as f:
            for name, p in self.named.items():
                d = p.detach().float().cpu() - f.get_tensor(name).float()
                if bool(d.any()):
                    out[name] = d
        return out

    def __exit__(self, *exc) -> None:
        from safetensors import safe_open

        try:
            with torch.no_grad(), safe_open(str(self.file), "pt") as f:
                for name, p in self.named.items():
                    p.grad = None
                    p.copy_(f.get_tensor(name))
                    p.requires_grad_(self.requires_grad[name])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Trainables:
    """What a fine-tune trains: weight functions to adapt the model with (``fns``: LoRA adapters or float32
    copies; none when training in place) and the tensors the optimiser steps (``params``)."""

    def __init__(self, fns: dict, params: list[torch.Tensor], run: InPlace | None):
        self.fns, self.params, self.run = fns, params, run

    def result(self, mode: str, base: Mapping[str, torch.Tensor], prefix: str | None = None):
        """(the delta in ComfyUI's LoRA-file layout, :class:`core.lora.Deltas`) of the training so far; in
        place, call it inside the block (before the originals are restored)."""
        from .lora import PREFIX, Deltas, diff_state_dict, trained_delta

        prefix = PREFIX if prefix is None else prefix
        if self.run is not None:
            d = self.run.deltas()
            return diff_state_dict(d, prefix), Deltas(d)
        return trained_delta(mode, self.fns, base, prefix)


@contextmanager
def trainables(model, mode: str, params: Mapping[str, torch.Tensor], lora, seed: int, device,
               in_place: bool = True) -> Iterator[Trainables]:
    """``with trainables(model, mode, params, lora, seed, device) as tr``: a full fine-tune in place where
    :func:`can_train_in_place` (and ``in_place``), else :func:`core.lora.trainable_functions`."""
    from .lora import trainable_functions

    if mode == "full" and in_place and can_train_in_place(model, params):
        try:
            run = InPlace(params).__enter__()
        except OSError as e:  # no room for the spill file: a copy needs memory, not disk
            log.warning("cannot train the weights in place (writing their originals to %s failed: %s); "
                        "training a float32 copy instead, which needs one more copy of the weights in memory",
                        tempfile.gettempdir(), e)
        else:
            try:
                yield Trainables({}, run.params, run)
            finally:
                run.__exit__(None, None, None)
            return
    fns = trainable_functions(mode, params, lora, seed, device)
    yield Trainables(fns, [p for fn in fns.values() for p in fn.parameters()], None)
