"""SinDDM (Kulikov et al., ICML 2023): random samples, ROI outpainting, harmonization, style transfer and the three CLIP-guided graphs."""

from __future__ import annotations

from .builder import Graph

PAPER_TRAIN = dict(steps=120000, batch_size=32, width=160, learning_rate=0.001, seed=0, preview_every=1000,
                   precision="auto", checkpoint_every=5000, resume_from="none")
CPU_HINT = ("Paper settings: 120,000 steps, batch 32, width 160 (the paper: about 7 h on an A6000). "
            "On a CPU set steps 2000, batch 8, width 64 (about 20 minutes for this 250x200 image; rough results).")
BUNDLED = "bundled with the pack in core/sinddm/data (CC0)"


def sinddm_files(images: str, clip: bool = False, saved: bool = False) -> str:
    """The note's paragraph saying which file goes where (issue 19, point 17)."""
    text = f"\n\nFiles: {images}"
    if clip:
        text += ("; an OpenCLIP checkpoint in ComfyUI/models/open_clip (open_clip_vit_b32.safetensors here: "
                 "ViT-B-32 with OpenAI weights, the paper's CLIP, e.g. open_clip_model.safetensors of "
                 "timm/vit_base_patch32_clip_224.openai saved under that name, or pick yours in Load OpenCLIP; "
                 "needs the open_clip_torch package)")
    text += ". Images larger than 50,000 pixels are trained at that size (the official cap)."
    if saved:
        text += (" Save SinDDM Model writes the trained model to ComfyUI/models/single_image_edit/sinddm; next time "
                 "load it with Load SinDDM Model instead of training again.")
    return text + " Results go to ComfyUI/output/sinddm."


TRAINING_IMAGE = f"the training image in ComfyUI/input (coffee_250x200.png here, {BUNDLED}, or your own)"


