"""A SINE fine-tune and its file (``sie.sine``), for the CLI (and later the nodes).

Safetensors: the weight delta in ComfyUI's LoRA layout (UNet keys ``diffusion_model.``, text-encoder
keys ``text_encoders.clip_l.transformer.`` when it was trained; ComfyUI's LoRA loaders read both), and in
the header ``format``/``version``/``method``/``mode``, the fine-tune ``prompt``, ``positional``
("1": trained with patches, edit with F(v)), ``channels`` and ``grid_size`` of the map, and the
training summary as JSON.  Writes are atomic; reads check the format tag first
(:func:`core.artifact_io.read_artifact`).
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


def save_sine(tuned: SineFineTuneResult, prompt: str, path: str | os.PathLike) -> Path:
    """Write ``tuned`` (tuned at ``prompt``) to ``path`` (.safetensors) atomically; returns the path."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tuned.file_delta.items()}
    info = {"steps": len(tuned.losses), "final_loss": tuned.losses[-1] if tuned.losses else None,
            "seconds": tuned.seconds, "trainable_parameters": tuned.trainable_parameters}
    meta = {"format": FORMAT, "version": str(VERSION), "method": "sine", "mode": tuned.mode, "prompt": prompt,
            "positional": "1" if tuned.positional else "0", "channels": str(tuned.channels),
            "grid_size": str(tuned.grid_size), "text_encoder": "1" if tuned.text_delta else "0",
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
    unet = {k: v for k, v in tensors.items() if not k.startswith(TEXT_PREFIX)}
    text = {k: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    result = SineFineTuneResult(meta.get("mode", "unknown"), unet, delta_weights(unet), [], {}, 0.0,
                                int(info.get("trainable_parameters", 0)) if isinstance(info, dict) else 0,
                                meta.get("positional") == "1", channels, grid, text,
                                delta_weights(text, TEXT_PREFIX))
    return result, meta.get("prompt", "")

