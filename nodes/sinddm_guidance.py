"""SinDDM guidance nodes (regions, text through CLIP, text in a region), the OpenCLIP loader,
and the nodes that apply a model to an existing image (harmonize / style transfer, edit the
training image).  Split from :mod:`.sinddm`, whose types and helpers they share; registered
as their own node module (``nodes.NODE_MODULES``).
"""

from __future__ import annotations

import functools

import torch

from ..core.sinddm import edit_training_image, harmonize, style_transfer
from ..core.sinddm.edit import HARMONIZATION_T, REGION_EDIT_T, STARTS, STYLE_TRANSFER_T
from ..core.sinddm.guidance import ROIGuidance
from ..core.sinddm.pyramid import capped_size
from ..core.sinddm.sample import resolve_scale
from . import comfy_bridge as bridge
from .common import CATEGORY_ROOT, OPEN_CLIP, NodeInputError, bchw_to_image, check_positive, image_to_bchw, mask_to_b1hw
from .sinddm import CATEGORY, GUIDANCE, SINDDM, _guidance_in, _guidance_list, _seed, check_sample_memory


class SinDDMGuideROI:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_SinDDMGuideROI", "SinDDM Guide: Region (ROI / outpaint)", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (GUIDANCE,)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Guidance for SinDDM Sample (chainable).",)
    DESCRIPTION = ("Forces regions of the sample to show given content (paper eq. 2): at every step of every scale "
                   "but the finest, the clean-image estimate inside the mask moves towards the target by "
                   "'strength'. Target, mask and x, y are in pixels of the image SinDDM Train was given (before "
                   "its 50,000-pixel cap): a crop of that image placed where it was cut reproduces it, and the "
                   "pack scales all three like the training image (the official code cuts its targets from the "
                   "training pyramid). Outpainting: use the training image as target with no mask and sample "
                   "wider than it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "target": ("IMAGE", {"tooltip": "Content to enforce, e.g. the training image or a crop of it, at the "
                                             "resolution the training image was loaded at (it is scaled like the "
                                             "training image). Only the first image of a batch is used."}),
            "strength": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "eta of eq. 2 (official: 0.8). 1 copies the target exactly."}),
            "x": ("INT", {"default": 0, "min": -8192, "max": 8192,
                          "tooltip": "Where the target's left edge lands, in pixels of the training image as "
                                     "loaded (the output spans output width / training width of them)."}),
            "y": ("INT", {"default": 0, "min": -8192, "max": 8192,
                          "tooltip": "Where the target's top edge lands, in pixels of the training image as "
                                     "loaded."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Which pixels of the target to enforce (same size as the target; "
                                         "white = enforce). Default: the whole target. Only the first mask of a "
                                         "batch is used."}),
            "guidance": _guidance_in(),
        }}

    def run(self, target, strength, x, y, mask=None, guidance=None):
        tgt = image_to_bchw(target, "target")[:1]
        msk = mask_to_b1hw(mask, "mask", size=tuple(tgt.shape[-2:]))[:1] if mask is not None else None
        try:
            ROIGuidance(tgt, msk, float(strength), (int(x), int(y)))  # validate now, not at sampling
        except ValueError as e:
            raise NodeInputError("target", str(e)) from None
        factory = functools.partial(ROIGuidance, tgt, msk, float(strength), (int(x), int(y)))
        return (tuple(guidance or ()) + (factory,),)


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


class LoadOpenCLIP:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_LoadOpenCLIP", "Load OpenCLIP (local file)", ("open_clip",)
    CATEGORY = f"{CATEGORY_ROOT}/loaders"
    FUNCTION = "run"
    RETURN_TYPES = (OPEN_CLIP,)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("An OpenCLIP model for SinDDM text guidance.",)
    DESCRIPTION = ("Loads an OpenCLIP model from a local file in models/open_clip (no download). SinDDM's paper "
                   "uses ViT-B/32 with OpenAI weights: put e.g. open_clip_model.safetensors of "
                   "'timm/vit_base_patch32_clip_224.openai' there and pick arch ViT-B-32.")

    @classmethod
    def INPUT_TYPES(cls):
        archs = _open_clip_archs()
        return {"required": {
            "clip_name": (bridge.list_models("open_clip"), {"tooltip": "Checkpoint in models/open_clip "
                                                                       "(.safetensors preferred)."}),
            "arch": (archs, {"default": "ViT-B-32" if "ViT-B-32" in archs else archs[0],
                             "tooltip": "The OpenCLIP architecture the checkpoint belongs to."}),
        }}

    def run(self, clip_name, arch):
        from ..core.clip_model import load_open_clip

        try:
            path = bridge.model_path("open_clip", clip_name)
        except FileNotFoundError as e:
            raise NodeInputError("clip_name", str(e)) from None
        try:
            with torch.inference_mode(False):  # CLIP is differentiated through at sampling time
                return (load_open_clip(path, arch),)
        except ValueError as e:
            raise NodeInputError("arch", str(e), "pick the architecture that matches the file") from None


