"""Segment Anything (SAM, Kirillov et al. 2023): safe loading and point / box segmentation.

* :func:`sam_variant` tells ViT-B / ViT-L / ViT-H apart from the weight shapes (never from the
  file name) and refuses, with :class:`SAMError`, anything that is not an original SAM checkpoint,
  saying what it looks like when that is easy (SAM 2, MobileSAM, SAM-HQ, a Stable Diffusion
  checkpoint, a LoRA, a file of this pack).
* :func:`load_sam` reads ``.safetensors`` with safetensors and ``.pth`` / ``.pt`` only with
  ``torch.load(weights_only=True)``: a pickle that would run code is refused without running it.
  The network is built by ``segment_anything`` without a checkpoint (its own builder would unpickle
  the file with ``weights_only`` left to torch's default) and the weights are loaded strictly.
* :func:`segment` runs ``SamPredictor`` on one image [H, W, 3] with points and / or a box (each
  position handed over as the pixel it falls in, as SAM reads coordinates) and returns a {0, 1} mask
  [H, W], optionally dilated (or eroded) and inverted.
* :func:`parse_prompt` reads the JSON prompt that the canvas widget writes into a STRING input.

``segment_anything`` (``pip install segment-anything``) is optional: it is imported inside the
functions that need it.  Nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

# encoder width -> (variant, number of ViT blocks), as segment_anything's build_sam_vit_* build them
VARIANTS = {768: ("vit_b", 12), 1024: ("vit_l", 24), 1280: ("vit_h", 32)}
EXTENSIONS = (".safetensors", ".pth", ".pt")

_PATCH = "image_encoder.patch_embed.proj.weight"
_POS = "image_encoder.pos_embed"
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


class SAMError(ValueError):
    """A file that is not a usable Segment Anything checkpoint; the message names the file when known."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path.name}: {problem}" if self.path is not None else problem)


# --------------------------------------------------------------------------------------
# Recognising a checkpoint
# --------------------------------------------------------------------------------------
def _looks_like(keys: list[str]) -> str | None:
    """What a state dict that is not an original SAM looks like, when easy to tell."""
    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if has("sam_mask_decoder.", "memory_attention.", "memory_encoder.", "image_encoder.trunk."):
        return "a SAM 2 checkpoint (only the original SAM ViT-B/L/H is supported)"
    if has("mask_decoder.hf_token", "mask_decoder.hf_mlp", "compress_vit_feat"):
        return "a SAM-HQ checkpoint (only the original SAM ViT-B/L/H is supported)"
    if any(k.startswith("image_encoder.") for k in keys) and has("image_encoder.layers.", "patch_embed.seq."):
        return "a MobileSAM (TinyViT encoder) checkpoint (only the original SAM ViT-B/L/H is supported)"
    if has("lora_up", "lora_down", "lora_A", "lora_B", ".alpha"):
        return "a LoRA"
    if has("model.diffusion_model.", "first_stage_model.", "cond_stage_model."):
        return "a Stable Diffusion checkpoint"
    if has("input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks."):
        return "a diffusion model (UNet / transformer weights)"
    if has("encoder.down.", "decoder.up.", "post_quant_conv"):
        return "a VAE"
    if has("text_model.", "transformer.resblocks.", "visual.transformer."):
        return "a text / CLIP encoder"
    return None


