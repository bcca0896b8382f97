"""The High-Fidelity rectifier (Hou et al., AAAI 2024): reconstruction and editing by DDIM inversion."""

from __future__ import annotations

from .builder import SD15, SDXL, SDXL_NOTE, Base, Graph, Node

RECTIFIER_NOTE = ("High-Fidelity rectifier (Hou, Wei, Chen, AAAI 2024): a hypernetwork R(x_0, P_t, t) modulates the "
                  "frozen SD UNet's middle and output-block convolutions at every step, theta (1 + Delta), from the "
                  "image x_0 and the model's own x_0 estimate P_t, to keep reconstructions and edits faithful.\n"
                  "Reconstruction training (eq. 3): the usual noise-prediction loss of the rectified model; Adam lr "
                  "1e-3 x 0.9 every 5,000 steps, weight decay 1e-5. The paper trains on a domain (about 100 images, "
                  "e.g. faces): replace the small training set here (three crops of the left part of the bundled "
                  "photo) with yours, scaled to the model's size (512x512 for SD 1.x), and raise batch to what your GPU holds (8 here). (Image "
                  "Batch is marked deprecated in newer ComfyUI but still works; Batch Images does the same there.)\n"
                  "Inference (the paper's 'N inversion and denoising steps'): the held-out image (the right part of "
                  "the photo, which no training crop contains) is VAE-encoded, inverted to x_T by DDIM Inversion "
                  "(50 steps) and sampled back by SamplerCustom (add_noise off, euler = DDIM eta 0, cfg 1, the "
                  "inversion's sigmas); the rectified MODEL from Apply Rectifier gets the image as x_0 at every "
                  "step. Use the prompt the rectifier was trained under (empty here) for the inversion and the "
                  "samplers.\n\n"
                  "Files: {what} in models/checkpoints ({ckpt} here); "
                  "coffee_250x200.png (bundled with the pack in core/sinddm/data) in ComfyUI's input folder; trained "
                  "rectifiers are saved to models/single_image_edit/rectifier (Load Rectifier reads them).")


def rectifier_note(base: Base) -> str:
    return RECTIFIER_NOTE.format(what=base.what, ckpt=base.ckpt)


def rectifier_inputs(g: Graph, base: Base = SD15) -> tuple[Node, Node]:
    g.stage("Inputs: model and text", columns=1)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=base.ckpt)
    empty = g.add("CLIPTextEncode", title="Empty prompt", clip=ckpt.out(1), text="")
    return ckpt, empty


def rectifier_photo(g: Graph) -> Node:
    g.stage("Photo", columns=1)
    return g.add("LoadImage", title="Photo (250x200)", image="coffee_250x200.png")


def rectifier_training_set(g: Graph, photo: Node, base: Base = SD15) -> Node:
    """Three square views (512x512 for SD 1.x) of the left part of the photo (columns 0-129) as one IMAGE batch (stands in for a
    domain of ~100 images); the held-out crop (columns 130-249) is none of them."""
    g.stage("Training set: left part of the photo (your images here)", columns=3)
    top = g.add("ImageCrop", title="Left, top", image=photo.out(0), width=130, height=130, x=0, y=0)
    bottom = g.add("ImageCrop", title="Left, bottom", image=photo.out(0), width=130, height=130, x=0, y=70)
    n = base.size
    top_512 = g.add("ImageScale", title=f"Left, top, {n}", image=top.out(0), upscale_method="lanczos", width=n,
                    height=n, crop="center")
    bottom_512 = g.add("ImageScale", title=f"Left, bottom, {n}", image=bottom.out(0), upscale_method="lanczos",
                       width=n, height=n, crop="center")
    flip = g.add("ImageFlip", title="Left, top, mirrored", image=top_512.out(0), flip_method="y-axis: horizontally")
    two = g.add("ImageBatch", title="Batch of 2", image1=top_512.out(0), image2=bottom_512.out(0))
    return g.add("ImageBatch", title="Batch of 3", image1=two.out(0), image2=flip.out(0))


def rectifier_held_out(g: Graph, photo: Node, base: Base = SD15) -> Node:
    g.stage("Held-out image x_0: right part of the photo", columns=1)
    crop = g.add("ImageCrop", title="Right (never trained on)", image=photo.out(0), width=120, height=120, x=130,
                 y=40)
    held = g.add("ImageScale", title=f"Held-out, {base.size}", image=crop.out(0), upscale_method="lanczos",
                 width=base.size, height=base.size, crop="center")
    g.add("SaveImage", title="Held-out image", images=held.out(0), filename_prefix="rectifier/held_out")
    return held


