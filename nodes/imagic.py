"""Imagic nodes: optimise the text embedding, fine-tune the model, interpolate, sweep eta, save/load.

Each stage is an atomic node on native types (MODEL, VAE, IMAGE, CONDITIONING), so the
stages compose with the rest of ComfyUI: sampling is ComfyUI's own KSampler (or
SamplerCustomAdvanced) on the fine-tuned MODEL with the interpolated CONDITIONING.
Training nodes run on clones under ``torch.inference_mode(False)``, report the loss on
the progress bar, stop on cancel and never modify their inputs.
"""

from __future__ import annotations

import logging

import torch

from ..core.artifact_io import ArtifactError
from ..core.images import pil_to_tensor
from ..core.imagic import (
    DEFAULT_LR,
    EmbeddingConfig,
    FineTuneConfig,
    LoRAConfig,
    finetune,
    interpolate,
    optimize_embedding,
)
from ..core.imagic.artifact import Trained, load_trained, save_trained
from ..core.plot import loss_curve
from ..core.resources import SD15_UNET_PARAMS, ResourceError, check_fits, describe_parts, imagic_bytes, imagic_parts
from . import comfy_bridge as bridge
from .common import (
    CATEGORY_ROOT,
    NodeInputError,
    bchw_to_image,
    check_positive,
    image_to_bchw,
    parse_numbers,
    save_output,
)

log = logging.getLogger("comfyui-single-image-edit")

CATEGORY = f"{CATEGORY_ROOT}/imagic"
TRAINED = "SIE_TRAINED"
SEED = {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}


# --------------------------------------------------------------------------------------
# Input checks shared by the training nodes
# --------------------------------------------------------------------------------------
def check_model(model, name: str = "model") -> None:
    problem = bridge.sd1_problem(model)
    if problem:
        raise NodeInputError(name, f"this is {problem}; Imagic here needs a Stable Diffusion 1.x MODEL",
                             "load an SD 1.x checkpoint (e.g. v1-5-pruned-emaonly.safetensors)")


def cond_tensor(conditioning, model, name: str = "conditioning") -> tuple[torch.Tensor, dict]:
    """(cond [1, 77, D] float32 clone, its options dict) from a CONDITIONING, checked against the MODEL."""
    if not isinstance(conditioning, list) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise NodeInputError(name, "expected a CONDITIONING (from CLIP Text Encode)", "connect a CONDITIONING")
    cond, opts = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        raise NodeInputError(name, f"expected a [1, tokens, width] tensor, got {getattr(cond, 'shape', cond)}")
    width = bridge.ComfySD(model).context_dim
    if cond.shape[-1] != width:
        raise NodeInputError(name, f"the text encoding is {cond.shape[-1]} wide but the model expects {width}",
                             "encode the prompt with the CLIP of the same SD 1.x checkpoint")
    if len(conditioning) > 1:
        log.warning("%s: %d conditioning entries; only the first is optimised", name, len(conditioning))
    return cond[:1].detach().clone().float(), dict(opts)


def curve(losses: list[float], title: str) -> torch.Tensor:
    return bchw_to_image(pil_to_tensor(loss_curve(losses, title=title))[None])


def unet_param_count(model) -> int:
    """Parameters of the MODEL's UNet (SD 1.5's count where the MODEL does not expose them)."""
    try:
        return sum(p.numel() for p in model.model.diffusion_model.parameters())
    except (AttributeError, TypeError):
        return SD15_UNET_PARAMS


