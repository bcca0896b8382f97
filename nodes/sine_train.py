"""SINE's fine-tune recipe node and the SINE model file (save / load).

* ``SIE_SineRecipe`` builds a :class:`core.sine.recipe.SineRecipe`; connected to the ``recipe`` input of
  the shared fine-tune node (``SIE_FineTune``, :mod:`nodes.training`), it turns that node into SINE's
  fine-tuner (:func:`core.sine.finetune_sine`): whole image (paper: 800 steps) or patches with F(v)
  (paper: 10,000 steps), optionally the text encoder too (the official code), which makes the
  node's ``clip`` output the adapted CLIP.
* ``SIE_SaveSine`` writes the result as a ``sie.sine`` file (delta in ComfyUI's LoRA layout, UNet
  and text encoder; the fine-tune prompt; the conditioning c^ training used; whether the model
  needs the positional map).
* ``SIE_LoadSine`` applies such a file to a MODEL and CLIP, adds F(v) when the file says so (a
  patch-trained model can then never be sampled without its map) and returns c^ as training used
  it: the stored conditioning, or, when the text encoder was trained, the stored prompt through
  the loaded CLIP (the text training encoded at every step).
"""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..core.artifact_io import ArtifactError
from ..core.recipes import FineTuneOutcome
from ..core.sine import SineFineTuneResult, load_sine, save_sine
from ..core.sine.positional import PositionalMap
from ..core.sine.recipe import SineRecipe, SineTrained
from . import comfy_bridge as bridge
from .common import CATEGORY_ROOT, NodeInputError, save_output
from .training import apply_outcome, check_clip, check_model, to_conditioning

log = logging.getLogger("comfyui-single-image-edit")

CATEGORY = f"{CATEGORY_ROOT}/sine"
RECIPE = "SIE_RECIPE"
FOLDER = "sie_sine"


class SineRecipeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SineRecipe", display_name="SINE: Fine-Tune Recipe", category=CATEGORY,
            description="SINE (Zhang et al., CVPR 2023) fine-tuning settings for the shared Fine-Tune Model "
                        "node. Paper: AdamW lr 1e-6 on the full UNet, batch 1, 800 steps on the whole image or "
                        "10,000 on patches. Patches: random crops of the image resized to 1024x1024 (sides "
                        "10-100%, resized to 512), each with its positional map F(v); sample the result only "
                        "through SINE: Positional Map (Save SINE records it). The official code also trains the "
                        "text encoder and, with patches, adds a pooled x0 L1 term (weight 1.0); both are off "
                        "here by default (the paper does not describe them).",
            inputs=[
                io.String.Input("prompt", default="a photo of a sks dog",
                                tooltip="The fine-tune prompt c^ ('a photo / painting of a sks <class>'). Encoded "
                                        "each step when the text encoder is trained (the fine-tune node's "
                                        "conditioning is then not used); otherwise training uses the fine-tune "
                                        "node's conditioning, which Save SINE records as c^."),
                io.Boolean.Input("patches", default=False,
                                 tooltip="Patch-based fine-tuning with F(v) (paper Sec. 3.3; 10,000 steps): edits "
                                         "at any resolution and aspect ratio."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also train CLIP's text encoder (the official code; the paper does not "
                                         "say). Needs the fine-tune node's clip input; its clip output is then "
                                         "the adapted CLIP."),
                io.Float.Input("pooled_x0_weight", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of (t/T)^2 L1(avgpool(x0^), avgpool(z0)) (official patch config: "
                                       "1.0; the paper: 0)."),
                io.Float.Input("whole_fraction", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="With patches: share of steps on the whole image (official code: 0; its "
                                       "diffusers port: 0.1)."),
                io.Float.Input("text_learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-8,
                               tooltip="Text encoder learning rate. 0: the UNet's when text_encoder_mode equals "
                                       "the fine-tune node's mode (one rate, as the official code), else 1e-6 for "
                                       "full (the official rate) and 1e-4 for lora."),
                io.Combo.Input("text_encoder_mode", options=["full", "lora"], optional=True, default="full",
                               tooltip="With train_text_encoder: full trains every parameter of the text model, "
                                       "the token embedding (the rare token's row) included, as the official code "
                                       "(AdamW, lr 1e-6); lora puts adapters on its layers (our cheaper option)."),
            ],
            outputs=[
                io.Custom(RECIPE).Output(display_name="recipe",
                                         tooltip="Connect to the 'recipe' input of Fine-Tune Model: it then "
                                                 "fine-tunes the SINE way."),
            ],
        )

    @classmethod
    def execute(cls, prompt, patches, train_text_encoder, pooled_x0_weight, whole_fraction, text_learning_rate,
                text_encoder_mode="full"):
        if not str(prompt).strip():
            raise NodeInputError("prompt", "the fine-tune prompt is empty", "write e.g. 'a photo of a sks dog'")
        if text_encoder_mode not in ("full", "lora"):
            raise NodeInputError("text_encoder_mode", f"unknown mode {text_encoder_mode!r}", "use full or lora")
        return io.NodeOutput(SineRecipe(str(prompt), bool(patches), float(whole_fraction), float(pooled_x0_weight),
                                        bool(train_text_encoder), float(text_learning_rate),
                                        text_mode=str(text_encoder_mode)))


