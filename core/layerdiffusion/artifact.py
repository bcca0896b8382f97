"""A LayerDiffusion edit and its file (``sie.layerdiffusion``), for the CLI (and later the nodes).

Safetensors: the fine-tuned delta in ComfyUI's LoRA layout (so ComfyUI's own LoRA loaders read it),
the embeddings stage 3 needs, ``sie.e_a`` (e^_a) and ``sie.e_opt``, plus ``sie.e_b`` (e^_b, to
re-interpolate with another alpha), each [1, 77, D]; in the header ``format``/``version``/``method``/
``mode``, ``alpha``, the two texts and the training summary as JSON.  Writes are atomic; reads check
the format tag first (:func:`core.artifact_io.read_artifact`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..artifact_io import ArtifactError, atomic_save_safetensors, read_artifact
from ..lora import delta_weights

FORMAT = "sie.layerdiffusion"
VERSION = 1
KEYS = {"e_a": "sie.e_a", "e_b": "sie.e_b", "e_opt": "sie.e_opt"}



@dataclass
class LayerDiffusionFile:
    """What stage 3 needs: the delta (LoRA-file layout) and e^_a, e^_b, e_opt."""

    delta: dict[str, torch.Tensor]
    mode: str
    e_a: torch.Tensor
    e_b: torch.Tensor
    e_opt: torch.Tensor
    alpha: float
    texts: dict[str, str] = field(default_factory=dict)  # "object", "background"
    info: dict = field(default_factory=dict)

    def weight_functions(self, strength: float = 1.0) -> dict[str, nn.Module]:
        return delta_weights(self.delta).functions(strength)


def save_layerdiffusion(edit, path: str | os.PathLike, object_text: str = "", background_text: str = "") -> Path:
    """Write a :class:`.pipeline.LayerDiffusionEdit` to ``path`` (.safetensors) atomically; returns the path."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in edit.tuned.delta.items()}
    for name, t in (("e_a", edit.layers.e_a), ("e_b", edit.layers.e_b), ("e_opt", edit.e_opt)):
        tensors[KEYS[name]] = t.detach().float().contiguous().cpu()
    info = {"embedding_steps": len(edit.layers.losses), "reading": edit.layers.reading,
            "finetune_steps": len(edit.tuned.losses), "final_loss": edit.tuned.losses[-1] if edit.tuned.losses else None,
            "final_terms": {k: v[-1] for k, v in edit.tuned.terms.items() if v},
            "trainable_parameters": edit.tuned.trainable_parameters}
    meta = {"format": FORMAT, "version": str(VERSION), "method": "layerdiffusion", "mode": edit.tuned.mode,
            "alpha": repr(float(edit.alpha)), "object_text": object_text, "background_text": background_text,
            "info": json.dumps(info, default=str)}
    return atomic_save_safetensors(tensors, path, meta)


def load_layerdiffusion(path: str | os.PathLike) -> LayerDiffusionFile:
    """Read a file written by :func:`save_layerdiffusion`; ArtifactError (a ValueError) for any other file."""
    tensors, meta = read_artifact(path, FORMAT, VERSION)
    missing = [k for k in KEYS.values() if k not in tensors]
    if missing:
        raise ArtifactError(path, f"a LayerDiffusion edit without {', '.join(missing)}")
    try:
        alpha = float(meta.get("alpha", "0.7"))
        info = json.loads(meta.get("info", "{}"))
    except ValueError:
        raise ArtifactError(path, "a LayerDiffusion edit with a damaged header") from None
    emb = {name: tensors.pop(key) for name, key in KEYS.items()}
    return LayerDiffusionFile(tensors, meta.get("mode", "unknown"), emb["e_a"], emb["e_b"], emb["e_opt"], alpha,
                              {"object": meta.get("object_text", ""), "background": meta.get("background_text", "")},
                              info if isinstance(info, dict) else {})