def _summary(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"{len(keys)} tensors ({shown}{', ...' if len(keys) > n else ''})" if keys else "no tensors"


def sam_variant(state_dict) -> str:
    """``"vit_b"``, ``"vit_l"`` or ``"vit_h"`` from the weight shapes of a SAM state dict.

    The encoder width (``image_encoder.patch_embed.proj.weight`` is [width, 3, 16, 16] and
    ``image_encoder.pos_embed`` is [1, 64, 64, width]) and the number of ViT blocks must both
    match one of SAM's three image encoders; anything else raises :class:`SAMError` (saying what
    the file looks like when that is easy).
    """
    if not hasattr(state_dict, "keys"):
        raise SAMError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    keys = [str(k) for k in state_dict.keys()]
    what = _looks_like(keys)
    if what is not None:
        raise SAMError(f"this is {what}, not a Segment Anything checkpoint")
    parts = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
    if _PATCH not in state_dict or _POS not in state_dict or not all(any(k.startswith(p) for k in keys)
                                                                     for p in parts):
        raise SAMError(f"not a Segment Anything checkpoint: no SAM image encoder / prompt encoder / mask decoder "
                       f"weights among its {_summary(keys)}")
    patch, pos = state_dict[_PATCH], state_dict[_POS]
    if getattr(patch, "ndim", 0) != 4 or getattr(pos, "ndim", 0) != 4:
        raise SAMError(f"not a Segment Anything checkpoint: {_PATCH} has shape {tuple(getattr(patch, 'shape', ()))} "
                       f"and {_POS} {tuple(getattr(pos, 'shape', ()))}")
    width = int(patch.shape[0])
    blocks = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    depth = max(blocks) + 1 if blocks else 0
    known = ", ".join(f"{v} ({w} wide, {d} blocks)" for w, (v, d) in VARIANTS.items())
    if width not in VARIANTS or int(pos.shape[-1]) != width or VARIANTS[width][1] != depth:
        raise SAMError(f"an unknown SAM image encoder ({width} wide, {depth} blocks, position embedding "
                       f"{tuple(pos.shape)}); supported: {known}")
    return VARIANTS[width][0]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    from .artifact_io import describe_format, sniff_file

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            fmt = (f.metadata() or {}).get("format", "")
            if fmt.startswith("sie."):
                raise SAMError(f"this is {describe_format(fmt)}, not a Segment Anything checkpoint", path)
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        what = sniff_file(path)
        raise SAMError(f"not a readable safetensors file ({what or e})", path) from None


def _read_pickle(path: Path) -> dict:
    import pickle

    from .artifact_io import sniff_file

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SAMError("refused: the file holds Python objects other than tensors, and unpickling them could run "
                       "arbitrary code (only weights are loaded; convert the checkpoint to .safetensors from a "
                       f"trusted source). torch said: {first[:300]}", path) from None
    except Exception as e:  # not a torch file at all (text, image, truncated zip, ...)
        what = sniff_file(path)
        raise SAMError(f"not a readable PyTorch checkpoint ({what or f'{type(e).__name__}: {e}'})", path) from None
    # some re-packaged checkpoints nest the weights one level down
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and set(obj) <= {wrapper, "epoch", "optimizer", "args", "step"} \
                and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SAMError(f"expected a state dict of tensors, got {type(obj).__name__}"
                       + (" with non-tensor values" if isinstance(obj, dict) else ""), path)
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` / ``.pth`` / ``.pt`` file, read without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise SAMError("file not found", path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in (".pth", ".pt"):
        return _read_pickle(path)
    raise SAMError(f"unsupported file type '{suffix or '(none)'}'; use a {' / '.join(EXTENSIONS)} SAM checkpoint",
                   path)


def load_sam(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A ``segment_anything`` ``Sam`` model in eval mode on ``device``, from a ViT-B/L/H checkpoint file.

    The variant comes from the weight shapes (:func:`sam_variant`); the weights are loaded with
    ``strict=True`` after checking for missing and unexpected keys.  Every problem with the file
    raises :class:`SAMError` naming it.
    """
    from segment_anything import sam_model_registry

    path = Path(path)
    state = read_state_dict(path)
    try:
        variant = sam_variant(state)
    except SAMError as e:
        raise SAMError(str(e), path) from None
    model = sam_model_registry[variant](checkpoint=None)  # random init; never given the file
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing weights ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights "
                         f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        raise SAMError(f"looks like SAM {variant} but does not match it: {'; '.join(parts)}", path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise SAMError(f"looks like SAM {variant} but its weights do not fit: {str(e).strip()[:500]}", path) from None
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------
def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {json.dumps(v)}")
    return float(v)


def parse_prompt(text: str):
    """``(points, labels, box)`` from the JSON prompt the canvas widget writes into the STRING input.

    Format (coordinates in pixels of the input image, x to the right, y down, origin top left)::

        {"points": [[x, y, 1], [x, y, 0]], "box": [x0, y0, x1, y1]}

    * ``points``: a list of ``[x, y, label]`` with label 1 = on the object (positive) and
      0 = not on it (negative); ``[x, y]`` means label 1.  Missing or ``[]``: no points.
    * ``box``: ``[x0, y0, x1, y1]`` (top-left and bottom-right corners, x0 < x1, y0 < y1), or
      ``null`` / ``[]`` / missing: no box.
    * Any other key is refused (so a typo such as ``"point"`` is not silently ignored).

    An empty string or ``{}`` is "no prompt": ``([], [], None)``.  Returns ``points`` as a list of
    ``(x, y)`` floats, ``labels`` as a list of 0 / 1 ints, ``box`` as an ``(x0, y0, x1, y1)`` tuple
    or None.  Malformed JSON raises ValueError saying what is wrong; whether the coordinates lie in
    the image is checked by :func:`check_prompt` once the image size is known.
    """
    text = "" if text is None else str(text)
    if not text.strip():
        return [], [], None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object like {{\"points\": [[x, y, 1]], \"box\": null}}, "
                         f"got a {type(data).__name__}")
    unknown = sorted(set(data) - {"points", "box"})
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         "the prompt has only 'points' and 'box'")
    raw_points = data.get("points")
    if raw_points is None:
        raw_points = []
    if not isinstance(raw_points, list):
        raise ValueError(f"'points' must be a list of [x, y, label], got {json.dumps(raw_points)}")
    points, labels = [], []
    for i, p in enumerate(raw_points):
        if not isinstance(p, list) or len(p) not in (2, 3):
            raise ValueError(f"point {i + 1} must be [x, y, label] (label 1 positive, 0 negative), got {json.dumps(p)}")
        x, y = _number(p[0], f"point {i + 1} x"), _number(p[1], f"point {i + 1} y")
        label = p[2] if len(p) == 3 else 1
        if isinstance(label, bool) or label not in (0, 1):
            raise ValueError(f"point {i + 1} label must be 1 (positive) or 0 (negative), got {json.dumps(label)}")
        points.append((x, y))
        labels.append(int(label))
    raw_box = data.get("box")
    box = None
    if raw_box is not None and raw_box != []:
        if not isinstance(raw_box, list) or len(raw_box) != 4:
            raise ValueError(f"'box' must be [x0, y0, x1, y1] or null, got {json.dumps(raw_box)}")
        box = tuple(_number(v, f"box {n}") for v, n in zip(raw_box, ("x0", "y0", "x1", "y1")))
    return points, labels, box


def check_prompt(points, labels, box, height: int, width: int):
    """Validated ``(points [N, 2] float32 array or None, labels [N] int array or None, box [4] array or None)``
    for an image of ``height`` x ``width``; ValueError for no prompt, points outside the image, a
    malformed box or labels that do not match the points.

    Coordinates are continuous pixel positions: 0 <= x <= width, 0 <= y <= height (:func:`segment` hands
    SAM the pixel each falls in, :func:`to_pixels`).
    """
    import numpy as np

    points = list(points or [])
    labels = list(labels) if labels is not None else ([1] * len(points))
    if not points and box is None:
        raise ValueError("no prompt: give at least one point or a box")
    if len(labels) != len(points):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    pts = lab = bx = None
    if points:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
            raise ValueError(f"points must be (x, y) pixel pairs, got {points!r}")
        for i, (x, y) in enumerate(pts):
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"point {i + 1} ({x:g}, {y:g}) is outside the {width}x{height} image")
        if any(int(v) not in (0, 1) or v != int(v) for v in labels):
            raise ValueError(f"labels must be 1 (positive) or 0 (negative), got {list(labels)}")
        if not any(int(v) == 1 for v in labels) and box is None:
            raise ValueError("only negative points: add at least one positive point (label 1) or a box")
        pts, lab = pts.astype(np.float32), np.asarray(labels, dtype=np.int64)
    if box is not None:
        try:
            bx = np.asarray(box, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"the box must be (x0, y0, x1, y1) pixels, got {box!r}") from None
        if bx.shape != (4,) or not np.isfinite(bx).all():
            raise ValueError(f"the box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = bx
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or reversed: "
                             "it needs x0 < x1 and y0 < y1 (top-left, then bottom-right corner)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"the box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) reaches outside the {width}x{height} image")
        bx = bx.astype(np.float32)
    return pts, lab, bx


# --------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------
def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate a {0, 1} mask [..., H, W] by ``pixels`` (a square max-pool of side 2*pixels+1);
    negative ``pixels`` erode it by as much (the image border does not count as background)."""
    r = int(pixels)
    if r == 0:
        return mask
    shape = mask.shape
    m = mask.reshape(-1, 1, shape[-2], shape[-1]).to(torch.float32)
    k = 2 * abs(r) + 1
    m = F.max_pool2d(m, k, stride=1, padding=abs(r)) if r > 0 else 1 - F.max_pool2d(1 - m, k, stride=1,
                                                                                      padding=abs(r))
    return m.reshape(shape)


def to_pixels(points, box, height: int, width: int):
    """``(points [N, 2], box [4])`` (float32 arrays, either may be None) as the pixels the positions fall in.

    A prompt position is continuous (pixel (i, j) is the square [i, i + 1) x [j, j + 1); 0 <= x <= width),
    while SAM reads a coordinate as a pixel index: its prompt encoder adds 0.5, the pixel's centre
    (``segment_anything/modeling/prompt_encoder.py``: ``points + 0.5  # Shift to center of pixel``, the same
    for box corners).  So each point and each box corner goes to SAM as ``floor(position)``, clamped to
    0 ... size - 1 (a position on the far edge, x = width, is the last column).  Whole-pixel prompts, such
    as the canvas widget writes, are unchanged.
    """
    import numpy as np

    hi = np.array([width - 1, height - 1], dtype=np.float32)
    pixel = lambda xy: np.clip(np.floor(xy), 0, hi).astype(np.float32)  # [..., 2] -> [..., 2]
    pts = None if points is None else pixel(np.asarray(points, dtype=np.float32).reshape(-1, 2))
    bx = None if box is None else pixel(np.asarray(box, dtype=np.float32).reshape(2, 2)).reshape(4)
    return pts, bx


def uses_multimask(points, box) -> bool:
    """SAM's three-mask output is for an ambiguous prompt: exactly one point and no box.

    SAM was trained to give three candidate masks (whole, part, sub-part) when a single click is
    ambiguous, and its single-mask output for prompts with several points or a box (the
    ``segment_anything`` predictor docs: "For non-ambiguous prompts, such as multiple input prompts,
    multimask_output=False can give better results"; its example notebook uses single-mask output
    for boxes).  So :func:`segment` asks for three masks and keeps the best-scored one only for a
    lone point, and takes the single mask otherwise.
    """
    return box is None and len(points or []) == 1


@torch.no_grad()
def segment(sam, image: torch.Tensor, points=None, labels=None, box=None, dilate: int = 0,
            invert: bool = False) -> torch.Tensor:
    """A {0, 1} float mask [H, W] (on the CPU) of the object the prompt points at.

    ``sam`` is a ``segment_anything`` ``Sam`` (from :func:`load_sam`; it runs on its own device);
    ``image`` a float tensor [H, W, 3] in [0, 1] (ComfyUI's IMAGE layout for one image);
    ``points`` a list of (x, y) pixel coordinates with ``labels`` 1 (positive) / 0 (negative)
    (all 1 when None); ``box`` (x0, y0, x1, y1) in pixels; each point and box corner goes to SAM as the
    pixel it falls in (:func:`to_pixels`: floor, clamped to the image).  The mask is SAM's best-scored one for a
    lone point and its single-mask output for other prompts (:func:`uses_multimask`); it is then
    grown by ``dilate`` pixels (negative: shrunk) and, with ``invert``, flipped (after the growth).
    ValueError for no prompt, points outside the image, a malformed box or a bad image.
    """
    import numpy as np
    from segment_anything import SamPredictor

    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected one RGB image as a float tensor [H, W, 3], got {shape}")
    h, w = int(image.shape[0]), int(image.shape[1])
    pts, lab, bx = check_prompt(points, labels, box, h, w)
    pts, bx = to_pixels(pts, bx, h, w)
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    predictor = SamPredictor(sam)
    predictor.set_image(np.ascontiguousarray(pixels), image_format="RGB")
    multi = uses_multimask(points, box)
    masks, scores, _ = predictor.predict(point_coords=pts, point_labels=lab, box=bx, multimask_output=multi)
    best = int(np.argmax(scores)) if multi else 0
    mask = torch.from_numpy(np.asarray(masks[best], dtype=np.float32))
    mask = grow_mask(mask, dilate)
    if invert:
        mask = 1 - mask
    return mask.contiguous()