def rectifier_inversion(g: Graph, model, ckpt: Node, empty: Node, encoded: Node, title: str) -> Node:
    """DDIM Inversion of the held-out latent by ``model`` (LATENT x_T, SIGMAS)."""
    return g.add("SIE_DDIMInversion", title=f"DDIM Inversion ({title})", model=model, positive=empty.out(0),
                 latent=encoded.out(0), steps=50)


def rectifier_sample_back(g: Graph, model, ckpt: Node, empty: Node, inversion: Node, sampler: Node, title: str,
                          prefix: str) -> None:
    """SamplerCustom from the inverted x_T over the inversion's sigmas (add_noise off, euler = DDIM eta 0, cfg 1)."""
    sc = g.add("SamplerCustom", title=f"Sample back ({title})", model=model, add_noise=False, noise_seed=0, cfg=1.0,
               positive=empty.out(0), negative=empty.out(0), sampler=sampler.out(0), sigmas=inversion.out(1),
               latent_image=inversion.out(0))
    dec = g.add("VAEDecode", samples=sc.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title=title, images=dec.out(0), filename_prefix=prefix)


def rectifier_reconstruct(base: Base = SD15) -> Graph:
    g = Graph("rectifier_reconstruct" + base.suffix)
    g.note(rectifier_note(base) + "\n\nThis graph: reconstruction training (5,000 steps, batch 8) on the left part of the "
           "photo, saved as rectifier/recon_*.safetensors (rectifier_edit loads it); then the held-out right part "
           "reconstructed: inverted and sampled back by the rectified MODEL (a DDIM round trip is faithful when one "
           "model runs both halves; the rectifier makes that model better on the image), next to the plain model's "
           "own round trip." + ("" if base is SD15 else " On SDXL the rectifier modulates the 33 convolutions of "
                                "the middle and output blocks (SD 1.5: 43)." + SDXL_NOTE))
    ckpt, empty = rectifier_inputs(g, base)
    photo = rectifier_photo(g)
    held = rectifier_held_out(g, photo, base)
    images = rectifier_training_set(g, photo, base)
    g.stage("1. Train (eq. 3)", columns=2)
    train = g.add("SIE_TrainRectifier", model=ckpt.out(0), vae=ckpt.out(2), images=images.out(0), mode="recon",
                  steps=5000, lr=0.001, seed=0, conditioning=empty.out(0), batch=8, estimate="base",
                  checkpoint_every=500, resume_from="none")
    g.add("SIE_SaveRectifier", rectifier=train.out(0), filename_prefix="rectifier/recon")
    g.add("SaveImage", title="Loss", images=train.out(1), filename_prefix="rectifier/recon_loss")
    g.stage("2. Reconstruct: DDIM inversion, then sampling back", columns=3)
    encoded = g.add("VAEEncode", title="Held-out latent", pixels=held.out(0), vae=ckpt.out(2))
    apply = g.add("SIE_ApplyRectifier", model=ckpt.out(0), rectifier=train.out(0), image=held.out(0), strength=1.0,
                  vae=ckpt.out(2), estimate="base")
    euler = g.add("KSamplerSelect", title="euler (= DDIM, eta 0)", sampler_name="euler")
    inv = rectifier_inversion(g, apply.out(0), ckpt, empty, encoded, "rectified")
    rectifier_sample_back(g, apply.out(0), ckpt, empty, inv, euler, "Rectified", "rectifier/recon_rectified")
    inv_plain = rectifier_inversion(g, ckpt.out(0), ckpt, empty, encoded, "plain")
    rectifier_sample_back(g, ckpt.out(0), ckpt, empty, inv_plain, euler, "Plain model", "rectifier/recon_plain")
    return g