class SinDDMGuideText:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_SinDDMGuideText", "SinDDM Guide: Text (CLIP)", ("open_clip",)
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (GUIDANCE,)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Guidance for SinDDM Sample (chainable).",)
    DESCRIPTION = ("Steers SinDDM samples with a text prompt through CLIP (paper Sec. 4). content: changes what "
                   "appears, at every scale but the coarsest, inside a mask made of the pixels CLIP cares about "
                   "most ('fill_factor' of the image). style: changes the look at the finest scale only "
                   "(the prompt gets ' Style' appended). Slow on a CPU: every step runs CLIP on 16 views.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": (OPEN_CLIP, {"tooltip": "From Load OpenCLIP."}),
            "text": ("STRING", {"default": "", "multiline": True, "tooltip": "The prompt, e.g. 'volcano eruption' "
                                                                            "(content) or 'Van Gogh' (style)."}),
            "mode": (["content", "style"], {"default": "content", "tooltip": "content or style guidance."}),
            "strength": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "eta: size of each CLIP step relative to the image (style: 0.3)."}),
            "fill_factor": ("FLOAT", {"default": 0.3, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the image that content guidance may change "
                                                 "(ignored for style, which uses the whole image)."}),
            "seed": _seed("Seed of the random views, augmentations and template choices; sample k of a batch uses "
                         "seed + k (like its noise), so it does not depend on count."),
        }, "optional": {"guidance": _guidance_in()}}

    def run(self, clip, text, mode, strength, fill_factor, seed, guidance=None):
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
        return (tuple(guidance or ()) + (factory,),)


class SinDDMGuideTextRegion:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_SinDDMGuideTextRegion", "SinDDM Guide: Text in Region (CLIP)", ("open_clip",)
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = (GUIDANCE,)
    RETURN_NAMES = ("guidance",)
    OUTPUT_TOOLTIPS = ("Guidance for SinDDM Sample or SinDDM Edit Training Image (chainable).",)
    DESCRIPTION = ("Edits a region with a text prompt through CLIP (paper Sec. 4, Figs. 2 and S3; the official "
                   "clip_roi): at the finest scale, the pixels inside the mask are optimised for 'iterations' CLIP "
                   "steps and pasted back, the rest is kept, and the last 'denoise_steps' denoising steps blend the "
                   "edit in. With SinDDM Edit Training Image (start: training_image) it edits the training image "
                   "itself, as the paper; with SinDDM Sample it edits the region of each random sample.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": (OPEN_CLIP, {"tooltip": "From Load OpenCLIP."}),
            "text": ("STRING", {"default": "", "multiline": True,
                                "tooltip": "What the region should show, e.g. 'volcano eruption'."}),
            "mask": ("MASK", {"tooltip": "The region to edit (white), on the output canvas; stretched to the output "
                                         "size if it differs. CLIP sees the mask's bounding box. Only the first "
                                         "mask of a batch is used."}),
            "strength": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "eta: size of each CLIP step relative to the region (official: 0.1)."}),
            "iterations": ("INT", {"default": 100, "min": 1, "max": 10000,
                                   "tooltip": "CLIP steps on the region (official: 100). Each runs CLIP on 16 views."}),
            "denoise_steps": ("INT", {"default": REGION_EDIT_T, "min": 0, "max": 99,
                                      "tooltip": "Denoising steps of the finest scale after the edit, which blend it "
                                                 "into its surroundings (official: 3)."}),
            "seed": _seed("Seed of the random views, augmentations and template choices; sample k of a batch uses "
                         "seed + k (like its noise), so it does not depend on count."),
        }, "optional": {"guidance": _guidance_in()}}

    def run(self, clip, text, mask, strength, iterations, denoise_steps, seed, guidance=None):
        from ..core.sinddm.clip_guidance import CLIPRegionGuidance

        if not text.strip():
            raise NodeInputError("text", "the prompt is empty", "write what the region should show")
        m = mask_to_b1hw(mask, "mask")[:1]
        if m.max() <= 0:
            raise NodeInputError("mask", "the mask is empty", "paint the region to edit white")
        check_positive(iterations, "iterations")
        factory = functools.partial(CLIPRegionGuidance, clip, text, m, float(strength), int(iterations),
                                    int(denoise_steps), 16, int(seed))
        return (tuple(guidance or ()) + (factory,),)


