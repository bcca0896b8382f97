"""An Imagic fine-tuning result and its file (``sie.trained``), shared by the nodes and the CLI.

The file is safetensors: the weight delta in ComfyUI's LoRA layout (so ComfyUI's own LoRA
loaders read it), the embedding e_opt it was tuned at under ``sie.embedding``, and in the
header ``format``/``version``/``method``/``mode`` plus the training summary as JSON.
Writes are atomic; reads check the format tag first (:func:`core.artifact_io.read_artifact`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifact_io import ArtifactError, atomic_save_safetensors, read_artifact

FORMAT = "sie.trained"
VERSION = 1
EMBEDDING_KEY = "sie.embedding"


@dataclass
class Trained:
    """A fine-tuning result: the weight delta (LoRA-file layout) and the embedding it was tuned at."""

    delta: dict[str, torch.Tensor]
    mode: str
    embedding: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def save_trained(trained: Trained, path: str | os.PathLike) -> Path:
    """Write ``trained`` to ``path`` (.safetensors) atomically; returns the path."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in trained.delta.items()}
    if trained.embedding is not None:
        tensors[EMBEDDING_KEY] = trained.embedding.detach().float().contiguous().cpu()
    meta = {"format": FORMAT, "version": str(VERSION), "method": "imagic", "mode": trained.mode,
            "info": json.dumps(trained.info, default=str)}
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