def check_memory(model, image, mode: str, device, gradient_checkpointing: bool, rank: int = 8,
                 free: int | None = None) -> None:
    """Refuse an Imagic stage (``mode``: embedding, lora or full) that cannot fit in ``device``'s
    free memory (:mod:`core.resources`), naming the input to change: ``mode`` when a full
    fine-tune would fit as LoRA, else ``image``."""
    x = image_to_bchw(image, "image", min_side=8)
    h, w = x.shape[-2:]
    latent = (h // 8, w // 8)
    params = unet_param_count(model)
    parts = imagic_parts(latent, mode, params, rank, gradient_checkpointing)
    stage = "the embedding optimisation" if mode == "embedding" else f"the {mode} fine-tune"
    try:
        check_fits(sum(parts.values()), device, f"{stage} of a {w}x{h} image ({describe_parts(parts)} GiB)", "",
                   free)
    except ResourceError as e:
        lora = imagic_bytes(latent, "lora", params, rank, gradient_checkpointing)
        if mode == "full" and lora <= e.free:
            raise NodeInputError("mode", e.problem, f"use mode lora (about {lora / 2**30:.1f} GiB here), or a "
                                                    "device with more memory") from None
        raise NodeInputError("image", e.problem, "use a smaller image (SD 1.x is trained at 512x512)"
                             + ("" if mode == "embedding" else ", or mode lora with a lower rank")) from None


def image_latent(sd: bridge.ComfySD, image, name: str = "image") -> torch.Tensor:
    x = image_to_bchw(image, name, min_side=8)[:1]
    return sd.encode(x)


def fine_tune_steps(steps, recipe, layered: bool) -> int:
    """Fine-Tune Model's steps: as set, or 0 = the recipe's default (the papers' counts: Imagic's SD ports
    1,000; SINE 800 on the whole image, 10,000 with patches; LayerDiffusion 250)."""
    if int(steps) < 0:
        raise NodeInputError("steps", f"must be 0 (the recipe's default) or more, got {steps}",
                             "set steps to 0, or to the number of steps to train")
    if int(steps) > 0:
        return int(steps)
    if layered:
        from ..core.layerdiffusion import LayeredFineTuneConfig

        return LayeredFineTuneConfig().steps
    if recipe is None:
        return FineTuneConfig().steps
    from ..core.sine.finetune import DEFAULT_STEPS

    return DEFAULT_STEPS[bool(getattr(recipe, "patches", False))]


# --------------------------------------------------------------------------------------
class OptimizeEmbedding:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_OptimizeEmbedding", "Optimize Text Embedding", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("CONDITIONING", "IMAGE", "CONDITIONING")
    RETURN_NAMES = ("e_opt / ê_a", "loss_curve", "ê_b")
    OUTPUT_TOOLTIPS = ("The optimised embedding (same layout as the input conditioning). Imagic (no conditioning_b): "
                       "e_opt. LayerDiffusion (with conditioning_b and mask): ê_a, the optimised object embedding "
                       "(for ConditioningAverage's conditioning_to and Iterative Guidance's object_positive).",
                       "The loss per step.",
                       "LayerDiffusion: ê_b, the optimised background embedding (empty without conditioning_b).")
    DESCRIPTION = ("One optimiser node for the pack's methods, the model frozen. Imagic stage 1 (Kawar et al., CVPR "
                   "2023): optimises the target text's embedding so that it reconstructs the image (eq. 2); SD ports: "
                   "500 steps at lr 0.001 (the paper: 100 steps on Imagen). With conditioning_b and mask, "
                   "LayerDiffusion stage 1 (eq. 2 of Li et al. 2023): the object text's e_a and the background "
                   "text's e_b optimised jointly under the image's object mask (paper: Adam lr 1e-3, 500 steps).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x MODEL (frozen here)."}),
            "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint; encodes the image once."}),
            "image": ("IMAGE", {"tooltip": "The image to edit; only the first image of a batch is used (SD 1.x "
                                          "works best at 512x512)."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The target text, encoded (CLIP Text Encode): e_tgt. Only the "
                                                      "first conditioning entry is used."}),
            "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Adam steps (SD ports: 500)."}),
            "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": 1e-6,
                                        "tooltip": "Adam learning rate (paper and ports: 0.001)."}),
            "seed": ("INT", {**SEED, "tooltip": "Seed of the timesteps and noise drawn at each step."}),
        }, "optional": {
            "conditioning_b": ("CONDITIONING", {"tooltip": "LayerDiffusion: the background text T_b, encoded; "
                                                        "conditioning is then the object text T_a."}),
            "mask": ("MASK", {"tooltip": "LayerDiffusion: the image's object mask M (e.g. Segment (SAM points / "
                                         "box)); same size as the image."}),
            "recipe": ("SIE_RECIPE", {"tooltip": "LayerDiffusion: Recipe (how [e_a, e_b] enters the UNet, the mask "
                                                 "rule); empty: its defaults."}),
            "reference_image": ("IMAGE", {"tooltip": "LayerDiffusion, the recipe's separate_reference reading only: "
                                                     "the reference (background) image e_b is trained on (same size "
                                                     "as the image); other readings ignore it."}),
            "reference_mask": ("MASK", {"tooltip": "LayerDiffusion, separate_reference reading only: the reference's "
                                                   "object mask (all black for a pure background); e_b is trained "
                                                   "outside it."}),
        }}

    def run(self, model, vae, image, conditioning, steps, learning_rate, seed, conditioning_b=None, mask=None,
            recipe=None, reference_image=None, reference_mask=None):
        check_model(model)
        check_positive(steps, "steps")
        device = torch.device(bridge.torch_device())
        if conditioning_b is not None or mask is not None:
            return self.run_layered(model, vae, image, conditioning, steps, learning_rate, seed, conditioning_b,
                                    mask, recipe, device, reference_image, reference_mask)
        for name, value in (("recipe", recipe), ("reference_image", reference_image),
                            ("reference_mask", reference_mask)):
            if value is not None:
                raise NodeInputError(name, f"{name} is only for LayerDiffusion (with conditioning_b and mask)",
                                     "disconnect it, or connect conditioning_b and mask")
        check_memory(model, image, "embedding", device, device.type == "cuda")
        progress = bridge.Progress(steps)
        try:
            with torch.inference_mode(False):  # tensors made here are ordinary: autograd may save them
                cond, opts = cond_tensor(conditioning, model)
                sd = bridge.ComfySD(model, None, vae)
                latent = image_latent(sd, image).clone()
                cfg = EmbeddingConfig(int(steps), float(learning_rate), int(seed), device.type == "cuda")
                res = optimize_embedding(sd, latent, cond.to(latent.device), cfg, on_step=progress,
                                         should_stop=progress.should_stop)
        finally:
            bridge.free_memory()
        log.info("Imagic embedding: loss %.4f -> %.4f in %.1f s", res.losses[0], res.losses[-1], res.seconds)
        return ([[res.e_opt.cpu(), opts]], curve(res.losses, "Imagic embedding optimisation loss"), [])

    def run_layered(self, model, vae, image, conditioning, steps, learning_rate, seed, conditioning_b, mask, recipe,
                    device, reference_image=None, reference_mask=None):
        from .layerdiffusion import LayerRecipe, is_layer_recipe, layered_embeddings

        if conditioning_b is None:
            raise NodeInputError("conditioning_b", "a mask was given but no background text",
                                 "connect the encoded background text T_b (LayerDiffusion), or disconnect the mask")
        if mask is None:
            raise NodeInputError("mask", "LayerDiffusion's layered optimisation needs the image's object mask",
                                 "connect a MASK (Segment (SAM points / box))")
        if recipe is not None and not is_layer_recipe(recipe):
            raise NodeInputError("recipe", f"expected LayerDiffusion: Recipe, got {type(recipe).__name__}",
                                 "connect LayerDiffusion: Recipe or leave it empty")
        recipe = recipe or LayerRecipe()
        check_memory(model, image, "embedding", device, device.type == "cuda")
        progress = bridge.Progress(steps)
        try:
            with torch.inference_mode(False):
                e_a, opts_a = cond_tensor(conditioning, model)
                e_b, opts_b = cond_tensor(conditioning_b, model, "conditioning_b")
                sd = bridge.ComfySD(model, None, vae)
                res = layered_embeddings(sd, image, e_a, e_b, mask, steps, learning_rate, seed, recipe, progress,
                                         device, reference_image, reference_mask)
        finally:
            bridge.free_memory()
        log.info("LayerDiffusion embeddings (%s): loss %.4f -> %.4f in %.1f s", res.reading, res.losses[0],
                 res.losses[-1], res.seconds)
        return ([[res.e_a.cpu(), opts_a]], curve(res.losses, f"LayerDiffusion embedding loss ({res.reading})"),
                [[res.e_b.cpu(), opts_b]])


