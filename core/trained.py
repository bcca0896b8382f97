"""A fine-tuned UNet delta with the embedding it was tuned at, and its file (``sie.trained``).

Imagic's stage 2 and LayerDiffusion's stage 2 both give one (the method is in the header), written
by Save Trained and the Imagic CLI and read by Load Trained, so it lives in the engine.

The file is safetensors: the weight delta in ComfyUI's LoRA layout (so ComfyUI's own LoRA
loaders read it), the embedding e_opt it was tuned at under ``sie.embedding``, and in the
header ``format``/``version``/``method``/``mode``/``precision`` plus the training summary as
JSON.  Writes are atomic; reads check the format tag first (:func:`core.artifact_io.read_artifact`).

``precision``: the delta is stored in float32 (default) or float16.  A full fine-tune of SD 1.5
is 3.4 GB in float32, 1.7 GB in float16.  float16 rounds each delta entry to 2^-11 of itself
(entries under 6.1e-5 to a fixed step of 6e-8), far finer than the float16 weights ComfyUI
usually samples with (their step is 2^-11 of the weight, and weights are ~100x larger than a
1,000-step delta at lr 2e-6); e_opt is always float32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact_io import ArtifactError, atomic_save_safetensors, read_artifact

FORMAT = "sie.trained"
VERSION = 1
EMBEDDING_KEY = "sie.embedding"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Trained:
    """A fine-tuning result: the weight delta (LoRA-file layout) and the embedding it was tuned at."""

    delta: dict[str, torch.Tensor]
    mode: str
    embedding: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def save_trained(trained: Trained, path: str | os.PathLike, precision: str = "fp32") -> Path:
    """Write ``trained`` to ``path`` (.safetensors) atomically, the delta in ``precision`` ("fp32" or
    "fp16"); returns the path.  Raises ValueError (nothing written) for an unknown precision or a
    delta outside float16's range."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    limit = torch.finfo(dtype).max
    tensors = {}
    for k, v in trained.delta.items():
        v = v.detach().float().contiguous().cpu()
        peak = v.abs().max().item() if dtype != torch.float32 and v.numel() else 0.0
        if not peak <= limit:  # also NaN
            raise ValueError(f"the delta {k} reaches {peak:.3g}, beyond {precision}'s range ({limit:.0f}); "
                             "save it in fp32")
        tensors[k] = v.to(dtype)
    if trained.embedding is not None:
        tensors[EMBEDDING_KEY] = trained.embedding.detach().float().contiguous().cpu()
    meta = {"format": FORMAT, "version": str(VERSION), "method": "imagic", "mode": trained.mode,
            "precision": precision, "info": json.dumps(trained.info, default=str)}
    return atomic_save_safetensors(tensors, path, meta)


def load_trained(path: str | os.PathLike) -> Trained:
    """Read a file written by :func:`save_trained`; raises ArtifactError (a ValueError) for any other file."""
    tensors, meta = read_artifact(path, FORMAT, VERSION)
    try:
        info = json.loads(meta.get("info", "{}"))
    except ValueError:
        raise ArtifactError(path, "an Imagic edit with a damaged 'info' entry in its header") from None
    embedding = tensors.pop(EMBEDDING_KEY, None)
    return Trained(tensors, meta.get("mode", "unknown"), embedding, info if isinstance(info, dict) else {})
