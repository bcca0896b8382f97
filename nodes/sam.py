"""Segment Anything (SAM) nodes for LayerDiffusion's foreground masks.

* ``SIE_LoadSAM`` loads an original SAM checkpoint (ViT-B / ViT-L / ViT-H, told apart by its weight
  shapes) from ComfyUI's ``models/sams`` folder, safely (:func:`core.sam.load_sam`: safetensors, or
  a ``.pth`` read with ``weights_only``), into an ``SIE_SAM``.
* ``SIE_SAMSegment`` segments each image of a batch with the same points / box prompt (the JSON the
  canvas widget writes, :func:`core.sam.parse_prompt`) and returns a MASK [B, H, W].

The model is kept on the CPU between runs and moved to ComfyUI's device only while it segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comfy_api.latest import io

from ..core.sam import SAMError, check_prompt, load_sam, parse_prompt, sam_variant, segment
from . import comfy_bridge as bridge
from .common import CATEGORY_ROOT, NodeInputError, image_to_bchw

CATEGORY = f"{CATEGORY_ROOT}/layerdiffusion"
SAM_TYPE = "SIE_SAM"
FOLDER = "sams"
DEFAULT_PROMPT = '{"points": [], "box": null}'
PROMPT_FIX = ('click on the object in the canvas widget (shift-click: a negative point) or drag a box; or write e.g. '
              '{"points": [[120, 80, 1]], "box": null} in pixels of the image')


@dataclass
class SAMModel:
    """The ``SIE_SAM`` value: a ``segment_anything`` ``Sam`` (on the CPU), its variant and file name."""

    model: torch.nn.Module
    variant: str
    name: str = ""

    def __repr__(self) -> str:
        return f"SAMModel({self.variant}, {self.name!r})"


class LoadSAM(io.ComfyNode):
    REQUIRES = ("segment_anything",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_LoadSAM", display_name="Load Segment Anything (SAM)", category=CATEGORY,
            description="Loads an original Segment Anything checkpoint (ViT-B, ViT-L or ViT-H, recognised from "
                        "its weights, not its name) from models/sams: sam_vit_b_01ec64.pth (375 MB), "
                        "sam_vit_l_0b3195.pth (1.25 GB) or sam_vit_h_4b8939.pth (2.56 GB), or the same weights "
                        "as .safetensors. .pth files are read as weights only, so a checkpoint that would run "
                        "code when unpickled is refused. SAM 2, MobileSAM and SAM-HQ files are not supported.",
            inputs=[
                io.Combo.Input("sam_name", options=bridge.list_models(FOLDER),
                               tooltip="A SAM checkpoint in models/sams (.pth, .pt or .safetensors; ViT-B is the "
                                       "smallest and fastest)."),
            ],
            outputs=[
                io.Custom(SAM_TYPE).Output(display_name="sam",
                                           tooltip="The SAM model, for Segment (SAM points / box)."),
            ],
        )

    @classmethod
    def execute(cls, sam_name):
        try:
            path = bridge.model_path(FOLDER, sam_name)
        except FileNotFoundError as e:
            raise NodeInputError("sam_name", str(e), "put a SAM checkpoint into models/sams and refresh") from None
        try:
            model = load_sam(path, "cpu")
        except SAMError as e:
            raise NodeInputError("sam_name", str(e), "pick an original SAM checkpoint, e.g. sam_vit_b_01ec64.pth "
                                                     "from Meta's segment-anything release") from None
        return io.NodeOutput(SAMModel(model, sam_variant(model.state_dict()), str(sam_name)))


class SAMSegment(io.ComfyNode):
    REQUIRES = ("segment_anything",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SAMSegment", display_name="Segment (SAM points / box)", category=CATEGORY,
            description="Segments the object the points and / or box point at with Segment Anything, in every "
                        "image of the batch (same prompt). A single point gives SAM's best-scored of its three "
                        "candidate masks; several points or a box give its single-mask answer. The mask can be "
                        "grown (dilate > 0) or shrunk (dilate < 0) and inverted.",
            inputs=[
                io.Custom(SAM_TYPE).Input("sam", tooltip="From Load Segment Anything (SAM)."),
                io.Image.Input("image", tooltip="The image(s) to segment; each image of a batch gets its own mask."),
                io.String.Input("prompt", default=DEFAULT_PROMPT, multiline=True, dynamic_prompts=False,
                                tooltip="Points and box in pixels of the image, as JSON: {\"points\": [[x, y, 1], "
                                        "[x, y, 0]], \"box\": [x0, y0, x1, y1]}. Label 1 = on the object, 0 = not "
                                        "on it; box = top-left and bottom-right corners, or null. Each number "
                                        "names a pixel (column x, row y from the top left; a fraction goes to SAM "
                                        "as the pixel it falls in). The canvas widget writes this when you click "
                                        "or drag on the image."),
                io.Int.Input("dilate", default=0, min=-256, max=256, step=1,
                             tooltip="Grow the mask by this many pixels (negative: shrink it)."),
                io.Boolean.Input("invert", default=False,
                                 tooltip="Output 1 outside the object instead (applied after dilate)."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask",
                               tooltip="1 on the object, 0 elsewhere (the reverse with invert); one mask per "
                                       "image."),
            ],
        )

    @classmethod
    def execute(cls, sam, image, prompt, dilate, invert):
        if not isinstance(sam, SAMModel):
            raise NodeInputError("sam", f"expected a SAM model, got {type(sam).__name__}",
                                 "connect Load Segment Anything (SAM)")
        x = image_to_bchw(image, "image")  # [B, 3, H, W]
        b, _, h, w = x.shape
        try:
            points, labels, box = parse_prompt(prompt)
            check_prompt(points, labels, box, h, w)
        except ValueError as e:
            raise NodeInputError("prompt", str(e), PROMPT_FIX) from None
        device = bridge.torch_device()
        progress = bridge.Progress(b)
        masks = []
        model = sam.model
        try:
            model.to(device)
            for i in range(b):
                progress(i, b)
                masks.append(segment(model, x[i].movedim(0, -1), points, labels, box, int(dilate), bool(invert)))
            progress(b, b)
        finally:
            model.to("cpu")
            bridge.free_memory()
        return io.NodeOutput(torch.stack(masks).to("cpu", torch.float32))


NODES = [LoadSAM, SAMSegment]