class FineTune:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_FineTune", "Fine-Tune Model", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "IMAGE", TRAINED, "CLIP")
    RETURN_NAMES = ("model", "loss_curve", "trained", "clip")
    OUTPUT_TOOLTIPS = ("A clone of the input MODEL with the trained weights applied as patches (the input MODEL "
                       "is unchanged); with a SINE patch recipe it also carries the positional map F(v).",
                       "The loss per step.",
                       "The trained delta and e_opt (Imagic: Save Trained) or the SINE fine-tune (SINE: Save).",
                       "With a recipe that trains the text encoder: a clone of the CLIP with the trained text "
                       "encoder (encode the fine-tune prompt with it); otherwise the clip input as given.")
    DESCRIPTION = ("One fine-tune node for the pack's methods (Imagic, SINE, LayerDiffusion). Without a recipe, Imagic stage 2: fine-tunes the model "
                   "to reconstruct the image at the frozen e_opt (eq. 2); SD ports: 1000 steps. With SINE: Fine-Tune "
                   "Recipe, SINE's fine-tuning at the fine-tune prompt (paper: 800 steps on the whole image, 10,000 "
                   "on patches). lora (default): low-rank adapters on every conv/linear weight, little memory, lr "
                   "1e-4. full: the whole UNet (Imagic lr 2e-6, SINE 1e-6; about 14 GB of optimiser state for SD "
                   "1.5). With LayerDiffusion: Recipe (or a mask), LayerDiffusion stage 2 at e_opt: lambda_1 L_obj under the "
                   "mask + lambda_2 L_bg under 1 - reference_mask (paper: lr 2e-6 full, 250 steps). The output "
                   "MODEL is a native patched clone: use it with KSampler or the pack's guiders. steps 0 (the "
                   "default) trains the recipe's step count; a number set on the node is used as it is.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD 1.x MODEL (not modified)."}),
            "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint."}),
            "image": ("IMAGE", {"tooltip": "The image to edit (the same as for the embedding); only the first "
                                          "image of a batch is used."}),
            "conditioning": ("CONDITIONING", {"tooltip": "e_opt from Imagic: Optimize Text Embedding (only its first "
                                                      "entry is used)."}),
            "mode": (["lora", "full"], {"default": "lora", "tooltip": "lora: adapters (small, fast); full: every "
                                                                     "UNet weight (the paper's; large memory)."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Adam steps. 0 = the recipe's "
                              "default: Imagic (no recipe) 1,000 (SD ports), SINE 800 on the whole image or 10,000 "
                              "with patches, LayerDiffusion 250 (the papers)."}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6, "round": 1e-8,
                                        "tooltip": f"0 = the mode's default ({DEFAULT_LR['lora']} for lora, "
                                                   f"{DEFAULT_LR['full']} for full)."}),
            "rank": ("INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank (lora mode); alpha = rank."}),
            "seed": ("INT", {**SEED, "tooltip": "Seed of the adapters' initialisation, timesteps and noise."}),
        }, "optional": {
            "recipe": ("SIE_RECIPE", {"tooltip": "A method's training recipe (SINE: Fine-Tune Recipe); empty: "
                                                 "Imagic. With SINE, conditioning is the encoded fine-tune prompt."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP: needed when the recipe trains the text encoder; "
                                         "passed through to the clip output otherwise."}),
            "mask": ("MASK", {"tooltip": "LayerDiffusion: the object mask M_t of the image (same size)."}),
            "reference_image": ("IMAGE", {"tooltip": "LayerDiffusion: the reference (background) image O_r, the "
                                                     "same size as the image."}),
            "reference_mask": ("MASK", {"tooltip": "LayerDiffusion: the reference's object mask M_r (all black for "
                                                   "a pure background)."}),
            "target_mask": ("MASK", {"tooltip": "LayerDiffusion, with the recipe's object_mask 'target' (the "
                                                "paper's M_t): the object mask of the target image O_t that SD "
                                                "generates from the target text (same size as the image)."}),
        }}

    def run(self, model, vae, image, conditioning, mode, steps, learning_rate, rank, seed, recipe=None, clip=None,
            mask=None, reference_image=None, reference_mask=None, target_mask=None):
        check_model(model)
        check_positive(rank, "rank")
        if mode not in DEFAULT_LR:
            raise NodeInputError("mode", f"unknown mode {mode!r}", "use lora or full")
        device = torch.device(bridge.torch_device())
        from .layerdiffusion import LayerRecipe, is_layer_recipe

        layered = is_layer_recipe(recipe) or (recipe is None and any(
            m is not None for m in (mask, reference_image, target_mask)))
        steps = fine_tune_steps(steps, recipe, layered)
        if layered:
            return self.run_layered(model, vae, image, conditioning, mode, steps, learning_rate, rank, seed,
                                    recipe or LayerRecipe(), clip, mask, reference_image, reference_mask, device,
                                    target_mask)
        if recipe is not None:
            return self.run_sine(model, vae, image, conditioning, mode, steps, learning_rate, rank, seed, recipe,
                                 clip, device)
        check_memory(model, image, mode, device, device.type == "cuda", int(rank))
        progress = bridge.Progress(steps)
        cfg = FineTuneConfig(mode=mode, steps=int(steps), lr=float(learning_rate) or None,
                             lora=LoRAConfig(rank=int(rank), alpha=float(rank)), seed=int(seed),
                             gradient_checkpointing=device.type == "cuda")
        try:
            with torch.inference_mode(False):  # tensors made here are ordinary: autograd may save them
                cond, _ = cond_tensor(conditioning, model)
                sd = bridge.ComfySD(model, None, vae)
                latent = image_latent(sd, image).clone()
                res = finetune(sd, latent, cond.to(latent.device), cfg, on_step=progress,
                               should_stop=progress.should_stop)
        finally:
            bridge.free_memory()
        log.info("Imagic fine-tune (%s, %d trainable parameters): loss %.4f -> %.4f in %.1f s", mode,
                 res.trainable_parameters, res.losses[0], res.losses[-1], res.seconds)
        trained = Trained(res.delta, mode, cond.cpu(), {"steps": int(steps), "lr": cfg.learning_rate,
                                                        "rank": int(rank) if mode == "lora" else None,
                                                        "final_loss": res.losses[-1]})
        return (bridge.apply_delta(model, res.delta), curve(res.losses, f"Imagic fine-tuning loss ({mode})"), trained,
                clip)

    def run_layered(self, model, vae, image, conditioning, mode, steps, learning_rate, rank, seed, recipe, clip, mask,
                    reference_image, reference_mask, device, target_mask=None):
        from .layerdiffusion import layered_finetune

        check_memory(model, image, mode, device, device.type == "cuda", int(rank))
        progress = bridge.Progress(steps)
        try:
            with torch.inference_mode(False):
                cond, _ = cond_tensor(conditioning, model)
                sd = bridge.ComfySD(model, None, vae)
                res = layered_finetune(sd, image, cond, mask, reference_image, reference_mask, mode, steps,
                                       learning_rate, rank, seed, recipe, progress, device, target_mask)
        finally:
            bridge.free_memory()
        log.info("LayerDiffusion fine-tune (%s): loss %.4f -> %.4f in %.1f s", mode, res.losses[0], res.losses[-1],
                 res.seconds)
        trained = Trained(res.delta, mode, cond.cpu(), {"method": "layerdiffusion", "steps": int(steps),
                                                        "lambda_obj": recipe.lambda_obj,
                                                        "lambda_bg": recipe.lambda_bg, "final_loss": res.losses[-1]})
        return (bridge.apply_delta(model, res.delta), curve(res.losses, f"LayerDiffusion fine-tuning loss ({mode})"),
                trained, clip)

    def run_sine(self, model, vae, image, conditioning, mode, steps, learning_rate, rank, seed, recipe, clip,
                 device):
        from .sine_train import SineTrained, apply_sine, check_clip, check_recipe, sine_finetune

        recipe = check_recipe(recipe)
        clip = check_clip(clip)
        image_to_bchw(image, "image", min_side=8)
        crops = torch.zeros(1, 512, 512, 3)  # with patches the UNet sees 512x512 crops whatever the image size
        check_memory(model, crops if recipe.patches else image, mode, device, device.type == "cuda", int(rank))
        progress = bridge.Progress(steps)
        try:
            with torch.inference_mode(False):  # tensors made here are ordinary: autograd may save them
                cond, _ = cond_tensor(conditioning, model)
                res = sine_finetune(model, clip, vae, image, cond, mode, steps, learning_rate, rank, seed, recipe,
                                    progress, device)
        finally:
            bridge.free_memory()
        log.info("SINE fine-tune (%s%s%s, %d trainable parameters): loss %.4f -> %.4f in %.1f s", mode,
                 ", patches" if recipe.patches else "", ", text encoder" if recipe.train_text_encoder else "",
                 res.trainable_parameters, res.losses[0], res.losses[-1], res.seconds)
        out_model, out_clip = apply_sine(model, clip, res)
        kind = f"{mode}{', patches' if recipe.patches else ''}{', text encoder' if recipe.train_text_encoder else ''}"
        return (out_model, curve(res.losses, f"SINE fine-tuning loss ({kind})"), SineTrained(res, recipe.prompt),
                out_clip)