def rectifier_edit() -> Graph:
    g = Graph("rectifier_edit")
    g.note(rectifier_note(SD15) + "\n\nThis graph: editing training (Alg. 1) continued from a saved reconstruction "
           "rectifier (run rectifier_reconstruct first; Load Rectifier picks its file): directional CLIP loss from "
           "the source to the target text + L1 to the original, on x0_hat (clipped to the latent range) from each "
           "step of the original trajectory (200 steps, lr 1e-3 x 0.9 every 10 steps; the paper lowers the decay "
           "for edits that change a lot). The held-out image is inverted by the reconstruction-rectified MODEL (a "
           "model without the edit: an edit rectifier that inverted would let its own sampling undo the edit) and "
           "sampled back by the edit-rectified MODEL (the edit) and by the reconstruction-rectified one (the "
           "reconstruction, to compare); SDEdit (the photo noised half way, denoise 0.5, the paper's image-to-image "
           "use) is the other way in.\n\n"
           "Expected time on one GPU (an estimate, not yet measured at 512x512: no GPU has run this graph): an edit "
           "step runs a plain and a rectified UNet pass, the VAE decoder and CLIP on 8 images and the backward "
           "through them, roughly 1-2 s on an H100, so the 200 steps take about 5 min; rectifier_reconstruct's "
           "5,000 steps (no decoder, no CLIP) roughly 0.5 s each, about 40 min. Loading the saved rectifier here "
           "saves repeating those 5,000 steps for every edit.\n\n"
           "Needs an OpenCLIP checkpoint in models/open_clip (e.g. ViT-B-32) and open_clip_torch.")
    ckpt, empty = rectifier_inputs(g)
    clip = g.add("SIE_LoadOpenCLIP", clip_name="open_clip_vit_b32.safetensors", arch="ViT-B-32")
    recon = g.add("SIE_LoadRectifier", title="Load the reconstruction rectifier",
                  rectifier_name="rectifier/recon_00001.safetensors")
    photo = rectifier_photo(g)
    held = rectifier_held_out(g, photo)
    images = rectifier_training_set(g, photo)
    g.stage("1. Edit training (Alg. 1)", columns=2)
    edit = g.add("SIE_TrainRectifier", title="Train (edit)", model=ckpt.out(0), vae=ckpt.out(2), images=images.out(0),
                 mode="edit", steps=200, lr=0.001, seed=0, open_clip=clip.out(0), source_text="black coffee",
                 target_text="latte art", rectifier=recon.out(0), conditioning=empty.out(0), batch=8,
                 estimate="base", checkpoint_every=20, resume_from="none")
    g.add("SIE_SaveRectifier", title="Save (edit)", rectifier=edit.out(0), filename_prefix="rectifier/edit")
    g.add("SaveImage", title="Edit losses", images=edit.out(1), filename_prefix="rectifier/edit_loss")
    g.stage("2. Edit: invert without the edit, sample back with it; SDEdit", columns=3)
    encoded = g.add("VAEEncode", title="Held-out latent", pixels=held.out(0), vae=ckpt.out(2))
    apply_recon = g.add("SIE_ApplyRectifier", title="Apply Rectifier (reconstruction)", model=ckpt.out(0),
                        rectifier=recon.out(0), image=held.out(0), strength=1.0, vae=ckpt.out(2), estimate="base")
    apply_edit = g.add("SIE_ApplyRectifier", title="Apply Rectifier (edit)", model=ckpt.out(0), rectifier=edit.out(0),
                       image=held.out(0), strength=1.0, vae=ckpt.out(2), estimate="base")
    euler = g.add("KSamplerSelect", title="euler (= DDIM, eta 0)", sampler_name="euler")
    inv = rectifier_inversion(g, apply_recon.out(0), ckpt, empty, encoded, "reconstruction rectifier")
    rectifier_sample_back(g, apply_edit.out(0), ckpt, empty, inv, euler, "Edited", "rectifier/edit")
    rectifier_sample_back(g, apply_recon.out(0), ckpt, empty, inv, euler, "Reconstruction (no edit)",
                          "rectifier/edit_reconstruction")
    ks = g.add("KSampler", title="SDEdit 0.5 (edit rectifier)", model=apply_edit.out(0), positive=empty.out(0),
               negative=empty.out(0), latent_image=encoded.out(0), seed=0, steps=50, cfg=1.0, sampler_name="ddpm",
               scheduler="normal", denoise=0.5)
    dec = g.add("VAEDecode", samples=ks.out(0), vae=ckpt.out(2))
    g.add("SaveImage", title="Edited (SDEdit 0.5)", images=dec.out(0), filename_prefix="rectifier/edit_sdedit")
    return g


def rectifier_reconstruct_sdxl() -> Graph:
    return rectifier_reconstruct(SDXL)


GRAPHS = [rectifier_reconstruct, rectifier_edit, rectifier_reconstruct_sdxl]
