"""OpenCLIP models for tests, made in code: a tiny random CLIP in memory, and random-weight registered
architectures written once as safetensors files in the test cache (the format users load)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CACHE = Path(os.environ.get("SIE_TEST_CACHE", Path.home() / ".cache" / "comfyui-single-image-edit"))


def tiny_open_clip(width: int = 64, layers: int = 2, head_width: int = 32):
    """A random OpenCLIP (32 px images, ``layers`` layers of ``width`` in each tower) as core's OpenCLIP, seeded
    without moving the process's random stream."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from core.clip_model import OpenCLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(32, CLIPVisionCfg(layers=layers, width=width, head_width=head_width,
                                                       patch_size=8, image_size=32),
                                     CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=2,
                                                 layers=layers))
    return OpenCLIP(model.eval().requires_grad_(False), open_clip.get_tokenizer("ViT-B-32"), "tiny", 32)


def random_open_clip_file(arch: str, file_name: str) -> Path:
    """A random-weight OpenCLIP ``arch`` (seed 0) in safetensors in the test cache, made once (written atomically)."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    path = CACHE / file_name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(arch, pretrained=None)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.rename(path)
    return path
