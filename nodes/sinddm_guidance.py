"""SinDDM guidance nodes (regions, text through CLIP, text in a region), the OpenCLIP loader,
and the nodes that apply a model to an existing image (harmonize / style transfer, edit the
training image).  Split from :mod:`.sinddm`, whose types and helpers they share; registered
as their own node module (``nodes.NODE_MODULES``).
"""

from __future__ import annotations

import functools

import torch

from comfy_api.latest import io

from ..core.sinddm import edit_training_image, harmonize, style_transfer
from ..core.sinddm.edit import HARMONIZATION_T, REGION_EDIT_T, STARTS, STYLE_TRANSFER_T
from ..core.sinddm.guidance import ROIGuidance
from ..core.sinddm.pyramid import capped_size
from ..core.sinddm.sample import resolve_scale
from . import comfy_bridge as bridge
from .common import CATEGORY_ROOT, OPEN_CLIP, NodeInputError, bchw_to_image, check_positive, image_to_bchw, mask_to_b1hw
from .sinddm import CATEGORY, GUIDANCE, SINDDM, _guidance_in, _guidance_list, _seed, check_sample_memory


class SinDDMGuideROI(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMGuideROI", display_name="SinDDM Guide: Region (ROI / outpaint)", category=CATEGORY,
            description="Forces regions of the sample to show given content (paper eq. 2): at every step of "
                        "every scale but the finest, the clean-image estimate inside the mask moves towards the "
                        "target by 'strength'. Target, mask and x, y are in pixels of the image SinDDM Train was "
                        "given (before its 50,000-pixel cap): a crop of that image placed where it was cut "
                        "reproduces it, and the pack scales all three like the training image (the official code "
                        "cuts its targets from the training pyramid). Outpainting: use the training image as "
                        "target with no mask and sample wider than it.",
            inputs=[
                io.Image.Input("target",
                               tooltip="Content to enforce, e.g. the training image or a crop of it, at the "
                                       "resolution the training image was loaded at (it is scaled like the "
                                       "training image). Only the first image of a batch is used."),
                io.Float.Input("strength", default=0.8, min=0.0, max=1.0, step=0.05,
                               tooltip="eta of eq. 2 (official: 0.8). 1 copies the target exactly."),
                io.Int.Input("x", default=0, min=-8192, max=8192,
                             tooltip="Where the target's left edge lands, in pixels of the training image as "
                                     "loaded (the output spans output width / training width of them)."),
                io.Int.Input("y", default=0, min=-8192, max=8192,
                             tooltip="Where the target's top edge lands, in pixels of the training image as "
                                     "loaded."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Which pixels of the target to enforce (same size as the target; white = "
                                      "enforce). Default: the whole target. Only the first mask of a batch is "
                                      "used."),
                _guidance_in("guidance", optional=True),
            ],
            outputs=[
                io.Custom(GUIDANCE).Output(display_name="guidance",
                                           tooltip="Guidance for SinDDM Sample (chainable)."),
            ],
        )

    @classmethod
    def execute(cls, target, strength, x, y, mask=None, guidance=None):
        tgt = image_to_bchw(target, "target")[:1]
        msk = mask_to_b1hw(mask, "mask", size=tuple(tgt.shape[-2:]))[:1] if mask is not None else None
        try:
            ROIGuidance(tgt, msk, float(strength), (int(x), int(y)))  # validate now, not at sampling
        except ValueError as e:
            raise NodeInputError("target", str(e)) from None
        factory = functools.partial(ROIGuidance, tgt, msk, float(strength), (int(x), int(y)))
        return io.NodeOutput(tuple(guidance or ()) + (factory,))


# --------------------------------------------------------------------------------------
_ARCHS: list[str] = []


def _open_clip_archs() -> list[str]:
    if not _ARCHS:
        try:
            import open_clip

            _ARCHS.extend(sorted(open_clip.list_models()))
        except ImportError:
            _ARCHS.append("ViT-B-32")
    return _ARCHS


class LoadOpenCLIP(io.ComfyNode):
    REQUIRES = ("open_clip",)

    @classmethod
    def define_schema(cls):
        archs = _open_clip_archs()
        return io.Schema(
            node_id="SIE_LoadOpenCLIP", display_name="Load OpenCLIP (local file)",
            category=f"{CATEGORY_ROOT}/loaders",
            description="Loads an OpenCLIP model from a local file in models/open_clip (no download). SinDDM's "
                        "paper uses ViT-B/32 with OpenAI weights: put e.g. open_clip_model.safetensors of "
                        "'timm/vit_base_patch32_clip_224.openai' there and pick arch ViT-B-32.",
            inputs=[
                io.Combo.Input("clip_name", options=bridge.list_models("open_clip"),
                               tooltip="Checkpoint in models/open_clip (.safetensors preferred)."),
                io.Combo.Input("arch", options=archs, default="ViT-B-32" if "ViT-B-32" in archs else archs[0],
                               tooltip="The OpenCLIP architecture the checkpoint belongs to."),
            ],
            outputs=[
                io.Custom(OPEN_CLIP).Output(display_name="clip",
                                            tooltip="An OpenCLIP model for SinDDM text guidance."),
            ],
        )

    @classmethod
    def execute(cls, clip_name, arch):
        from ..core.clip_model import load_open_clip

        try:
            path = bridge.model_path("open_clip", clip_name)
        except FileNotFoundError as e:
            raise NodeInputError("clip_name", str(e)) from None
        try:
            with torch.inference_mode(False):  # CLIP is differentiated through at sampling time
                return io.NodeOutput(load_open_clip(path, arch))
        except ValueError as e:
            raise NodeInputError("arch", str(e), "pick the architecture that matches the file") from None


class SinDDMGuideText(io.ComfyNode):
    REQUIRES = ("open_clip",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMGuideText", display_name="SinDDM Guide: Text (CLIP)", category=CATEGORY,
            description="Steers SinDDM samples with a text prompt through CLIP (paper Sec. 4). content: changes "
                        "what appears, at every scale but the coarsest, inside a mask made of the pixels CLIP "
                        "cares about most ('fill_factor' of the image). style: changes the look at the finest "
                        "scale only (the prompt gets ' Style' appended). Slow on a CPU: every step runs CLIP on "
                        "16 views.",
            inputs=[
                io.Custom(OPEN_CLIP).Input("clip", tooltip="From Load OpenCLIP."),
                io.String.Input("text", default="", multiline=True,
                                tooltip="The prompt, e.g. 'volcano eruption' (content) or 'Van Gogh' (style)."),
                io.Combo.Input("mode", options=["content", "style"], default="content",
                               tooltip="content or style guidance."),
                io.Float.Input("strength", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="eta: size of each CLIP step relative to the image (style: 0.3)."),
                io.Float.Input("fill_factor", default=0.3, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the image that content guidance may change (ignored for "
                                       "style, which uses the whole image)."),
                _seed("seed",
                      "Seed of the random views, augmentations and template choices; sample k of a batch uses "
                      "seed + k (like its noise), so it does not depend on count."),
                _guidance_in("guidance", optional=True),
            ],
            outputs=[
                io.Custom(GUIDANCE).Output(display_name="guidance",
                                           tooltip="Guidance for SinDDM Sample (chainable)."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, mode, strength, fill_factor, seed, guidance=None):
        from ..core.sinddm.clip_guidance import CLIPGuidance

        if not text.strip():
            raise NodeInputError("text", "the prompt is empty", "write what the sample should show")
        if mode not in ("content", "style"):
            raise NodeInputError("mode", f"unknown mode {mode!r}", "use content or style")
        if any(getattr(f, "func", None) is CLIPGuidance for f in guidance or ()):
            raise NodeInputError("guidance", "the chain already has a text guidance",
                                 "use one SinDDM Guide: Text per sample")
        factory = functools.partial(CLIPGuidance, clip, text, mode, float(strength), float(fill_factor), 16, 3,
                                    int(seed))
        return io.NodeOutput(tuple(guidance or ()) + (factory,))


class SinDDMGuideTextRegion(io.ComfyNode):
    REQUIRES = ("open_clip",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMGuideTextRegion", display_name="SinDDM Guide: Text in Region (CLIP)",
            category=CATEGORY,
            description="Edits a region with a text prompt through CLIP (paper Sec. 4, Figs. 2 and S3; the "
                        "official clip_roi): at the finest scale, the pixels inside the mask are optimised for "
                        "'iterations' CLIP steps and pasted back, the rest is kept, and the last 'denoise_steps' "
                        "denoising steps blend the edit in. With SinDDM Edit Training Image (start: "
                        "training_image) it edits the training image itself, as the paper; with SinDDM Sample it "
                        "edits the region of each random sample.",
            inputs=[
                io.Custom(OPEN_CLIP).Input("clip", tooltip="From Load OpenCLIP."),
                io.String.Input("text", default="", multiline=True,
                                tooltip="What the region should show, e.g. 'volcano eruption'."),
                io.Mask.Input("mask",
                              tooltip="The region to edit (white), on the output canvas; stretched to the output "
                                      "size if it differs. CLIP sees the mask's bounding box. Only the first mask "
                                      "of a batch is used."),
                io.Float.Input("strength", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="eta: size of each CLIP step relative to the region (official: 0.1)."),
                io.Int.Input("iterations", default=100, min=1, max=10000,
                             tooltip="CLIP steps on the region (official: 100). Each runs CLIP on 16 views."),
                io.Int.Input("denoise_steps", default=REGION_EDIT_T, min=0, max=99,
                             tooltip="Denoising steps of the finest scale after the edit, which blend it into its "
                                     "surroundings (official: 3)."),
                _seed("seed",
                      "Seed of the random views, augmentations and template choices; sample k of a batch uses "
                      "seed + k (like its noise), so it does not depend on count."),
                _guidance_in("guidance", optional=True),
            ],
            outputs=[
                io.Custom(GUIDANCE).Output(display_name="guidance",
                                           tooltip="Guidance for SinDDM Sample or SinDDM Edit Training Image "
                                                   "(chainable)."),
            ],
        )

    @classmethod
    def execute(cls, clip, text, mask, strength, iterations, denoise_steps, seed, guidance=None):
        from ..core.sinddm.clip_guidance import CLIPRegionGuidance

        if not text.strip():
            raise NodeInputError("text", "the prompt is empty", "write what the region should show")
        m = mask_to_b1hw(mask, "mask")[:1]
        if m.max() <= 0:
            raise NodeInputError("mask", "the mask is empty", "paint the region to edit white")
        check_positive(iterations, "iterations")
        factory = functools.partial(CLIPRegionGuidance, clip, text, m, float(strength), int(iterations),
                                    int(denoise_steps), 16, int(seed))
        return io.NodeOutput(tuple(guidance or ()) + (factory,))


class SinDDMEditTrainingImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMEditTrainingImage", display_name="SinDDM Edit Training Image (text)",
            category=CATEGORY,
            description="Applies guidance to the training image itself instead of a random sample (paper Sec. "
                        "4). coarser_scale: the training image one scale down is re-rendered at the finest "
                        "scale, so a SinDDM Guide: Text in style mode restyles its textures and keeps its layout "
                        "(the official clip_style_trans, paper Fig. S9). training_image: the image itself is "
                        "noised a little (3 steps) and denoised, for SinDDM Guide: Text in Region (the official "
                        "clip_roi).",
            inputs=[
                io.Custom(SINDDM).Input("model",
                                        tooltip="A trained SinDDM model; its own training image is edited."),
                io.Custom(GUIDANCE).Input("guidance",
                                          tooltip="The guidance to apply: SinDDM Guide: Text (style mode) or "
                                                  "Guide: Text in Region, possibly chained with others."),
                io.Combo.Input("start", options=list(STARTS), default=STARTS[0],
                               tooltip="coarser_scale: start from the training image one scale down (text style, "
                                       "official clip_style_trans). training_image: start from the image itself "
                                       "(text in region, official clip_roi)."),
                io.Int.Input("t_start", default=0, min=0, max=99,
                             tooltip=f"Noise step the finest scale starts from; 0 uses the official value "
                                     f"(the model's T[N-1] for coarser_scale, {REGION_EDIT_T} for "
                                     "training_image). Higher changes more."),
                io.Int.Input("count", default=1, min=1, max=64, tooltip="Number of results."),
                _seed("seed", "Seed of the first result; result k uses seed + k."),
            ],
            outputs=[
                io.Image.Output(display_name="images",
                                tooltip="The edited training image, a batch of 'count' results at the training "
                                        "size."),
            ],
        )

    @classmethod
    def execute(cls, model, guidance, start, t_start, count, seed):
        check_positive(count, "count")
        if start not in STARTS:
            raise NodeInputError("start", f"unknown start {start!r}", f"use one of {', '.join(STARTS)}")
        n = model.pyramid.spec.n_scales
        if start == "coarser_scale" and n < 2:
            raise NodeInputError("start", "the model has a single scale", "use training_image")
        t0 = int(t_start) or (model.schedule.start_steps[-1] if start == "coarser_scale" else REGION_EDIT_T)
        device = bridge.torch_device()
        check_sample_memory(model, model.training_size, int(count), device, "count")
        progress = bridge.Progress(max(t0, 1))
        with torch.inference_mode(False):
            try:
                out = edit_training_image(model, _guidance_list(guidance), start, t0, int(count), int(seed),
                                          device, on_step=progress, should_stop=progress.should_stop)
            except ValueError as e:
                raise NodeInputError("guidance", str(e)) from None
        return io.NodeOutput(bchw_to_image(out))


# --------------------------------------------------------------------------------------
class SinDDMInject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMInject", display_name="SinDDM Harmonize / Style Transfer", category=CATEGORY,
            description="Injects an image into a scale of a SinDDM model trained on another image (the finest by "
                        "default; 'scale' picks another) and denoises it for a few steps (paper Sec. 4). "
                        "harmonization: a composite with a pasted object (mask = the object) is blended into the "
                        "training image's look, then composited back through a dilated, blurred mask. "
                        "style_transfer: the content image takes the training image's textures (colours matched "
                        "by histogram first).",
            inputs=[
                io.Custom(SINDDM).Input("model", tooltip="A SinDDM model trained on the background / style image."),
                io.Image.Input("image",
                               tooltip="The composite (harmonization) or the content image (style transfer). Only "
                                       "the first image of a batch is used."),
                io.Combo.Input("mode", options=["harmonization", "style_transfer"], default="harmonization",
                               tooltip="Which task."),
                io.Int.Input("t_start", default=0, min=0, max=99,
                             tooltip=f"Noise step to inject at; 0 uses the paper's value ({HARMONIZATION_T} "
                                     f"for harmonization, {STYLE_TRANSFER_T} for style transfer). Higher "
                                     "changes more."),
                io.Int.Input("count", default=1, min=1, max=64, tooltip="Number of results."),
                _seed("seed", "Seed of the first result; result k uses seed + k."),
                io.Boolean.Input("match_colors", default=True,
                                 tooltip="Style transfer: match the content's colour histogram to the training "
                                         "image first."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Harmonization: the pasted object (white), same size as the image. Only the "
                                      "first mask of a batch is used."),
                io.Int.Input("scale", optional=True, default=-1, min=-16, max=15,
                             tooltip="Pyramid scale to inject at (paper: any s <= N-1): 0 = coarsest, counting "
                                     "up; negative counts from the finest (-1 = finest, the official choice; -2 = "
                                     "one below). The finer scales then run as in sampling."),
            ],
            outputs=[
                io.Image.Output(display_name="images",
                                tooltip="The results, a batch of 'count' images at the input's size (capped at "
                                        "50,000 pixels)."),
            ],
        )

    @classmethod
    def execute(cls, model, image, mode, t_start, count, seed, match_colors, mask=None, scale=-1):
        x = image_to_bchw(image, "image", min_side=8)[:1]
        check_positive(count, "count")
        try:
            s = resolve_scale(model, int(scale))
        except ValueError as e:
            raise NodeInputError("scale", str(e)) from None
        device = bridge.torch_device()
        cw, ch = capped_size(x.shape[-1], x.shape[-2])  # the size harmonize / style_transfer run at
        check_sample_memory(model, (ch, cw), int(count), device, "image")
        t0 = int(t_start) or (HARMONIZATION_T if mode == "harmonization" else STYLE_TRANSFER_T)
        progress = bridge.Progress(t0 + sum(model.schedule.start_steps[s + 1 :]))
        common = dict(count=int(count), seed=int(seed), device=device, on_step=progress,
                      should_stop=progress.should_stop, scale=s)
        with torch.inference_mode(False):
            if mode == "harmonization":
                if mask is None:
                    raise NodeInputError("mask", "harmonization needs the mask of the pasted object",
                                         "connect a MASK that is white on the object")
                m = mask_to_b1hw(mask, "mask", size=tuple(x.shape[-2:]))[:1]
                if m.max() <= 0:
                    raise NodeInputError("mask", "the mask is empty", "paint the pasted object white")
                try:
                    out = harmonize(model, x, m, t0, **common)
                except ValueError as e:
                    raise NodeInputError("scale" if "scale" in str(e) else "image", str(e)) from None
            elif mode == "style_transfer":
                try:
                    out = style_transfer(model, x, t0, match_colors=bool(match_colors), **common)
                except ValueError as e:
                    raise NodeInputError("scale" if "scale" in str(e) else "image", str(e)) from None
            else:
                raise NodeInputError("mode", f"unknown mode {mode!r}", "use harmonization or style_transfer")
        return io.NodeOutput(bchw_to_image(out))


NODES = [SinDDMGuideROI, SinDDMGuideText, LoadOpenCLIP, SinDDMInject, SinDDMGuideTextRegion, SinDDMEditTrainingImage]
