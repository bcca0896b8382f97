"""SINE (Zhang et al., CVPR 2023): fine-tune, then edit with model-based guidance (whole image, any resolution, two models)."""

from __future__ import annotations

from .builder import SD15, SDXL, SDXL_NOTE, Base, Graph, Node

SINE_NOTE = ("SINE (Zhang et al., CVPR 2023): fine-tune SD on ONE image, then edit it with model-based guidance "
             "(eq. 3): for t > K the fine-tuned model's prediction at the fine-tune prompt c^ is mixed into the "
             "pretrained model's, w (v e(z_t, c) + (1 - v) e^(z_t, c^)) + (1 - w) e(z_t); plain CFG for t <= K.\n\n")
SINE_FILES = ("\n\nFiles: {what} in ComfyUI/models/checkpoints ({ckpt} here); the "
              "photo in ComfyUI/input (coffee_250x200.png here, bundled with the pack in core/sinddm/data (CC0), or "
              "your own). Save SINE writes the fine-tune to ComfyUI/models/single_image_edit/sine (reload it with "
              "SINE: Load Fine-Tuned Model, which also gives back the c^ training used); images go to "
              "ComfyUI/output/sine. The fine-tune prompt is typed once, in the 'Fine-tune prompt' node: the recipe, "
              "the conditioning training uses and the guider's c^ all read it.")


def sine_files(base: Base = SD15) -> str:
    return SINE_FILES.format(what=base.what, ckpt=base.ckpt)


def sine_inputs(g: Graph, image: str = "coffee_250x200.png", base: Base = SD15):
    g.stage("Inputs: model and photo", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=base.ckpt)
    img = g.add("LoadImage", image=image)
    scaled = g.add("ImageScale", image=img.out(0), upscale_method="lanczos", width=base.size, height=base.size,
                   crop="center")
    return ckpt, scaled


def sine_finetune(g: Graph, ckpt: Node, image: Node, prompt: str, patches: bool, steps: int, title: str,
                  prefix: str) -> tuple[Node, Node]:
    """Recipe -> shared fine-tune node -> the fine-tune prompt through the node's CLIP output.  The prompt is
    one PrimitiveString read by the recipe and both text encodes: one source of truth for c^."""
    text = g.add("PrimitiveString", title=f"Fine-tune prompt ({title})", value=prompt)
    c_hat = g.add("CLIPTextEncode", title=f"c^ ({title})", clip=ckpt.out(1), text=text.out(0))
    recipe = g.add("SIE_SineRecipe", title=f"Recipe ({title})", prompt=text.out(0), patches=patches,
                   train_text_encoder=False, pooled_x0_weight=0.0, whole_fraction=0.0, text_learning_rate=0.0,
                   text_encoder_mode="full")
    ft = g.add("SIE_FineTune", title=f"Fine-tune ({title})", model=ckpt.out(0), vae=ckpt.out(2), image=image.out(0),
               conditioning=c_hat.out(0), mode="lora", steps=steps, learning_rate=0.0, rank=8, seed=0,
               recipe=recipe.out(0), clip=ckpt.out(1), checkpoint_every=200 if steps <= 1000 else 1000,
               resume_from="none", preview_every=100 if steps <= 1000 else 500)
    g.add("SaveImage", title=f"Loss ({title})", images=ft.out(1), filename_prefix=f"{prefix}_loss")
    g.add("SIE_SaveSine", trained=ft.out(2), filename_prefix=prefix)
    # c^ through the fine-tuned CLIP (the input CLIP unless the recipe trains the text encoder)
    c_hat_ft = g.add("CLIPTextEncode", title=f"c^, tuned CLIP ({title})", clip=ft.out(3), text=text.out(0))
    return ft, c_hat_ft


