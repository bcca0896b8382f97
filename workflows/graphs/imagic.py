"""Imagic (Kawar et al., CVPR 2023): the three stages on one photo."""

from __future__ import annotations

from .builder import SD15, SDXL, SDXL_NOTE, Base, Graph


def imagic(base: Base = SD15) -> Graph:
    g = Graph("imagic" + base.suffix)
    g.note("Imagic (Kawar et al., CVPR 2023): edit ONE real photo from a target text.\n\n"
           "1. Optimize Text Embedding: e_tgt -> e_opt that reconstructs the photo (500 steps, lr 1e-3).\n"
           "2. Fine-Tune Model at e_opt (lora: adapters, lr 1e-4; full: every UNet weight, as the paper and the "
           "diffusers port, lr 2e-6; 1000 steps).\n3. Interpolate: e = eta*e_tgt + (1-eta)*e_opt, then sample with "
           "DDIM. SD needs eta about 0.9-1.2; the Eta Sweep renders several etas with one seed so you can pick by "
           "eye.\n\n"
           f"Files: {base.what} in ComfyUI/models/checkpoints ({base.ckpt} here); the "
           "photo in ComfyUI/input (coffee_250x200.png here, bundled with the pack in core/sinddm/data (CC0), or your "
           "own). Save Trained writes the edit (the weight delta + e_opt; precision fp16 halves a full fine-tune, "
           "3.4 -> 1.7 GB) to ComfyUI/models/single_image_edit/trained, where Load Trained and ComfyUI's Load LoRA "
           "find it; images go to ComfyUI/output/imagic.\n\n"
           + ("The SD ports report 5-10 minutes per edit on an A100 or a 3090 (SD 1.5); on a CPU it takes many hours."
              if base is SD15 else "Stage 1 optimises SDXL's whole text conditioning: the context and the pooled "
              "vector, both interpolated by eta." + SDXL_NOTE))
    g.stage("Inputs: model and photo", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=base.ckpt)
    img = g.add("LoadImage", image="coffee_250x200.png")
    scaled = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=base.size, height=base.size,
                   crop="center")
    g.stage("1. Target text")
    target = g.add("CLIPTextEncode", title="Target text (e_tgt)", clip=ckpt.out(1),
                   text="a photo of a cup of green matcha tea")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    g.stage("2. Optimise embedding (stage 1)", columns=1)
    emb = g.add("SIE_OptimizeEmbedding", model=ckpt.out(0), vae=ckpt.out(2), image=scaled.out(0),
                conditioning=target.out(0), steps=500, learning_rate=0.001, seed=0, checkpoint_every=100,
                resume_from="none", preview_every=50)
    g.add("SaveImage", title="Embedding loss", images=emb.out(1), filename_prefix="imagic/embedding_loss")
    g.stage("3. Fine-tune (stage 2)", columns=1)
    ft = g.add("SIE_FineTune", model=ckpt.out(0), vae=ckpt.out(2), image=scaled.out(0), conditioning=emb.out(0),
               mode="lora", steps=1000, learning_rate=0.0, rank=8, seed=0, checkpoint_every=250, resume_from="none",
               preview_every=100)
    g.add("SaveImage", title="Fine-tuning loss", images=ft.out(1), filename_prefix="imagic/finetune_loss")
    g.add("SIE_SaveTrained", trained=ft.out(2), filename_prefix="imagic/edit")
    g.stage("4. Interpolate and sample (stage 3)", columns=3)
    mix = g.add("SIE_InterpolateConditioning", target=target.out(0), optimized=emb.out(0), eta=1.0)
    empty = g.add("EmptyLatentImage", width=base.size, height=base.size, batch_size=1)
    ks = g.add("KSampler", model=ft.out(0), positive=mix.out(0), negative=negative.out(0), latent_image=empty.out(0),
               seed=0, steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    dec = g.add("VAEDecode", samples=ks.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Edited image", images=dec.out(0), filename_prefix="imagic/edit")
    sweep = g.add("SIE_EtaSweep", model=ft.out(0), target=target.out(0), optimized=emb.out(0),
                  negative=negative.out(0), latent_image=empty.out(0), etas="0.7, 0.8, 0.9, 1.0, 1.1", seed=0,
                  steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform")
    dec2 = g.add("VAEDecode", samples=sweep.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Eta sweep (0.7 ... 1.1)", images=dec2.out(0), filename_prefix="imagic/eta_sweep")
    return g


def imagic_sdxl() -> Graph:
    return imagic(SDXL)


GRAPHS = [imagic, imagic_sdxl]
