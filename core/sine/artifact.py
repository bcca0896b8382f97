"""A SINE fine-tune and its file (``sie.sine``), for the CLI (and later the nodes).

Safetensors: the weight delta in ComfyUI's LoRA layout (UNet keys ``diffusion_model.``, text-encoder
keys ``text_encoders.clip_l.transformer.`` when it was trained; ComfyUI's LoRA loaders read both), and in
the header ``format``/``version``/``method``/``mode``, the fine-tune ``prompt``, ``positional``
("1": trained with patches, edit with F(v)), ``channels`` and ``grid_size`` of the map, and the
training summary as JSON.  The fine-tune conditioning c^ that training used is stored as the tensor
:data:`C_HAT_KEY` [1, 77, D] (header ``c_hat: "1"``), so an edit reloads exactly what was trained,
whatever text the recipe's prompt says; files without it (written before) load with ``c_hat`` None.
Writes are atomic; reads check the format tag first (:func:`core.artifact_io.read_artifact`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..artifact_io import ArtifactError, atomic_save_safetensors, read_artifact
from ..lora import TEXT_PREFIX, delta_weights
from .finetune import SineFineTuneResult

FORMAT = "sie.sine"
VERSION = 1
C_HAT_KEY = "sie_sine.c_hat"
"""The stored c^ (not a LoRA key: ComfyUI's LoRA loader would only warn about it)."""


def save_sine(tuned: SineFineTuneResult, prompt: str, path: str | os.PathLike) -> Path:
    """Write ``tuned`` (tuned at ``prompt``) to ``path`` (.safetensors) atomically; returns the path."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tuned.file_delta.items()}
    if tuned.c_hat is not None:
        tensors[C_HAT_KEY] = tuned.c_hat.detach().float().contiguous().cpu()[:1]
    info = {"steps": len(tuned.losses), "final_loss": tuned.losses[-1] if tuned.losses else None,
            "seconds": tuned.seconds, "trainable_parameters": tuned.trainable_parameters}
    meta = {"format": FORMAT, "version": str(VERSION), "method": "sine", "mode": tuned.mode, "prompt": prompt,
            "positional": "1" if tuned.positional else "0", "channels": str(tuned.channels),
            "grid_size": str(tuned.grid_size), "text_encoder": "1" if tuned.text_delta else "0",
            "c_hat": "1" if tuned.c_hat is not None else "0",
            "info": json.dumps(info, default=str)}
    return atomic_save_safetensors(tensors, path, meta)


def load_sine(path: str | os.PathLike) -> tuple[SineFineTuneResult, str]:
    """(result, fine-tune prompt) from a file written by :func:`save_sine`; ArtifactError for any other file."""
    tensors, meta = read_artifact(path, FORMAT, VERSION)
    try:
        channels, grid = int(meta.get("channels", "320")), int(meta.get("grid_size", "128"))
        info = json.loads(meta.get("info", "{}"))
    except ValueError:
        raise ArtifactError(path, "a SINE fine-tune with a damaged header") from None
    c_hat = tensors.pop(C_HAT_KEY, None)
    if c_hat is not None and (c_hat.ndim != 3 or c_hat.shape[0] != 1):
        raise ArtifactError(path, f"a SINE fine-tune whose stored c^ has shape {tuple(c_hat.shape)}, not [1, 77, D]")
    unet = {k: v for k, v in tensors.items() if not k.startswith(TEXT_PREFIX)}
    text = {k: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    result = SineFineTuneResult(meta.get("mode", "unknown"), unet, delta_weights(unet), [], {}, 0.0,
                                int(info.get("trainable_parameters", 0)) if isinstance(info, dict) else 0,
                                meta.get("positional") == "1", channels, grid, text,
                                delta_weights(text, TEXT_PREFIX), c_hat)
    return result, meta.get("prompt", "")

