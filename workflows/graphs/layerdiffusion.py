"""LayerDiffusion (Li et al. 2023; not the LayerDiffuse transparency project): the layered stages with SAM masks."""

from __future__ import annotations

from .builder import SD15, SDXL, SDXL_NOTE, Base, Graph, Node

LAYER_NOTE = ("LayerDiffusion (Li, Huang, Ding, Li, SIGGRAPH Asia 2023 TC; not the LayerDiffuse transparency project): "
              "put the subject of ONE photo into a new background and edit it from one target text T = T_a + T_b.\n"
              "1. Optimize Text Embedding (with conditioning_b and the photo's SAM mask): eq. 2 as the paper writes "
              "it, one prediction with [e_a, e_b] (T_a and T_b, 154 tokens) under the photo's object mask, both "
              "optimised (Adam lr 1e-3, 500 steps). Outputs: e_opt / ê_a (here ê_a) and ê_b. The recipe's reading "
              "offers the other interpretations; separate_reference trains e_b on the reference's background "
              "(the reference image and mask are already wired to the optimiser for it).\n"
              "2. ConditioningAverage: e_opt = 0.7 ê_a + 0.3 ê_b (eq. 3; ComfyUI's node computes exactly this).\n"
              "3. Fine-Tune Model at e_opt: 2 L_obj under the photo's mask + 1 L_bg outside the reference's mask "
              "(paper: full, lr 2e-6, 250 steps; lora here). The recipe's object_mask 'target' takes L_obj's mask "
              "from O_t, as the paper writes (target_mask input).\n"
              "4. Iterative Guidance: DDIM 50 steps alternating ê_a and e_opt by step index.\n\n"
              "Files: {what} in ComfyUI/models/checkpoints ({ckpt} here); "
              "a Segment Anything checkpoint in ComfyUI/models/sams (sam_vit_b_01ec64.pth here; needs the "
              "segment-anything package); the photo in ComfyUI/input (coffee_250x200.png here, bundled with the "
              "pack in core/sinddm/data, or your own). Masks: click points and drag a box on the Segment node's "
              "picture, or edit its JSON prompt.")


def layer_note(base: Base = SD15) -> str:
    return LAYER_NOTE.format(what=base.what, ckpt=base.ckpt)


