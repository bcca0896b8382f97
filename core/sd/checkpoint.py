"""Recognise what a model file is before loading it.

Users point the pack at whatever sits in ``models/checkpoints``.  Before a single
tensor is read, :func:`inspect_checkpoint` parses the safetensors header (never
unpickling anything), checks that the file is complete, and names the model family
from its keys and shapes, so that an SDXL, SD 2, SD 3, Flux, LoRA, truncated or
pickle file gets an error that says what it is instead of a shape mismatch deep
inside torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class CheckpointError(ValueError):
    """A model file that the pack cannot use; the message names what was found and the fix."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    family: str  # a key of FAMILY_NAMES
    shapes: dict[str, list[int]]
    dtypes: dict[str, str]
    metadata: dict[str, str]

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    @property
    def context_dim(self) -> int | None:
        """Width of the UNet's cross-attention context (768 for SD 1.x, 2048 for SDXL), if it has one."""
        shape = self.shapes.get(_K_ATTN2)
        if shape is None:  # SDXL's first block has no attention: any cross-attention key-projection
            shape = next((v for k, v in sorted(self.shapes.items())
                          if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)
        return shape[1] if shape else None


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Parse a safetensors header: ({name: {dtype, shape, data_offsets}, "__metadata__": ...}, data start).

    Raises CheckpointError for files that are not safetensors or are cut short.
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{p.name}: only {size} bytes, not a safetensors file")
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(
                f"{p.name}: a pickle/zip (PyTorch .ckpt/.pt) file. The pack never unpickles model files; "
                "convert it to .safetensors (for example with ComfyUI's 'CheckpointSave' node) and use that file."
            )
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise CheckpointError(f"{p.name}: not a valid safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p.name}: the safetensors header is not valid JSON ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{p.name}: truncated: the header describes {8 + n + end:,} bytes but the file has {size:,}. "
            "Download or copy it again."
        )
    return header, 8 + n


_K_ATTN2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _family(shapes: dict[str, list[int]]) -> str:
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    def contains(part: str) -> bool:
        return any(part in k for k in keys)

    if contains("lora_up") or contains("lora_down") or contains("lora_A.") or contains("lora_B.") or has("lora_unet_"):
        return "lora"
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "sd3"
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return "flux"
    if has("conditioner.embedders.") or has("model.diffusion_model.label_emb."):
        conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", [0, 4])
        if not has("conditioner.embedders.1.") and has("conditioner.embedders.0.model."):
            return "sdxl-refiner"
        return "sdxl-inpaint" if conv_in[1] != 4 else "sdxl"
    if _K_ATTN2 in shapes:
        ctx = shapes[_K_ATTN2][1]
        if ctx == 1024 or has("cond_stage_model.model."):
            return "sd2"
        conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight", [0, 4])
        if conv_in[1] != 4:
            return "sd1-inpaint"
        return "sd1" if ctx == 768 else "ldm"
    if has("input_blocks.") and has("middle_block."):
        return "unet-only"
    if has("down_blocks.") and has("mid_block."):
        return "diffusers-unet"
    return "unknown"


FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd1-inpaint": "a Stable Diffusion 1.x inpainting or instruct model (more than 4 input channels)",
    "ldm": "a latent-diffusion UNet of a non-standard width",
    "sd2": "Stable Diffusion 2.x (OpenCLIP-H text encoder, 1024-wide conditioning)",
    "sdxl": "Stable Diffusion XL",
    "sdxl-refiner": "the Stable Diffusion XL refiner (one OpenCLIP-G text encoder, 1280-wide conditioning)",
    "sdxl-inpaint": "a Stable Diffusion XL inpainting model (more than 4 input channels)",
    "sd3": "Stable Diffusion 3",
    "flux": "a Flux model",
    "lora": "a LoRA (a set of weight deltas, not a full model)",
    "unet-only": "a UNet on its own (no VAE and no text encoder)",
    "diffusers-unet": "a diffusers-format UNet on its own",
    "unknown": "an unrecognised model",
}


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Header-only inspection of a single-file checkpoint; raises CheckpointError on bad files."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a folder; pass a single .safetensors file (or use the diffusers-folder loader)")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{p.name}: {p.suffix} files are pickles; the pack only loads .safetensors. "
            "Convert the checkpoint to .safetensors and use that file."
        )
    header, _ = read_safetensors_header(p)
    meta = header.pop("__metadata__", {}) or {}
    shapes = {k: list(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}
    return CheckpointInfo(str(p), _family(shapes), shapes, dtypes, meta)


def require_sd1(info: CheckpointInfo, context_dim: int = 768) -> None:
    """Raise CheckpointError unless the file is a complete SD 1.x checkpoint.

    ``context_dim`` other than 768 accepts SD-1.x-shaped models of another width (the
    tiny models of the tests, loaded with their own configs).
    """
    if info.family not in ("sd1", "ldm") or info.context_dim != context_dim:
        raise CheckpointError(
            f"{Path(info.path).name}: this is {FAMILY_NAMES[info.family]}, but the pack needs a "
            "Stable Diffusion 1.x checkpoint (e.g. v1-5-pruned-emaonly.safetensors) in the original single-file layout."
        )
    for prefix, what in (("first_stage_model.", "VAE"), ("cond_stage_model.", "text encoder")):
        if not any(k.startswith(prefix) for k in info.shapes):
            raise CheckpointError(
                f"{Path(info.path).name}: an SD 1.x UNet without its {what} ({prefix}* keys). "
                "Use a full checkpoint that includes the VAE and the CLIP text encoder."
            )


SUPPORTED = "Stable Diffusion 1.x (e.g. v1-5-pruned-emaonly.safetensors) or Stable Diffusion XL (e.g. sd_xl_base_1.0.safetensors)"


def require_sdxl(info: CheckpointInfo, context_dim: int = 2048) -> None:
    """Raise CheckpointError unless the file is a complete SDXL base-shaped checkpoint (UNet with
    the added conditioning, VAE, CLIP-L and OpenCLIP-G).  ``context_dim``: the configs' width (the
    tests' tiny models have their own)."""
    name = Path(info.path).name
    if info.family != "sdxl" or info.context_dim != context_dim:
        raise CheckpointError(f"{name}: this is {FAMILY_NAMES[info.family]}, but the pack needs {SUPPORTED} "
                              "in the original single-file layout.")
    for prefix, what in (("first_stage_model.", "VAE"), ("conditioner.embedders.0.transformer.", "CLIP-L text encoder"),
                         ("conditioner.embedders.1.model.", "OpenCLIP-G text encoder")):
        if not any(k.startswith(prefix) for k in info.shapes):
            raise CheckpointError(f"{name}: an SDXL UNet without its {what} ({prefix}* keys). Use a full "
                                  "checkpoint that includes the VAE and both text encoders.")


def require_supported(info: CheckpointInfo, context_dim: int | None = None) -> str:
    """"sd1" or "sdxl" for a complete checkpoint of a family the pack runs; CheckpointError otherwise
    (``context_dim``: the configs' width, when not the family's standard one)."""
    if info.family == "sdxl":
        require_sdxl(info, context_dim or 2048)
        return "sdxl"
    if info.family in ("sd1", "ldm"):
        require_sd1(info, context_dim or 768)
        return "sd1"
    raise CheckpointError(f"{Path(info.path).name}: this is {FAMILY_NAMES[info.family]}, but the pack needs "
                          f"{SUPPORTED} in the original single-file layout.")