# --------------------------------------------------------------------------------------
class InterpolateConditioning:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_InterpolateConditioning", "Imagic: Interpolate Conditioning", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("eta * target + (1 - eta) * optimized.",)
    DESCRIPTION = ("Imagic stage 3 (eq. 3): e = eta * e_tgt + (1 - eta) * e_opt. eta = 0 reproduces the image, 1 is "
                   "the target text; the paper uses 0.6-0.8 on Imagen, SD needs about 0.9-1.2, so eta may exceed 1 "
                   "(core ConditioningAverage stops at 1). The pooled output, if any, is mixed the same way.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "target": ("CONDITIONING", {"tooltip": "e_tgt: the encoded target text."}),
            "optimized": ("CONDITIONING", {"tooltip": "e_opt from Imagic: Optimize Text Embedding (only its first "
                                                   "entry is used)."}),
            "eta": ("FLOAT", {"default": 0.9, "min": -1.0, "max": 3.0, "step": 0.01,
                              "tooltip": "Edit strength eta (SD: ~0.9-1.2)."}),
        }}

    def run(self, target, optimized, eta):
        return (interpolate_conditioning(target, optimized, float(eta)),)


def interpolate_conditioning(target, optimized, eta: float):
    """CONDITIONING with eq. 3 applied entry by entry (options copied from the target)."""
    for name, c in (("target", target), ("optimized", optimized)):
        if not isinstance(c, list) or not c:
            raise NodeInputError(name, "expected a CONDITIONING", "connect a CONDITIONING")
    e_opt = optimized[0][0]
    out = []
    for cond, opts in target:
        if cond.shape[-1] != e_opt.shape[-1] or cond.shape[-2] != e_opt.shape[-2]:
            raise NodeInputError("optimized", f"shape {tuple(e_opt.shape)} does not match the target's "
                                              f"{tuple(cond.shape)}", "use e_opt optimised from this target")
        new = dict(opts)
        p_t, p_o = opts.get("pooled_output"), optimized[0][1].get("pooled_output")
        if p_t is not None and p_o is not None and p_t.shape == p_o.shape:
            new["pooled_output"] = interpolate(p_t, p_o, eta)
        out.append([interpolate(cond, e_opt.to(cond), eta), new])
    return out


