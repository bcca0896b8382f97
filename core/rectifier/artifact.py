"""A trained rectifier and its file (``sie.rectifier``).

Safetensors: R's parameters (and BatchNorm statistics) under their module names; in the
header ``format``/``version``/``method``, ``config`` (the architecture as JSON, with the
modulated layers' names and kernel shapes, :class:`.hypernet.RectifierConfig`), ``backbone``
("pixel" or "ldm", the layer layout it was made for), ``mode`` (recon / edit), the source and
target texts, and the training summary.  Writes are atomic; reads check the format tag first
and then that every tensor is present with its shape (:func:`core.artifact_io.read_artifact`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifact_io import ArtifactError, atomic_save_safetensors, read_artifact
from .hypernet import Rectifier, RectifierConfig

FORMAT = "sie.rectifier"
VERSION = 1


@dataclass
class RectifierInfo:
    """What a rectifier was trained for (kept with it, saved in the header)."""

    backbone: str  # "pixel" | "ldm"
    mode: str = "recon"  # the last training mode
    source_text: str = ""
    target_text: str = ""
    steps: int = 0
    history: list = field(default_factory=list)  # one dict per training run

    def to_json(self) -> dict:
        return {"backbone": self.backbone, "mode": self.mode, "source_text": self.source_text,
                "target_text": self.target_text, "steps": self.steps, "history": self.history}


def save_rectifier(rectifier: Rectifier, info: RectifierInfo, path: str | os.PathLike) -> Path:
    tensors = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
               for k, v in rectifier.state_dict().items()}
    meta = {"format": FORMAT, "version": str(VERSION), "method": "rectifier", "backbone": info.backbone,
            "mode": info.mode, "config": json.dumps(rectifier.config.to_json()),
            "info": json.dumps(info.to_json(), default=str)}
    return atomic_save_safetensors(tensors, path, meta)


def load_rectifier(path: str | os.PathLike, device="cpu") -> tuple[Rectifier, RectifierInfo]:
    tensors, meta = read_artifact(path, FORMAT, VERSION)
    try:
        config = RectifierConfig.from_json(json.loads(meta["config"]))
        raw = json.loads(meta.get("info", "{}"))
        info = RectifierInfo(str(raw.get("backbone", meta.get("backbone", ""))), str(raw.get("mode", "recon")),
                             str(raw.get("source_text", "")), str(raw.get("target_text", "")),
                             int(raw.get("steps", 0)), list(raw.get("history", [])))
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(path, f"a rectifier file with a damaged header ({type(e).__name__}: {e})") from None
    rectifier = Rectifier(config)
    own = rectifier.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or extra or wrong:
        raise ArtifactError(path, "a rectifier file whose tensors do not match its header "
                                  f"(missing {missing[:2]}, unexpected {extra[:2]}, wrong shape {wrong[:2]})")
    rectifier.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return rectifier.to(device).eval(), info


def check_fits(rectifier: Rectifier, params: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless every layer R modulates exists in ``params`` with R's kernel shape."""
    bad = []
    for spec in rectifier.config.layers:
        p = params.get(spec.name)
        if p is None or tuple(p.shape) != spec.shape:
            bad.append(f"{spec.name} {spec.shape} (model: {None if p is None else tuple(p.shape)})")
    if bad:
        raise ValueError(f"this rectifier was trained for another network: {len(bad)} of its "
                         f"{len(rectifier.config.layers)} layers do not fit, e.g. {bad[0]}")