def layer_stages(g: Graph, ckpt: Node, photo: Node, sam: Node, reference: Node, reference_mask: Node,
                 t_a: str, t_b: str, prefix: str, target_mask: Node | None = None, base: Base = SD15) -> None:
    g.stage("1. Layered text embeddings", columns=2)
    c, box = base.scaled(256), [base.scaled(v) for v in (96, 64, 416, 480)]
    mask = g.add("SIE_SAMSegment", title="Object mask of the photo", sam=sam.out(0), image=photo.out(0),
                 prompt=f'{{"points": [[{c}, {c}, 1]], "box": [{box[0]}, {box[1]}, {box[2]}, {box[3]}]}}', dilate=0,
                 invert=False)
    e_a = g.add("CLIPTextEncode", title="T_a (object)", clip=ckpt.out(1), text=t_a)
    e_b = g.add("CLIPTextEncode", title="T_b (background)", clip=ckpt.out(1), text=t_b)
    recipe = g.add("SIE_LayerRecipe", lambda_obj=2.0, lambda_bg=1.0, object_source="image",
                   background_source="reference", reading="concat", reduction="image", mask_rule="area",
                   object_mask="image")
    emb = g.add("SIE_OptimizeEmbedding", title="Layered embeddings ê_a, ê_b", model=ckpt.out(0),
                vae=ckpt.out(2), image=photo.out(0), conditioning=e_a.out(0), steps=500, learning_rate=0.001, seed=0,
                conditioning_b=e_b.out(0), mask=mask.out(0), recipe=recipe.out(0), reference_image=reference.out(0),
                reference_mask=reference_mask.out(0), checkpoint_every=100, resume_from="none", preview_every=50)
    g.add("SaveImage", title="Embedding loss", images=emb.out(1), filename_prefix=f"{prefix}_embedding_loss")
    g.stage("2. Interpolate and fine-tune", columns=2)
    e_opt = g.add("ConditioningAverage", title="e_opt = 0.7 ê_a + 0.3 ê_b", conditioning_to=emb.out(0),
                  conditioning_from=emb.out(2), conditioning_to_strength=0.7)
    targets = {} if target_mask is None else {"target_mask": target_mask.out(0)}
    ft = g.add("SIE_FineTune", model=ckpt.out(0), vae=ckpt.out(2), image=photo.out(0), conditioning=e_opt.out(0),
               mode="lora", steps=250, learning_rate=0.0, rank=8, seed=0, recipe=recipe.out(0), mask=mask.out(0),
               reference_image=reference.out(0), reference_mask=reference_mask.out(0), **targets,
               checkpoint_every=50, resume_from="none", preview_every=25)
    g.add("SaveImage", title="Fine-tuning loss", images=ft.out(1), filename_prefix=f"{prefix}_finetune_loss")
    g.add("SIE_SaveTrained", trained=ft.out(2), filename_prefix=prefix)
    g.stage("3. Iterative guidance", columns=3)
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_IterativeGuidance", model=ft.out(0), object_positive=emb.out(0), positive=e_opt.out(0),
                   negative=negative.out(0), cfg=7.5, start_parity="auto")
    noise = g.add("RandomNoise", noise_seed=0)
    sampler = g.add("KSamplerSelect", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", model=ft.out(0), scheduler="ddim_uniform", steps=50, denoise=1.0)
    empty = g.add("EmptyLatentImage", width=base.size, height=base.size, batch_size=1)
    out = g.add("SamplerCustomAdvanced", noise=noise.out(0), guider=guider.out(0), sampler=sampler.out(0),
                sigmas=sigmas.out(0), latent_image=empty.out(0))
    dec = g.add("VAEDecode", samples=out.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Edited image", images=dec.out(0), filename_prefix=prefix)


def layerdiffusion(base: Base = SD15) -> Graph:
    g = Graph("layerdiffusion" + base.suffix)
    g.note(layer_note(base) + "\n\nThis graph: the target text through SD gives the target image O_t, which serves "
           "as the background reference; SAM masks the subject in the photo and in O_t (that mask is both the "
           "reference mask M_r and Fine-Tune Model's target_mask). No other file is needed."
           + ("" if base is SD15 else " On SDXL the concat reading joins the two contexts (154 tokens) and keeps "
              "e_a's pooled vector, as ComfyUI's ConditioningConcat does; ConditioningAverage averages the pooled "
              "vectors too." + SDXL_NOTE))
    g.stage("Inputs: model, photo, SAM", columns=1)
    n = base.size
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=base.ckpt)
    img = g.add("LoadImage", title="Photo (its subject is kept)", image="coffee_250x200.png")
    photo = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=n, height=n, crop="center")
    sam = g.add("SIE_LoadSAM", sam_name="sam_vit_b_01ec64.pth")
    g.stage("0. Target image O_t from T", columns=2)
    target = g.add("CLIPTextEncode", title="Target text T", clip=ckpt.out(1),
                   text="a cup of coffee on a wooden table in a forest")
    empty_neg = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    empty = g.add("EmptyLatentImage", width=n, height=n, batch_size=1)
    ks = g.add("KSampler", model=ckpt.out(0), positive=target.out(0), negative=empty_neg.out(0),
               latent_image=empty.out(0), seed=0, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform",
               denoise=1.0)
    o_t = g.add("VAEDecode", title="O_t", samples=ks.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Target image O_t", images=o_t.out(0), filename_prefix="layerdiffusion/target")
    m_r = g.add("SIE_SAMSegment", title="Object mask of O_t", sam=sam.out(0), image=o_t.out(0),
                prompt=f'{{"points": [[{n // 2}, {n // 2}, 1]], "box": null}}', dilate=0, invert=False)
    layer_stages(g, ckpt, photo, sam, o_t, m_r, "a cup of coffee", "on a wooden table in a forest",
                 "layerdiffusion/edit", target_mask=m_r, base=base)
    return g


LAYER_BACKGROUND = "table_by_the_sea_512.png"  # bundled in core/layerdiffusion/data (our own drawing, MIT)


def layerdiffusion_reference_background() -> Graph:
    g = Graph("layerdiffusion_reference_background")
    g.note(layer_note() + "\n\nThis graph: a reference background image of your own (paper Fig. 4), with no object "
           f"in it, so its mask is all black (Solid Mask 0). The placeholder {LAYER_BACKGROUND} (an empty wooden "
           "table by the sea, drawn procedurally; bundled with the pack in core/layerdiffusion/data) goes into "
           "ComfyUI/input next to the photo; replace it with a background photo taken from a camera angle close "
           "to your photo's (the paper's failure cases come from a mismatch). For the paper's M_t from O_t "
           "(recipe object_mask 'target'), generate O_t from the whole target text, segment its subject and "
           "connect that mask to Fine-Tune Model's target_mask, as the layerdiffusion workflow does.")
    g.stage("Inputs: model, photo, background, SAM", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    img = g.add("LoadImage", title="Photo (its subject is kept)", image="coffee_250x200.png")
    photo = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=512, height=512, crop="center")
    bg = g.add("LoadImage", title="Reference background (no object)", image=LAYER_BACKGROUND)
    background = g.add("ImageScale", image=bg.out(0), upscale_method="lanczos", width=512, height=512,
                       crop="center")
    no_object = g.add("SolidMask", title="Reference mask (no object)", value=0.0, width=512, height=512)
    sam = g.add("SIE_LoadSAM", sam_name="sam_vit_b_01ec64.pth")
    layer_stages(g, ckpt, photo, sam, background, no_object, "a cup of coffee", "on a wooden table by the sea",
                 "layerdiffusion/reference_background")
    return g


def layerdiffusion_sdxl() -> Graph:
    return layerdiffusion(SDXL)


GRAPHS = [layerdiffusion, layerdiffusion_reference_background, layerdiffusion_sdxl]