def sine_sample(g: Graph, ckpt: Node, guider: Node, width: int, height: int, prefix: str, title: str) -> None:
    noise = g.add("RandomNoise", noise_seed=0)
    sampler = g.add("KSamplerSelect", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", model=ckpt.out(0), scheduler="ddim_uniform", steps=100, denoise=1.0)
    empty = g.add("EmptyLatentImage", width=width, height=height, batch_size=1)
    out = g.add("SamplerCustomAdvanced", noise=noise.out(0), guider=guider.out(0), sampler=sampler.out(0),
                sigmas=sigmas.out(0), latent_image=empty.out(0))
    dec = g.add("VAEDecode", samples=out.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title=title, images=dec.out(0), filename_prefix=prefix)


def sine_edit(base: Base = SD15) -> Graph:
    g = Graph("sine_edit" + base.suffix)
    n = base.size
    g.note(SINE_NOTE + f"This graph: the paper's setting without patches: fine-tune on the {n}x{n} photo for 800 "
           f"steps (lora here; the paper's full fine-tune: mode full, AdamW lr 1e-6), then DDIM 100 steps, cfg 7.5, "
           f"v 0.7, K 400 at {n}x{n}. The sweep renders a K x v grid from one noise (Figs. 7, 8, 19-21) so you can "
           "pick the trade-off by eye. Save SINE keeps the fine-tune (LoRA + prompt) for SINE: Load Fine-Tuned "
           "Model.\n\n" + ("The official code also trains the text encoder, every parameter of it: turn "
           "train_text_encoder on in the recipe (text_encoder_mode full, lr 1e-6; the fine-tune node's clip output "
           "then carries it)." if base is SD15 else "On SDXL the first block's 320 channels take F(v) as on SD 1.x, "
           "and train_text_encoder stays off.") + sine_files(base) + ("" if base is SD15 else SDXL_NOTE))
    ckpt, image = sine_inputs(g, base=base)
    g.stage("1. Fine-tune on the photo", columns=2)
    ft, c_hat = sine_finetune(g, ckpt, image, "a photo of a sks cup", False, 800, "whole image", "sine/edit")
    g.stage("2. Edit with model-based guidance", columns=3)
    target = g.add("CLIPTextEncode", title="Target text c", clip=ckpt.out(1), text="a photo of a cup of green matcha tea")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_ModelGuidance", model=ckpt.out(0), finetuned_model=ft.out(0), positive=target.out(0),
                   finetune_positive=c_hat.out(0), negative=negative.out(0), cfg=7.5, v=0.7, K=400)
    sine_sample(g, ckpt, guider, n, n, "sine/edit", "Edited image (v 0.7, K 400)")
    g.stage("3. K x v sweep, one noise", columns=3)
    empty = g.add("EmptyLatentImage", width=n, height=n, batch_size=1)
    sweep = g.add("SIE_GuidanceSweep", model=ckpt.out(0), finetuned_model=ft.out(0), positive=target.out(0),
                  finetune_positive=c_hat.out(0), negative=negative.out(0), latent_image=empty.out(0),
                  K_values="200, 400, 600", v_values="0.5, 0.7, 0.9", seed=0, steps=100, cfg=7.5, sampler_name="ddim",
                  scheduler="ddim_uniform")
    dec = g.add("VAEDecode", samples=sweep.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Sweep (K rows, v columns)", images=dec.out(0),
          filename_prefix="sine/sweep")
    return g


def sine_any_resolution() -> Graph:
    g = Graph("sine_any_resolution")
    g.note(SINE_NOTE + "This graph: patch-based fine-tuning (paper Sec. 3.3, 10,000 steps): random crops of the photo "
           "resized to 1024x1024 (sides 10-100%, resized to 512), each with its positional map F(v). The fine-tuned "
           "MODEL carries F(v) of the whole grid, resized to any latent size, so the edit can be rendered at other "
           "resolutions and aspect ratios than the 512x512 source: here 1024x768 and 1024x512 (width x height; the "
           "paper's Figs. 4 and 13-18). The pretrained branch sees no map, as in the official code." + sine_files())
    ckpt, image = sine_inputs(g)
    g.stage("1. Fine-tune on patches", columns=2)
    ft, c_hat = sine_finetune(g, ckpt, image, "a photo of a sks cup", True, 10000, "patches", "sine/patches")
    g.stage("2. Edit at other sizes", columns=3)
    target = g.add("CLIPTextEncode", title="Target text c", clip=ckpt.out(1),
                   text="a photo of a cup of coffee on a wooden table in a garden")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_ModelGuidance", model=ckpt.out(0), finetuned_model=ft.out(0), positive=target.out(0),
                   finetune_positive=c_hat.out(0), negative=negative.out(0), cfg=7.5, v=0.7, K=400)
    sine_sample(g, ckpt, guider, 1024, 768, "sine/wide_1024x768", "Edit at 1024x768")
    sine_sample(g, ckpt, guider, 1024, 512, "sine/wide_1024x512", "Edit at 1024x512")
    return g