# --------------------------------------------------------------------------------------
def apply_sine(model, clip, result: SineFineTuneResult, strength: float = 1.0):
    """(MODEL, CLIP) with the SINE delta applied (text delta on the CLIP when there is one) and,
    for a patch-trained model, F(v) on the MODEL (what Fine-Tune Model's outputs carry)."""
    if result.text_delta and clip is None:
        raise NodeInputError("clip", "this SINE model also trained the text encoder", "connect the CLIP")
    input_map = PositionalMap(result.channels, mode="bilinear") if result.positional else None
    return apply_outcome(model, clip, FineTuneOutcome(result.file_delta, [], 0.0, "", None,
                                                      bool(result.text_delta), input_map), strength)


FAMILY_BY_WIDTH = {768: "SD 1.x", 2048: "SDXL"}  # the text conditioning's width


def check_family(result: SineFineTuneResult, model) -> None:
    """A file's recorded c^ must fit the MODEL (an SD 1.x file on an SDXL MODEL, or the reverse, named here
    rather than failing inside ComfyUI's sampling or loading the LoRA keys that fit and dropping the rest)."""
    if result.c_hat is None:
        return
    width = bridge.context_dim(model)
    got = int(result.c_hat.shape[-1])
    if got != width:
        def family(w):
            return f"an {FAMILY_BY_WIDTH[w]} model" if w in FAMILY_BY_WIDTH else "another model"

        raise NodeInputError("sine_name", f"this file was fine-tuned on {family(got)} (its c^ is {got} wide) and the "
                                          f"MODEL is {family(width)} ({width} wide)",
                             "load it onto the checkpoint it was fine-tuned from")


class SaveSine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SaveSine", display_name="SINE: Save Fine-Tuned Model", category=CATEGORY,
            description="Saves a SINE fine-tune to models/single_image_edit/sine as .safetensors (atomic, never "
                        "overwriting): the UNet (and text-encoder) delta in ComfyUI's LoRA layout, the fine-tune "
                        "prompt, and whether the model was trained on patches (then SINE: Load Fine-Tuned Model "
                        "adds F(v)).",
            inputs=[
                io.Custom("SIE_TRAINED").Input("trained",
                                               tooltip="The trained output of Fine-Tune Model run with a SINE "
                                                       "recipe."),
                io.String.Input("filename_prefix", default="sine",
                                tooltip="File name prefix (may contain sub-folders); a counter is appended."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, trained, filename_prefix):
        if not isinstance(trained, SineTrained):
            raise NodeInputError("trained", "this is not a SINE fine-tune (no SINE recipe was connected)",
                                 "save Imagic results with Save Trained")
        return save_output(bridge.save_dir(FOLDER), filename_prefix,
                           lambda path: save_sine(trained.result, trained.prompt, path), "SINE model")


class LoadSine(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_LoadSine", display_name="SINE: Load Fine-Tuned Model", category=CATEGORY,
            description="Loads a file written by SINE: Save Fine-Tuned Model onto the same SD 1.x or SDXL MODEL "
                        "and CLIP, so an edit can be resampled without training. The positional map is applied when "
                        "the file says the model was trained on patches.",
            inputs=[
                io.Model.Input("model",
                               tooltip="The pretrained SD 1.x or SDXL MODEL the file was trained on (not modified)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (not modified)."),
                io.Combo.Input("sine_name", options=bridge.list_models(FOLDER),
                               tooltip="A file from SINE: Save Fine-Tuned Model."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the delta (1 = as trained)."),
            ],
            outputs=[
                io.Model.Output(display_name="finetuned_model",
                                tooltip="A clone of the MODEL with the saved delta (and F(v) when it was trained "
                                        "on patches)."),
                io.Clip.Output(display_name="finetuned_clip",
                               tooltip="The CLIP with the saved text-encoder delta (the input CLIP when none was "
                                       "trained)."),
                io.Conditioning.Output(display_name="finetune_positive",
                                       tooltip="c^ exactly as training used it: the stored conditioning, or, when "
                                               "the text encoder was trained, the saved prompt through "
                                               "finetuned_clip. finetune_positive of Model-Based Guidance."),
                io.String.Output(display_name="prompt",
                                 tooltip="The saved fine-tune prompt (a label when the text encoder was not "
                                         "trained)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, sine_name, strength):
        check_model(model)
        check_clip(clip)
        try:
            result, prompt = load_sine(bridge.model_path(FOLDER, sine_name))
        except (FileNotFoundError, ArtifactError) as e:
            raise NodeInputError("sine_name", str(e), "pick a file written by SINE: Save Fine-Tuned Model") from None
        check_family(result, model)
        m, c = apply_sine(model, clip, result, float(strength))
        if result.c_hat is not None and not result.text_delta:  # the conditioning training used, as recorded
            cond = to_conditioning(result.c_hat, model)
        else:  # the prompt, through the trained text encoder (what training encoded at every step)
            if result.c_hat is None:
                log.warning("%s records no c^ (written before c^ was saved): re-encoding its prompt %r", sine_name,
                            prompt)
            cond = c.encode_from_tokens_scheduled(c.tokenize(prompt))
        return io.NodeOutput(m, c, cond, prompt)


NODES = [SineRecipeNode, SaveSine, LoadSine]