def parse_etas(text: str) -> list[float]:
    return parse_numbers(text, "etas", example="0.7, 0.8, 0.9, 1.0")


class EtaSweep:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_EtaSweep", "Imagic: Eta Sweep", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latents",)
    OUTPUT_TOOLTIPS = ("One latent per eta (same seed and noise), in the order given; decode with VAE Decode.",)
    DESCRIPTION = ("Samples the fine-tuned model once per eta with the same seed and noise, so the edit strength "
                   "can be picked by eye (the paper's users choose eta per image). Uses ComfyUI's samplers; "
                   "DDIM is the paper's choice.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The fine-tuned MODEL."}),
            "target": ("CONDITIONING", {"tooltip": "e_tgt."}),
            "optimized": ("CONDITIONING", {"tooltip": "e_opt."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative / unconditional text (usually empty)."}),
            "latent_image": ("LATENT", {"tooltip": "Size of the output (e.g. Empty Latent Image 512x512); only "
                                                   "the first latent of a batch is used."}),
            "etas": ("STRING", {"default": "0.7, 0.8, 0.9, 1.0, 1.1", "tooltip": "Comma-separated eta values."}),
            "seed": ("INT", {**SEED, "tooltip": "One seed for every eta."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "Sampling steps."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (SD ports: 7.5)."}),
            "sampler_name": (bridge.sampler_names(), {"default": "ddim", "tooltip": "ComfyUI sampler."}),
            "scheduler": (bridge.scheduler_names(), {"default": "ddim_uniform", "tooltip": "ComfyUI scheduler."}),
        }}

    def run(self, model, target, optimized, negative, latent_image, etas, seed, steps, cfg, sampler_name,
            scheduler):
        values = parse_etas(etas)
        check_positive(steps, "steps")
        if not isinstance(latent_image, dict) or "samples" not in latent_image:
            raise NodeInputError("latent_image", "expected a LATENT", "connect Empty Latent Image")
        first = {"samples": latent_image["samples"][:1]}
        noise = bridge.prepare_noise(first["samples"], int(seed))
        progress = bridge.Progress(len(values) * int(steps))
        outs = []
        for k, eta in enumerate(values):
            def callback(step, x0, x, total, k=k):
                progress(k * int(steps) + step + 1, len(values) * int(steps))

            positive = interpolate_conditioning(target, optimized, eta)
            outs.append(bridge.ksample(model, positive, negative, first, int(seed), int(steps), float(cfg),
                                       sampler_name, scheduler, noise=noise, callback=callback))
        return ({"samples": torch.cat(outs)},)


# --------------------------------------------------------------------------------------
class SaveTrained:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_SaveTrained", "Save Trained (LoRA / delta + embedding)", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    DESCRIPTION = ("Saves a fine-tuning result to models/single_image_edit/trained as .safetensors (atomic write, "
                   "never overwriting): the weight delta in ComfyUI's LoRA layout (so the native Load LoRA nodes "
                   "read it; the folder is registered with them) and the embedding e_opt it was tuned at. "
                   "precision fp16 stores the delta in half the space (a full SD 1.5 fine-tune: 1.7 GB instead of "
                   "3.4 GB).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "trained": (TRAINED, {"tooltip": "From Imagic: Fine-Tune Model."}),
            "filename_prefix": ("STRING", {"default": "imagic", "tooltip": "File name prefix (may contain sub-"
                                                                           "folders); a counter is appended."}),
        }, "optional": {
            "precision": (["fp32", "fp16"], {"default": "fp32", "tooltip": "How the weight delta is stored. fp32: "
                          "as trained. fp16: half the file (a full fine-tune of SD 1.5: 1.7 GB, not 3.4 GB); each "
                          "entry keeps 11 significant bits, finer than the fp16 weights ComfyUI usually samples "
                          "with. e_opt stays fp32."}),
        }}

    def run(self, trained, filename_prefix, precision="fp32"):
        if not isinstance(trained, Trained):
            raise NodeInputError("trained", f"this is not an Imagic fine-tune ({type(trained).__name__})",
                                 "save a SINE fine-tune with SINE: Save Fine-Tuned Model")
        if precision not in ("fp32", "fp16"):
            raise NodeInputError("precision", f"unknown precision {precision!r}", "use fp32 or fp16")

        def write(path):
            try:
                return save_trained(trained, path, precision)
            except ValueError as e:  # a delta beyond fp16's range: nothing was written
                raise NodeInputError("precision", str(e), "save in fp32") from None

        return save_output(bridge.save_dir("sie_trained"), filename_prefix, write, "trained delta")


class LoadTrained:
    NODE_ID, DISPLAY_NAME, REQUIRES = "SIE_LoadTrained", "Load Trained (LoRA / delta + embedding)", ()
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "e_opt")
    OUTPUT_TOOLTIPS = ("A clone of the MODEL with the saved delta applied.", "The saved embedding e_opt.")
    DESCRIPTION = ("Loads a file written by Save Trained: applies its delta to the MODEL (as ComfyUI's Load LoRA "
                   "would) and returns its embedding as CONDITIONING, so an edit can be resampled without training.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SD 1.x MODEL the delta was trained on."}),
            "trained_name": (bridge.list_models("sie_trained"), {"tooltip": "A file from Save Trained."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scale of the delta (1 = as trained)."}),
        }}

    def run(self, model, trained_name, strength):
        check_model(model)
        try:
            trained = load_trained(bridge.model_path("sie_trained", trained_name))
        except (FileNotFoundError, ArtifactError) as e:
            raise NodeInputError("trained_name", str(e), "pick a file written by Save Trained (plain LoRAs load "
                                 "with ComfyUI's LoraLoaderModelOnly)") from None
        if trained.embedding is None:
            raise NodeInputError("trained_name", "the file holds no embedding",
                                 "load plain LoRAs with ComfyUI's LoraLoaderModelOnly")
        return (bridge.apply_delta(model, trained.delta, float(strength)), [[trained.embedding.clone(), {}]])


NODES = [OptimizeEmbedding, FineTune, InterpolateConditioning, EtaSweep, SaveTrained, LoadTrained]