def sine_multi_model() -> Graph:
    g = Graph("sine_multi_model")
    g.note(SINE_NOTE + "This graph: multi-model guidance (official DDIMMultiSampler, its style-transfer script, the "
           "paper's Fig. 11c): two fine-tuned models, one on the content photo ('a photo of a sks cup') and one on "
           "a painting ('a painting in the sks style'), each with its own weight. The official example gives the "
           "fine-tuned models 0.4 and 0.5 (range_t_min 400): here v = 0.1 for the pretrained model, weight_2 = 0.5 "
           "for the second model, so the first gets 1 - v - weight_2 = 0.4, both for t > K = 400. More models, each "
           "with its own weight and K: chain SINE: Add Fine-Tuned Model nodes into more_models.\n\nThe style "
           "painting is generated in the graph by the pretrained model (an expressionist oil painting: no image "
           "file needed); to use your own painting, put it in ComfyUI/input and feed a Load Image node into the "
           "style fine-tune's ImageScale instead." + sine_files())
    ckpt, image = sine_inputs(g)
    g.stage("Style painting, generated", columns=2)
    painting = g.add("CLIPTextEncode", title="Painting text", clip=ckpt.out(1),
                     text="an expressionist oil painting of a landscape, thick impasto brush strokes, swirling "
                          "blue and yellow sky, canvas texture")
    no_text = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    style_guider = g.add("CFGGuider", model=ckpt.out(0), positive=painting.out(0), negative=no_text.out(0), cfg=7.5)
    noise = g.add("RandomNoise", noise_seed=7)
    sampler = g.add("KSamplerSelect", sampler_name="ddim")
    sigmas = g.add("BasicScheduler", model=ckpt.out(0), scheduler="ddim_uniform", steps=50, denoise=1.0)
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    style_latent = g.add("SamplerCustomAdvanced", noise=noise.out(0), guider=style_guider.out(0),
                         sampler=sampler.out(0), sigmas=sigmas.out(0), latent_image=empty.out(0))
    style = g.add("VAEDecode", title="Style painting", samples=style_latent.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Style painting", images=style.out(0), filename_prefix="sine/style_painting")
    style_scaled = g.add("ImageScale", image=style.out(0), upscale_method="lanczos", width=512, height=512,
                         crop="center")
    g.stage("1. Fine-tune two models", columns=2)
    ft1, c1 = sine_finetune(g, ckpt, image, "a photo of a sks cup", False, 800, "content", "sine/content")
    ft2, c2 = sine_finetune(g, ckpt, style_scaled, "a painting in the sks style", False, 800, "style", "sine/style")
    g.stage("2. Mix both into the pretrained model", columns=3)
    target = g.add("CLIPTextEncode", title="Target text c", clip=ckpt.out(1), text="a painting of a cup of coffee")
    negative = g.add("CLIPTextEncode", title="Negative (empty)", clip=ckpt.out(1), text="")
    guider = g.add("SIE_ModelGuidance", model=ckpt.out(0), finetuned_model=ft1.out(0), positive=target.out(0),
                   finetune_positive=c1.out(0), negative=negative.out(0), cfg=7.5, v=0.1, K=400,
                   finetuned_model_2=ft2.out(0), finetune_positive_2=c2.out(0), weight_2=0.5)
    sine_sample(g, ckpt, guider, 512, 512, "sine/multi_model", "Two-model edit")
    return g


def sine_edit_sdxl() -> Graph:
    return sine_edit(SDXL)


GRAPHS = [sine_edit, sine_any_resolution, sine_multi_model, sine_edit_sdxl]