class SinDDMEditTrainingImage:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_SinDDMEditTrainingImage", "SinDDM Edit Training Image (text)", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The edited training image, a batch of 'count' results at the training size.",)
    DESCRIPTION = ("Applies guidance to the training image itself instead of a random sample (paper Sec. 4). "
                   "coarser_scale: the training image one scale down is re-rendered at the finest scale, so a "
                   "SinDDM Guide: Text in style mode restyles its textures and keeps its layout (the official "
                   "clip_style_trans, paper Fig. S9). training_image: the image itself is noised a little (3 steps) "
                   "and denoised, for SinDDM Guide: Text in Region (the official clip_roi).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (SINDDM, {"tooltip": "A trained SinDDM model; its own training image is edited."}),
            "guidance": (GUIDANCE, {"tooltip": "The guidance to apply: SinDDM Guide: Text (style mode) or Guide: "
                                               "Text in Region, possibly chained with others."}),
            "start": (list(STARTS), {"default": STARTS[0],
                                     "tooltip": "coarser_scale: start from the training image one scale down "
                                                "(text style, official clip_style_trans). training_image: start from "
                                                "the image itself (text in region, official clip_roi)."}),
            "t_start": ("INT", {"default": 0, "min": 0, "max": 99,
                                "tooltip": f"Noise step the finest scale starts from; 0 uses the official value "
                                           f"(the model's T[N-1] for coarser_scale, {REGION_EDIT_T} for "
                                           "training_image). Higher changes more."}),
            "count": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Number of results."}),
            "seed": _seed("Seed of the first result; result k uses seed + k."),
        }}

    def run(self, model, guidance, start, t_start, count, seed):
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
        return (bchw_to_image(out),)


# --------------------------------------------------------------------------------------
class SinDDMInject:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_SinDDMInject", "SinDDM Harmonize / Style Transfer", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The results, a batch of 'count' images at the input's size (capped at 50,000 pixels).",)
    DESCRIPTION = ("Injects an image into a scale of a SinDDM model trained on another image (the finest by default; "
                   "'scale' picks another) and denoises it for a few steps (paper Sec. 4). harmonization: a composite with a pasted object (mask = the "
                   "object) is blended into the training image's look, then composited back through a dilated, "
                   "blurred mask. style_transfer: the content image takes the training image's textures "
                   "(colours matched by histogram first).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (SINDDM, {"tooltip": "A SinDDM model trained on the background / style image."}),
            "image": ("IMAGE", {"tooltip": "The composite (harmonization) or the content image (style transfer). "
                                           "Only the first image of a batch is used."}),
            "mode": (["harmonization", "style_transfer"], {"default": "harmonization",
                                                           "tooltip": "Which task."}),
            "t_start": ("INT", {"default": 0, "min": 0, "max": 99,
                                "tooltip": f"Noise step to inject at; 0 uses the paper's value ({HARMONIZATION_T} "
                                           f"for harmonization, {STYLE_TRANSFER_T} for style transfer). Higher "
                                           "changes more."}),
            "count": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Number of results."}),
            "seed": _seed("Seed of the first result; result k uses seed + k."),
            "match_colors": ("BOOLEAN", {"default": True, "tooltip": "Style transfer: match the content's colour "
                                                                    "histogram to the training image first."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Harmonization: the pasted object (white), same size as the image. "
                                         "Only the first mask of a batch is used."}),
            "scale": ("INT", {"default": -1, "min": -16, "max": 15,
                              "tooltip": "Pyramid scale to inject at (paper: any s <= N-1): 0 = coarsest, counting "
                                         "up; negative counts from the finest (-1 = finest, the official choice; "
                                         "-2 = one below). The finer scales then run as in sampling."}),
        }}

    def run(self, model, image, mode, t_start, count, seed, match_colors, mask=None, scale=-1):
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
        return (bchw_to_image(out),)


NODES = [SinDDMGuideROI, SinDDMGuideText, LoadOpenCLIP, SinDDMInject, SinDDMGuideTextRegion, SinDDMEditTrainingImage]
