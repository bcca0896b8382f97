"""Conversions and checks shared by the node classes (of ComfyUI, only the typed node API's ``io``).

ComfyUI's IMAGE is [B, H, W, C] float in [0, 1]; MASK is [B, H, W] (sometimes [H, W]);
core works on [B, C, H, W].  Every check raises :class:`NodeInputError`, whose message
names the input and says how to fix it; ComfyUI shows that message in its error
dialog and in the ``execution_error`` of the API.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from comfy_api.latest import io

CATEGORY_ROOT = "single_image_edit"
OPEN_CLIP = "SIE_OPEN_CLIP"  # an OpenCLIP model (core.clip_model.OpenCLIP): Load OpenCLIP gives it, SinDDM and the rectifier use it


class NodeInputError(ValueError):
    """Bad input to a node: the message names the input and the fix."""

    def __init__(self, input_name: str, problem: str, fix: str = ""):
        self.input_name = input_name
        msg = f"input '{input_name}': {problem}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


def image_to_bchw(image, name: str = "image", min_side: int = 1) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> float32 [B, 3, H, W]; grayscale is repeated to RGB."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise NodeInputError(name, f"expected an IMAGE tensor [B, H, W, C], got {_describe(image)}",
                             "connect the IMAGE output of a loader or another image node")
    if image.ndim == 3:
        image = image[None]
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise NodeInputError(name, f"the image is empty (shape {tuple(image.shape)})", "connect a non-empty image")
    if c == 4:
        raise NodeInputError(name, "the image has an alpha channel (4 channels)",
                             "use an RGB image; Load Image already splits alpha into its MASK output")
    if c not in (1, 3):
        raise NodeInputError(name, f"expected 3 colour channels, got {c}", "connect an RGB IMAGE")
    if min(h, w) < min_side:
        raise NodeInputError(name, f"the image is {w}x{h}; each side must be at least {min_side} px",
                             "use a larger image")
    x = image.detach().to(torch.float32).movedim(-1, 1)
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 1).contiguous()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> IMAGE [B, H, W, 3] on the CPU."""
    return x.detach().clamp(0, 1).movedim(1, -1).to("cpu", torch.float32).contiguous()


def mask_to_b1hw(mask, name: str, size: tuple[int, int] | None = None, batch: int | None = None) -> torch.Tensor:
    """MASK [B, H, W] or [H, W] -> float32 [B, 1, H, W] in [0, 1], checked against ``size`` (H, W)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3, 4):
        raise NodeInputError(name, f"expected a MASK tensor [B, H, W], got {_describe(mask)}", "connect a MASK")
    m = mask.detach().to(torch.float32)
    if m.ndim == 4:  # [B, 1, H, W] or [B, H, W, 1] from unusual nodes
        m = m[:, 0] if m.shape[1] == 1 else m[..., 0]
    m = m.reshape(-1, 1, m.shape[-2], m.shape[-1])
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        raise NodeInputError(
            name, f"the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {size[1]}x{size[0]}",
            "resize the mask to the image size (e.g. with an 'Upscale Image' on the mask image) or use a mask made from that image",
        )
    if batch is not None and m.shape[0] not in (1, batch):
        raise NodeInputError(name, f"{m.shape[0]} masks for {batch} images", "give one mask, or one per image")
    return m.clamp(0, 1)


def check_positive(value: int, name: str) -> int:
    if int(value) <= 0:
        raise NodeInputError(name, f"must be at least 1, got {value}", f"set {name} to 1 or more")
    return int(value)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def safe_prefix(prefix: str, name: str = "filename_prefix") -> str:
    """A relative file prefix (sub-folders allowed) that cannot escape the target folder."""
    p = (prefix or "").strip().replace("\\", "/")
    if not p or p.startswith("/") or ".." in p.split("/") or p.endswith("/"):
        raise NodeInputError(name, f"'{prefix}' is not a relative file name", "use a name like edits/cat")
    return p


def save_output(root: Path, filename_prefix: str, write, what: str) -> io.NodeOutput:
    """The body of a saver node: a fresh ``<prefix>_NNNNN.safetensors`` under ``root``, written by
    ``write(path)``; returns the node's output, whose UI message is ``{"text": [relative name]}``.

    The name is claimed atomically first (:func:`next_free_path`), so two saves running at
    once never pick the same name; ``write`` must replace the placeholder atomically (a
    temporary file renamed over it, as :func:`core.artifact_io.atomic_save_safetensors`
    does).  If ``write`` fails, no file is left under the name.
    """
    import logging

    path = next_free_path(root, safe_prefix(filename_prefix), ".safetensors")
    try:
        write(path)
    except BaseException:
        path.unlink(missing_ok=True)  # the placeholder, or whatever a failed write left there
        raise
    logging.getLogger("comfyui-single-image-edit").info("saved %s to %s", what, path)
    return io.NodeOutput(ui={"text": [path.relative_to(root).as_posix()]})


def next_free_path(root: Path, prefix: str, suffix: str) -> Path:
    """Claim root/prefix_NNNNN<suffix> with the first counter not yet taken, and return it.

    The claim is an empty placeholder file created with O_CREAT | O_EXCL, so no other
    thread or process can claim the same name between the check and the write (never
    overwrites).  The caller writes the real file over the placeholder, or removes it.
    """
    target = Path(root) / prefix
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = target.name
    taken = {p.name for p in target.parent.glob(f"{stem}_*{suffix}")}
    counter = 1
    while True:
        name = f"{stem}_{counter:05d}{suffix}"
        counter += 1
        if name in taken:
            continue
        path = target.parent / name
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # claimed since the listing: try the next counter
            continue
        os.close(fd)
        return path


def parse_numbers(text: str, name: str, cast=float, low: float = -math.inf, high: float = math.inf,
                  example: str = "0.5, 0.7, 0.9") -> list:
    """Comma- (or semicolon-) separated numbers from a STRING widget, each in [low, high]."""
    try:
        values = [cast(float(v)) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise NodeInputError(name, f"'{text}' is not a list of numbers", f"write e.g. {example}") from None
    if not values:
        raise NodeInputError(name, "no value given", f"write e.g. {example}")
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise NodeInputError(name, f"{bad[0]} is outside [{low:g}, {high:g}]", f"use values in [{low:g}, {high:g}]")
    return values

