"""A trained SinDDM model (the SIE_SINDDM object) and its safetensors file.

The file holds the EMA network weights and the training pyramid (uint8 images of every
scale), with the network config, the pyramid geometry and errors and the training
summary as JSON in the safetensors header.  Loading needs nothing else: no pickle, no
original image.  Writes are atomic (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifact_io import ArtifactError, atomic_save_safetensors, read_artifact
from .model import NetConfig, SinDDMNet, private_rng
from .pyramid import Pyramid, PyramidSpec, pyramid_from_scales
from .schedule import MultiScaleSchedule

FORMAT = "sie.sinddm"
VERSION = 1


@dataclass
class SinDDM:
    net: SinDDMNet
    pyramid: Pyramid
    schedule: MultiScaleSchedule
    info: dict = field(default_factory=dict)

    @classmethod
    def create(cls, net: SinDDMNet, pyramid: Pyramid, info: dict | None = None) -> "SinDDM":
        return cls(net, pyramid, MultiScaleSchedule.build(pyramid.spec.errors), dict(info or {}))

    def schedule_with(self, start_steps=None) -> MultiScaleSchedule:
        if start_steps is None:
            return self.schedule
        return MultiScaleSchedule.build(self.pyramid.spec.errors, self.schedule.num_timesteps,
                                        start_override=list(start_steps))

    def with_schedule(self, schedule: MultiScaleSchedule) -> "SinDDM":
        return dataclasses.replace(self, schedule=schedule)

    @property
    def training_size(self) -> tuple[int, int]:
        """(H, W) of the finest scale."""
        return self.pyramid.spec.sizes[-1]

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the image the model was trained on, before the 50,000-pixel cap (the finest scale's
        size for files saved before it was recorded)."""
        return self.pyramid.spec.input_size or self.training_size

    @property
    def input_scale(self) -> tuple[float, float]:
        """(s_y, s_x): pixels of the training pyramid's finest scale per pixel of the image as given
        (1, 1 below the cap; e.g. 193/300, 258/400 for a 400x300 image)."""
        (h, w), (h0, w0) = self.training_size, self.input_size
        return h / h0, w / w0

    def describe(self) -> str:
        spec = self.pyramid.spec
        sizes = ", ".join(f"{w}x{h}" for h, w in spec.sizes)
        if self.input_size != self.training_size:
            sizes += f"; trained on a {self.input_size[1]}x{self.input_size[0]} image, capped"
        return (f"SinDDM width {self.net.config.width}, {spec.n_scales} scales ({sizes}), r={spec.scale_factor:.4f}, "
                f"T[s]={list(self.schedule.start_steps)}, trained {self.info.get('steps_done', '?')} steps")


def save(model: SinDDM, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (.safetensors) atomically; returns the path."""
    tensors = {f"net.{k}": v.detach().float().contiguous().cpu() for k, v in model.net.state_dict().items()}
    for s in range(model.pyramid.spec.n_scales):
        tensors[f"pyramid.{s}"] = model.pyramid.uint8(s).contiguous()
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "net": json.dumps(dataclasses.asdict(model.net.config)),
        "pyramid": json.dumps(model.pyramid.spec.to_dict()),
        "info": json.dumps(model.info, default=str),
    }
    return atomic_save_safetensors(tensors, path, meta)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SinDDM:
    """Read a model written by :func:`save`; raises ArtifactError (a ValueError naming the file) for any other file."""
    tensors, meta = read_artifact(path, FORMAT, VERSION)
    try:
        with private_rng():  # the initial weights are replaced by the file's; leave the process RNG alone
            net = SinDDMNet(NetConfig(**json.loads(meta["net"])))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        spec = PyramidSpec.from_dict(json.loads(meta["pyramid"]))
        scales = [tensors[f"pyramid.{s}"] for s in range(spec.n_scales)]
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's mismatch
        raise ArtifactError(path, f"a SinDDM model with damaged contents ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return SinDDM.create(net.to(device).eval(), pyramid_from_scales(spec, scales), info)