def sinddm_random_samples() -> Graph:
    g = Graph("sinddm_random_samples")
    g.note("SinDDM: train a diffusion model on ONE image, then draw random samples of any size.\n\n"
           f"{CPU_HINT}\n\nWhile ComfyUI keeps running, unchanged nodes are cached: sampling again does not retrain."
           + sinddm_files(TRAINING_IMAGE, saved=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.add("SIE_SaveSinDDM", model=train.out(0), filename_prefix="coffee")
    g.add("SaveImage", title="Loss curve", images=train.out(1), filename_prefix="sinddm/loss")
    g.stage("2. Sample (any size)")
    same = g.add("SIE_SinDDMSample", title="Same size", model=train.out(0), count=4, seed=0)
    g.add("SaveImage", title="Samples (training size)", images=same.out(0), filename_prefix="sinddm/samples")
    wide = g.add("SIE_SinDDMSample", title="Twice as wide", model=train.out(0), count=2, seed=100, width_scale=2.0)
    g.add("SaveImage", title="Samples (2x wide)", images=wide.out(0), filename_prefix="sinddm/wide")
    tall = g.add("SIE_SinDDMSample", title="Exact pixel size", model=train.out(0), count=2, seed=200, width=200,
                 height=320)
    g.add("SaveImage", title="Samples (200x320)", images=tall.out(0), filename_prefix="sinddm/tall")
    return g


def sinddm_roi_outpaint() -> Graph:
    g = Graph("sinddm_roi_outpaint")
    g.note("SinDDM region guidance (paper eq. 2).\n\nTop: outpainting - the whole training image is the region, "
           "placed in the middle of an output twice as wide; SinDDM invents the sides.\n\nBottom: two copies of a "
           "crop of the image (the cup) are forced at chosen places; the rest is generated around them. A region's "
           "target, mask and x, y are in pixels of the training image as loaded (a click on the region node's "
           "picture sets x, y); a larger image is scaled down with them.\n\n" + CPU_HINT
           + sinddm_files(TRAINING_IMAGE))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: regions (eq. 2)", columns=2)
    whole = g.add("SIE_SinDDMGuideROI", title="Region: whole image (outpaint)", target=img.out(0), strength=0.8,
                  x=125, y=0)
    g.stage("3. Sample with guidance")
    wide = g.add("SIE_SinDDMSample", title="Outpaint to 2x width", model=train.out(0), guidance=whole.out(0), count=2,
                 seed=0, width_scale=2.0)
    g.add("SaveImage", title="Outpainted", images=wide.out(0), filename_prefix="sinddm/outpaint")
    g.stage("2. Guidance: regions (eq. 2)")
    crop = g.add("ImageCrop", image=img.out(0), width=110, height=100, x=60, y=40)
    roi1 = g.add("SIE_SinDDMGuideROI", title="Region 1", target=crop.out(0), strength=0.8, x=10, y=20)
    roi2 = g.add("SIE_SinDDMGuideROI", title="Region 2", target=crop.out(0), strength=0.8, x=130, y=80,
                 guidance=roi1.out(0))
    g.stage("3. Sample with guidance")
    two = g.add("SIE_SinDDMSample", title="Two regions", model=train.out(0), guidance=roi2.out(0), count=2, seed=10)
    g.add("SaveImage", title="Region-guided", images=two.out(0), filename_prefix="sinddm/roi")
    return g


def sinddm_harmonization() -> Graph:
    g = Graph("sinddm_harmonization")
    g.note("SinDDM harmonization: a pasted object is blended into the look of the image the model was trained on "
           "(paper Sec. 4, injected at t = 5 of the finest scale).\n\nThis example pastes a flat orange square onto "
           "the training image and harmonizes it.\n\n" + CPU_HINT
           + sinddm_files(f"{TRAINING_IMAGE}; for your own edit, the composite and the mask of the pasted object "
                          "(white = object, the composite's size) in ComfyUI/input, each through a Load Image node "
                          "(the mask from its alpha or a channel) into SinDDM Harmonize's image and mask"))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Paste an object (composite + mask)")
    patch = g.add("EmptyImage", width=50, height=40, batch_size=1, color=0xE07020)
    comp = g.add("ImageCompositeMasked", destination=img.out(0), source=patch.out(0), x=170, y=120,
                 resize_source=False)
    base = g.add("SolidMask", value=0.0, width=250, height=200)
    obj = g.add("SolidMask", value=1.0, width=50, height=40)
    mask = g.add("MaskComposite", destination=base.out(0), source=obj.out(0), x=170, y=120, operation="add")
    g.add("SaveImage", title="Naive composite", images=comp.out(0), filename_prefix="sinddm/composite")
    g.stage("3. Harmonize (inject at t = 5)")
    harm = g.add("SIE_SinDDMInject", model=train.out(0), image=comp.out(0), mask=mask.out(0), mode="harmonization",
                 t_start=0, count=2, seed=0, match_colors=True)
    g.add("SaveImage", title="Harmonized", images=harm.out(0), filename_prefix="sinddm/harmonized")
    return g


def sinddm_style_transfer() -> Graph:
    g = Graph("sinddm_style_transfer")
    g.note("SinDDM style transfer: the model is trained on the STYLE image; the content image is colour-matched to it "
           "and injected at t = 15 of the finest scale (paper Sec. 4), so its layout stays and its textures change.\n\n"
           "The second node injects it one scale lower ('scale' = -2; the paper allows any scale): the finest scale "
           f"then re-renders it, so more of the style shows.\n\n{CPU_HINT}"
           + sinddm_files(f"the style (training) image and the content image in ComfyUI/input (coffee_250x200.png and "
                          f"coffee_128x100.png here, both {BUNDLED}, or your own)"))
    g.stage("1. Train on the style image", columns=1)
    style = g.add("LoadImage", title="Style image (training)", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=style.out(0), **PAPER_TRAIN)
    g.stage("2. Content image")
    content = g.add("LoadImage", title="Content image", image="coffee_128x100.png")
    flip = g.add("ImageFlip", image=content.out(0), flip_method="y-axis: horizontally")
    g.stage("3. Inject (style transfer)")
    out = g.add("SIE_SinDDMInject", model=train.out(0), image=flip.out(0), mode="style_transfer", t_start=0, count=2,
                seed=0, match_colors=True)
    g.add("SaveImage", title="Style transfer", images=out.out(0), filename_prefix="sinddm/style_transfer")
    lower = g.add("SIE_SinDDMInject", title="Injected one scale down", model=train.out(0), image=flip.out(0),
                  mode="style_transfer", t_start=0, count=2, seed=0, match_colors=True, scale=-2)
    g.add("SaveImage", title="Style transfer (one scale down)", images=lower.out(0),
          filename_prefix="sinddm/style_transfer_coarser")
    return g


def sinddm_text_guided() -> Graph:
    g = Graph("sinddm_text_guided")
    g.note("SinDDM text guidance with CLIP (paper Sec. 4). Content: CLIP changes what appears in a part of the "
           "image ('fill_factor'); style: the look of the finest scale.\n\nSlow on a CPU: every guided "
           f"step runs CLIP on 16 views.\n\n{CPU_HINT}" + sinddm_files(TRAINING_IMAGE, clip=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: text (CLIP)")
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    content = g.add("SIE_SinDDMGuideText", title="Text: content", clip=clip.out(0), text="latte art heart",
                    mode="content", strength=0.3, fill_factor=0.3, seed=0)
    g.stage("3. Sample with guidance")
    s1 = g.add("SIE_SinDDMSample", title="Content-guided", model=train.out(0), guidance=content.out(0), count=2, seed=0)
    g.add("SaveImage", title="Text-guided content", images=s1.out(0), filename_prefix="sinddm/text_content")
    g.stage("2. Guidance: text (CLIP)")
    style = g.add("SIE_SinDDMGuideText", title="Text: style", clip=clip.out(0), text="Van Gogh", mode="style",
                  strength=0.3, fill_factor=1.0, seed=0)
    g.stage("3. Sample with guidance")
    s2 = g.add("SIE_SinDDMSample", title="Style-guided", model=train.out(0), guidance=style.out(0), count=2, seed=0)
    g.add("SaveImage", title="Text-guided style", images=s2.out(0), filename_prefix="sinddm/text_style")
    return g


def sinddm_text_roi() -> Graph:
    g = Graph("sinddm_text_roi")
    g.note("SinDDM text in a region (paper Sec. 4, Figs. 2 and S3; the official clip_roi): the pixels inside the mask "
           "(here a box over the coffee) are optimised with CLIP for 100 steps, pasted back, and 3 denoising steps "
           "of the finest scale blend them in; the rest of the image is kept.\n\nTop: the training image itself "
           "(SinDDM Edit Training Image, start = training_image). Bottom: the same guidance on random samples "
           "(it chains with other SinDDM guides).\n\nEach CLIP step runs 16 views: about a minute on a CPU for 100 "
           f"steps.\n\n{CPU_HINT}" + sinddm_files(TRAINING_IMAGE, clip=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: text in a region")
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    base = g.add("SolidMask", value=0.0, width=250, height=200)
    box = g.add("SolidMask", value=1.0, width=90, height=50)
    mask = g.add("MaskComposite", title="Region: the coffee", destination=base.out(0), source=box.out(0), x=75,
                 y=45, operation="add")
    region = g.add("SIE_SinDDMGuideTextRegion", title="Text in region", clip=clip.out(0), text="latte art heart",
                   mask=mask.out(0), strength=0.1, iterations=100, denoise_steps=3, seed=0)
    g.stage("3. Edit and sample")
    edit = g.add("SIE_SinDDMEditTrainingImage", title="Edit the training image", model=train.out(0),
                 guidance=region.out(0), start="training_image", t_start=0, count=2, seed=0)
    g.add("SaveImage", title="Training image, region edited", images=edit.out(0), filename_prefix="sinddm/text_roi")
    samples = g.add("SIE_SinDDMSample", title="Random samples, region edited", model=train.out(0),
                    guidance=region.out(0), count=2, seed=0)
    g.add("SaveImage", title="Samples, region edited", images=samples.out(0),
          filename_prefix="sinddm/text_roi_samples")
    return g


def sinddm_text_style() -> Graph:
    g = Graph("sinddm_text_style")
    g.note("SinDDM text-guided style of the training image itself (paper Sec. 4 and Fig. S9; the official "
           "clip_style_trans): the training image one scale down is re-rendered at the finest scale while CLIP "
           "steers the style ('Van Gogh' + ' Style'), so the layout stays and the textures change.\n\n"
           f"{CPU_HINT}" + sinddm_files(TRAINING_IMAGE, clip=True))
    g.stage("1. Train on one image", columns=1)
    img = g.add("LoadImage", image="coffee_250x200.png")
    train = g.add("SIE_SinDDMTrain", image=img.out(0), **PAPER_TRAIN)
    g.stage("2. Guidance: text style (CLIP)")
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    style = g.add("SIE_SinDDMGuideText", title="Text: style", clip=clip.out(0), text="Van Gogh", mode="style",
                  strength=0.3, fill_factor=1.0, seed=0)
    g.stage("3. Re-render the training image")
    edit = g.add("SIE_SinDDMEditTrainingImage", title="Restyle the training image", model=train.out(0),
                 guidance=style.out(0), start="coarser_scale", t_start=0, count=2, seed=0)
    g.add("SaveImage", title="Training image, text style", images=edit.out(0), filename_prefix="sinddm/text_style_trans")
    return g


GRAPHS = [sinddm_random_samples, sinddm_roi_outpaint, sinddm_harmonization, sinddm_style_transfer, sinddm_text_guided, sinddm_text_roi, sinddm_text_style]
