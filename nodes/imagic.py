"""Imagic nodes: interpolate the conditioning, sweep eta, save and load the fine-tune.

Imagic's two training stages run in the shared training nodes (:mod:`nodes.training`: Optimize Text
Embedding, Fine-Tune Model), which run Imagic's recipe (:mod:`core.imagic.recipe`) when no recipe is
connected.  Each stage is an atomic node on native types (MODEL, VAE, IMAGE, CONDITIONING), so the
stages compose with the rest of ComfyUI: sampling is ComfyUI's own KSampler (or
SamplerCustomAdvanced) on the fine-tuned MODEL with the interpolated CONDITIONING.
"""

from __future__ import annotations

import logging

import torch

from comfy_api.latest import io

from ..core.artifact_io import ArtifactError
from ..core.imagic import interpolate
from ..core.imagic.artifact import Trained, load_trained, save_trained
from ..core.imagic.recipe import ImagicRecipe
from . import comfy_bridge as bridge
from .common import CATEGORY_ROOT, NodeInputError, check_positive, parse_numbers, save_output
from .training import SEED, TRAINED, check_model, register_default_recipe, to_conditioning

log = logging.getLogger("comfyui-single-image-edit")

CATEGORY = f"{CATEGORY_ROOT}/imagic"


register_default_recipe(ImagicRecipe)  # the shared training nodes run Imagic when no recipe is connected


# --------------------------------------------------------------------------------------
class InterpolateConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_InterpolateConditioning", display_name="Imagic: Interpolate Conditioning",
            category=CATEGORY,
            description="Imagic stage 3 (eq. 3): e = eta * e_tgt + (1 - eta) * e_opt. eta = 0 reproduces the "
                        "image, 1 is the target text; the paper uses 0.6-0.8 on Imagen, SD needs about 0.9-1.2, "
                        "so eta may exceed 1 (core ConditioningAverage stops at 1). The pooled output, if any, "
                        "is mixed the same way.",
            inputs=[
                io.Conditioning.Input("target", tooltip="e_tgt: the encoded target text."),
                io.Conditioning.Input("optimized",
                                      tooltip="e_opt from Imagic: Optimize Text Embedding (only its first entry "
                                              "is used)."),
                io.Float.Input("eta", default=0.9, min=-1.0, max=3.0, step=0.01,
                               tooltip="Edit strength eta (SD: ~0.9-1.2)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="eta * target + (1 - eta) * optimized."),
            ],
        )

    @classmethod
    def execute(cls, target, optimized, eta):
        return io.NodeOutput(interpolate_conditioning(target, optimized, float(eta)))


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


class EtaSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_EtaSweep", display_name="Imagic: Eta Sweep", category=CATEGORY,
            description="Samples the fine-tuned model once per eta with the same seed and noise, so the edit "
                        "strength can be picked by eye (the paper's users choose eta per image). Uses ComfyUI's "
                        "samplers; DDIM is the paper's choice.",
            inputs=[
                io.Model.Input("model", tooltip="The fine-tuned MODEL."),
                io.Conditioning.Input("target", tooltip="e_tgt."),
                io.Conditioning.Input("optimized", tooltip="e_opt."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional text (usually empty)."),
                io.Latent.Input("latent_image",
                                tooltip="Size of the output (e.g. Empty Latent Image 512x512); only the first "
                                        "latent of a batch is used."),
                io.String.Input("etas", default="0.7, 0.8, 0.9, 1.0, 1.1", tooltip="Comma-separated eta values."),
                io.Int.Input("seed", **SEED, tooltip="One seed for every eta."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (SD ports: 7.5)."),
                io.Combo.Input("sampler_name", options=bridge.sampler_names(), default="ddim",
                               tooltip="ComfyUI sampler."),
                io.Combo.Input("scheduler", options=bridge.scheduler_names(), default="ddim_uniform",
                               tooltip="ComfyUI scheduler."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents",
                                 tooltip="One latent per eta (same seed and noise), in the order given; decode "
                                         "with VAE Decode."),
            ],
        )

    @classmethod
    def execute(cls, model, target, optimized, negative, latent_image, etas, seed, steps, cfg, sampler_name,
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
        return io.NodeOutput({"samples": torch.cat(outs)})


# --------------------------------------------------------------------------------------
class SaveTrained(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SaveTrained", display_name="Save Trained (LoRA / delta + embedding)", category=CATEGORY,
            description="Saves a fine-tuning result to models/single_image_edit/trained as .safetensors (atomic "
                        "write, never overwriting): the weight delta in ComfyUI's LoRA layout (so the native "
                        "Load LoRA nodes read it; the folder is registered with them) and the embedding e_opt it "
                        "was tuned at. precision fp16 stores the delta in half the space (a full SD 1.5 "
                        "fine-tune: 1.7 GB instead of 3.4 GB).",
            inputs=[
                io.Custom(TRAINED).Input("trained", tooltip="From Imagic: Fine-Tune Model."),
                io.String.Input("filename_prefix", default="imagic",
                                tooltip="File name prefix (may contain sub-folders); a counter is appended."),
                io.Combo.Input("precision", options=["fp32", "fp16"], optional=True, default="fp32",
                               tooltip="How the weight delta is stored. fp32: as trained. fp16: half the file (a "
                                       "full fine-tune of SD 1.5: 1.7 GB, not 3.4 GB); each entry keeps 11 "
                                       "significant bits, finer than the fp16 weights ComfyUI usually samples "
                                       "with. e_opt stays fp32."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trained, filename_prefix, precision="fp32"):
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


class LoadTrained(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_LoadTrained", display_name="Load Trained (LoRA / delta + embedding)", category=CATEGORY,
            description="Loads a file written by Save Trained: applies its delta to the MODEL (as ComfyUI's Load "
                        "LoRA would) and returns its embedding as CONDITIONING, so an edit can be resampled "
                        "without training.",
            inputs=[
                io.Model.Input("model", tooltip="The SD 1.x or SDXL MODEL the delta was trained on."),
                io.Combo.Input("trained_name", options=bridge.list_models("sie_trained"),
                               tooltip="A file from Save Trained."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the delta (1 = as trained)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the MODEL with the saved delta applied."),
                io.Conditioning.Output(display_name="e_opt", tooltip="The saved embedding e_opt."),
            ],
        )

    @classmethod
    def execute(cls, model, trained_name, strength):
        check_model(model)
        try:
            trained = load_trained(bridge.model_path("sie_trained", trained_name))
        except (FileNotFoundError, ArtifactError) as e:
            raise NodeInputError("trained_name", str(e), "pick a file written by Save Trained (plain LoRAs load "
                                 "with ComfyUI's LoraLoaderModelOnly)") from None
        if trained.embedding is None:
            raise NodeInputError("trained_name", "the file holds no embedding",
                                 "load plain LoRAs with ComfyUI's LoraLoaderModelOnly")
        return io.NodeOutput(bridge.apply_delta(model, trained.delta, float(strength)),
                             to_conditioning(trained.embedding, model))


NODES = [InterpolateConditioning, EtaSweep, SaveTrained, LoadTrained]
