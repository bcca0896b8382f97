"""OpenCLIP models for the methods that guide or train with CLIP (SinDDM's text guidance, the
rectifier's directional edit loss): the SIE_OPEN_CLIP object, loading it from a local file, and
CLIP's input normalisation.

Nothing is downloaded: the architecture is built with random weights (inside
:func:`core.seeds.private_rng`, so the process's random stream is untouched) and the weights
come from the user's file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .seeds import private_rng

# CLIP's image normalisation (OpenAI's released models; OpenCLIP uses the same for them)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OpenCLIP:
    """An OpenCLIP model with its tokenizer (the SIE_OPEN_CLIP object)."""

    model: torch.nn.Module
    tokenizer: object
    arch: str
    image_size: int = 224

    def encode_text(self, texts: list[str], device) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] already normalised."""
        return self.model.encode_image(images).float()


def load_open_clip(path: str | os.PathLike, arch: str = "ViT-B-32", device="cpu") -> OpenCLIP:
    """Build OpenCLIP architecture ``arch`` and load its weights from a local file.

    safetensors files load directly; .bin/.pt/.pth checkpoints (OpenCLIP's release
    format) are read with ``torch.load(weights_only=True)``, which refuses arbitrary
    pickled objects.  Nothing is downloaded.
    """
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint not found: {path}")
    if arch not in open_clip.list_models():
        raise ValueError(f"arch: unknown OpenCLIP architecture {arch!r} (see open_clip.list_models())")
    with private_rng():  # the random initial weights are replaced below; leave the process RNG alone
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path.name} does not match OpenCLIP architecture {arch}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return OpenCLIP(model, open_clip.get_tokenizer(arch), arch, size)


__all__ = ["CLIP_MEAN", "CLIP_STD", "OpenCLIP", "load_open_clip"]
