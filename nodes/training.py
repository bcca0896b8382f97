"""The shared training nodes: Optimize Text Embedding and Fine-Tune Model, for every method with a recipe.

Each node checks its ComfyUI inputs, builds a :class:`core.recipes.StageRequest` and runs the connected
recipe's stage (:mod:`core.recipes`; the recipes live in their methods' packages).  With no recipe
connected, the default a method's node module registered for the inputs that are connected runs
(:func:`register_default_recipe`: LayerDiffusion's for ``conditioning_b`` / ``mask``), else Imagic's.
The outcome becomes ComfyUI types: CONDITIONING, a patched clone of the MODEL (and of the CLIP when the
text encoder was trained), the loss curve.  Training runs on clones under
``torch.inference_mode(False)``, reports the loss on the progress bar, stops on cancel (keeping its steps
in a checkpoint) and never modifies its inputs; the appended checkpoint_every / resume_from / preview_every
inputs go to the recipe as a plan and previews (:mod:`nodes.resume`).  No method's node module is imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import torch

from comfy_api.latest import io

from ..core.images import pil_to_tensor
from ..core.plot import loss_curve
from ..core.recipes import FineTuneOutcome, Recipe, RecipeInputError, StageRequest, check_unused
from ..core.resources import SD15_UNET_PARAMS, ResourceError, check_fits, describe_parts, imagic_bytes, imagic_parts
from ..core.seam import pack_cond, unpack_cond
from . import comfy_bridge as bridge
from . import resume
from .common import CATEGORY_ROOT, NodeInputError, bchw_to_image, check_positive, image_to_bchw
from .comfy_views import FixedInputMap, text_keys

log = logging.getLogger("comfyui-single-image-edit")

CATEGORY = f"{CATEGORY_ROOT}/imagic"  # where these nodes have always been listed
TRAINED = "SIE_TRAINED"
SEED = {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}
DEFAULT_LR = {"lora": 1e-4, "full": 2e-6}  # Imagic's (the default recipe's), shown in the tooltip
MODES = ("lora", "full")


# --------------------------------------------------------------------------------------
# Which recipe runs
# --------------------------------------------------------------------------------------
_DEFAULTS: list[tuple[dict[str, frozenset[str]], Callable[[], Recipe]]] = []


def register_default_recipe(factory: Callable[[], Recipe], when: Mapping[str, Iterable[str]] | None = None) -> None:
    """``factory()`` is the recipe when none is connected and, for the stage, one of the inputs ``when[stage]``
    is (``when`` None: when no other default applies; Imagic registers so)."""
    _DEFAULTS.append(({k: frozenset(v) for k, v in when.items()} if when is not None else None, factory))


def recipe_for(recipe, stage: str, connected: Mapping[str, object]) -> Recipe:
    """The connected recipe (checked), or the registered default for the inputs that are connected."""
    if recipe is not None:
        if not isinstance(recipe, Recipe):
            raise NodeInputError("recipe", f"expected a method's recipe, got {type(recipe).__name__}",
                                 "connect SINE: Fine-Tune Recipe or LayerDiffusion: Recipe (or leave it empty for "
                                 "Imagic)")
        return recipe
    given = {name for name, value in connected.items() if value is not None}
    for when, factory in _DEFAULTS:
        if when is not None and given & when.get(stage, frozenset()):
            return factory()
    for when, factory in _DEFAULTS:
        if when is None:
            return factory()
    raise NodeInputError("recipe", "no recipe is connected and no method registered a default",
                         "connect a method's recipe")


def input_error(e: RecipeInputError) -> NodeInputError:
    return NodeInputError(e.name, e.problem, e.fix)


def preflight(recipe: Recipe, stage: str, optional: Mapping[str, object], **passed) -> None:
    """Before any work: refuse a connected optional input the stage does not read, and an input it needs and
    lacks (``passed``: inputs every recipe may read, such as the CLIP, which are never refused as unused)."""
    try:
        check_unused(recipe, stage, optional)
        recipe.check(stage, {**optional, **passed})
    except RecipeInputError as e:
        raise input_error(e) from None


# --------------------------------------------------------------------------------------
# Input checks shared by the training nodes (and the rectifier's)
# --------------------------------------------------------------------------------------
def check_model(model, name: str = "model") -> None:
    problem = bridge.sd_problem(model)
    if problem:
        raise NodeInputError(name, f"this is {problem}; these nodes need a {bridge.SUPPORTED_FAMILIES} MODEL",
                             "load an SD 1.x or SDXL checkpoint (e.g. v1-5-pruned-emaonly.safetensors, "
                             "sd_xl_base_1.0.safetensors)")


SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def cond_tensor(conditioning, model, name: str = "conditioning") -> tuple[torch.Tensor, dict]:
    """(cond [1, 77, D] float32 clone, its options dict) from a CONDITIONING, checked against the MODEL.

    SDXL: the context and the entry's ``pooled_output`` packed into one [1, 78, 2048] tensor
    (:func:`core.seam.pack_cond`), which the methods optimise and interpolate as one embedding."""
    if not isinstance(conditioning, list) or not conditioning or not isinstance(conditioning[0], (list, tuple)):
        raise NodeInputError(name, "expected a CONDITIONING (from CLIP Text Encode)", "connect a CONDITIONING")
    cond, opts = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        raise NodeInputError(name, f"expected a [1, tokens, width] tensor, got {getattr(cond, 'shape', cond)}")
    sd = bridge.ComfySD(model)
    width = sd.context_dim
    if cond.shape[-1] != width:
        raise NodeInputError(name, f"the text encoding is {cond.shape[-1]} wide but the model expects {width}",
                             "encode the prompt with the CLIP of the same checkpoint as the MODEL")
    if len(conditioning) > 1:
        log.warning("%s: %d conditioning entries; only the first is optimised", name, len(conditioning))
    cond = cond[:1].detach().clone().float()
    if sd.pooled_dim:
        pooled = (opts or {}).get("pooled_output")
        if not isinstance(pooled, torch.Tensor) or pooled.shape[-1] != sd.pooled_dim:
            raise NodeInputError(name, f"an SDXL MODEL needs the pooled text vector ({sd.pooled_dim} wide) with the "
                                       f"conditioning, and this one has {_describe_pooled(pooled)}",
                                 "encode the prompt with CLIP Text Encode and the SDXL checkpoint's CLIP")
        cond = pack_cond(cond, pooled.reshape(-1, sd.pooled_dim)[:1].detach().float().to(cond.device))
    return cond, dict(opts)


def _describe_pooled(pooled) -> str:
    return "none" if pooled is None else f"one of shape {tuple(getattr(pooled, 'shape', ()))}"


def to_conditioning(cond: torch.Tensor, model, options: Mapping | None = None) -> list:
    """A CONDITIONING of one entry from a seam ``cond`` (the inverse of :func:`cond_tensor`): SDXL's packed
    tensor back into the context and ``pooled_output``.  Size keys (width, height, crops, target) are
    dropped, so that ComfyUI's samplers give it the latent's own size, the size conditioning the pack
    trains with."""
    opts = {k: v for k, v in dict(options or {}).items() if k not in SIZE_KEYS}
    pooled_dim = bridge.ComfySD(model).pooled_dim
    context, pooled = unpack_cond(cond.cpu(), pooled_dim)
    if pooled is not None:
        opts["pooled_output"] = pooled.clone()
    return [[context.clone(), opts]]


def curve(losses: list[float], title: str) -> torch.Tensor:
    return bchw_to_image(pil_to_tensor(loss_curve(losses, title=title))[None])


def compute_itemsize(model) -> int:
    """Bytes per weight of the copies ComfyUI makes for a training step: its compute dtype's (the
    manual-cast dtype where the weights are stored in another one)."""
    try:
        dtype = getattr(model.model, "manual_cast_dtype", None) or next(model.model.diffusion_model.parameters()).dtype
        return torch.empty((), dtype=dtype).element_size()
    except (AttributeError, TypeError, StopIteration):
        return 4


def unet_param_count(model) -> int:
    """Parameters of the MODEL's UNet (SD 1.5's count where the MODEL does not expose them)."""
    try:
        return sum(p.numel() for p in model.model.diffusion_model.parameters())
    except (AttributeError, TypeError):
        return SD15_UNET_PARAMS


CHECKPOINTING = {"auto": None, "on": True, "off": False}
OPTIMIZER_STATES = ("32-bit", "8-bit")


def memory_inputs(optimizer_state: bool) -> list:
    """The appended ``gradient_checkpointing`` input (and, for a fine-tune, ``optimizer_state``)."""
    out = [io.Combo.Input("gradient_checkpointing", options=list(CHECKPOINTING), default="auto", optional=True,
                          tooltip="Recompute the UNet's activations during backward instead of keeping them: "
                                  "far less memory for them (the figure grows with the image), about a fifth to a "
                                  "third slower; the result is the same. auto: on for a GPU, off on the CPU.")]
    if optimizer_state:
        out.append(io.Combo.Input("optimizer_state", options=list(OPTIMIZER_STATES), default="32-bit", optional=True,
                                  tooltip="Adam's two moments per trained weight in 32 bits (the papers') or 8 "
                                          "bits (bitsandbytes, to be installed into ComfyUI's Python): 8-bit cuts "
                                          "a full SD 1.5 fine-tune's optimiser state from 6.9 to 1.7 GB; the "
                                          "update is then Adam's up to a blockwise quantisation. Little effect "
                                          "with lora (its moments are small)."))
    return out


def memory_choices(gradient_checkpointing: str, optimizer_state: str = "32-bit") -> tuple[bool | None, bool]:
    """(gradient checkpointing: None = auto, 8-bit moments) from the node's inputs, checked; 8-bit needs
    bitsandbytes, refused here (before any work) when it cannot be imported."""
    if gradient_checkpointing not in CHECKPOINTING:
        raise NodeInputError("gradient_checkpointing", f"unknown choice {gradient_checkpointing!r}",
                             "use auto, on or off")
    if optimizer_state not in OPTIMIZER_STATES:
        raise NodeInputError("optimizer_state", f"unknown choice {optimizer_state!r}", "use 32-bit or 8-bit")
    eight = optimizer_state == "8-bit"
    if eight:
        from ..core.fit import optimizer_library

        try:
            optimizer_library("adam8bit")
        except ImportError:
            raise NodeInputError("optimizer_state", "8-bit moments need bitsandbytes, which ComfyUI's Python cannot "
                                 "import", "install it (python -m pip install bitsandbytes, with ComfyUI's Python) "
                                 "and restart ComfyUI, or choose 32-bit") from None
    return CHECKPOINTING[gradient_checkpointing], eight


def check_memory(model, image, mode: str, device, gradient_checkpointing: bool, rank: int = 8,
                 free: int | None = None, optimizer: str = "adam") -> None:
    """Refuse an Imagic stage (``mode``: embedding, lora or full) that cannot fit in ``device``'s
    free memory (:mod:`core.resources`), naming the input to change: ``mode`` when a full
    fine-tune would fit as LoRA, else ``image``."""
    x = image_to_bchw(image, "image", min_side=8)
    h, w = x.shape[-2:]
    latent = (h // 8, w // 8)
    params = unet_param_count(model)
    try:
        family = bridge.model_family(model)
    except AttributeError:  # not a MODEL with a UNet config: SD 1.x's figures
        family = "sd1"
    copies = compute_itemsize(model)
    parts = imagic_parts(latent, mode, params, rank, gradient_checkpointing, optimizer, family, copies)
    stage = "the embedding optimisation" if mode == "embedding" else f"the {mode} fine-tune"
    try:
        check_fits(sum(parts.values()), device, f"{stage} of a {w}x{h} image ({describe_parts(parts)} GiB)", "",
                   free)
    except ResourceError as e:
        lora = imagic_bytes(latent, "lora", params, rank, gradient_checkpointing, family=family,
                            weight_copy_itemsize=copies)
        if mode == "full" and lora <= e.free:
            raise NodeInputError("mode", e.problem, f"use mode lora (about {lora / 2**30:.1f} GiB here), or a "
                                                    "device with more memory") from None
        native = "SDXL is trained at 1024x1024" if family == "sdxl" else "SD 1.x is trained at 512x512"
        fix = f"use a smaller image ({native})"
        if not gradient_checkpointing:
            fix += ", or turn gradient_checkpointing on"
        raise NodeInputError("image", e.problem, fix + ("" if mode == "embedding" else
                                                        ", or mode lora with a lower rank")) from None


def check_clip(clip, name: str = "clip"):
    """A connected CLIP must carry SD's clip_l text encoder (SD 1.x's, trainable, or SDXL's first); None stays
    None."""
    if clip is None:
        return None
    if not hasattr(clip, "cond_stage_model") or not hasattr(clip, "clone"):
        raise NodeInputError(name, f"expected a CLIP, got {type(clip).__name__}", "connect the checkpoint's CLIP")
    if not text_keys(clip):
        raise NodeInputError(name, "this is not an SD 1.x or SDXL CLIP (no clip_l text encoder)",
                             "connect the CLIP of the checkpoint the MODEL comes from")
    return clip


def steps_for(steps, recipe: Recipe, stage: str) -> int:
    """Fine-Tune Model's steps: as set, or 0 = the recipe's default (the papers' counts: Imagic's SD ports
    1,000; SINE 800 on the whole image, 10,000 with patches; LayerDiffusion 250)."""
    if int(steps) < 0:
        raise NodeInputError("steps", f"must be 0 (the recipe's default) or more, got {steps}",
                             "set steps to 0, or to the number of steps to train")
    return int(steps) if int(steps) > 0 else int(recipe.default_steps(stage))


def apply_outcome(model, clip, outcome: FineTuneOutcome, strength: float = 1.0):
    """(MODEL, CLIP): clones with the trained delta as ComfyUI weight patches (ComfyUI's own LoRA loading;
    the text-encoder part on the CLIP when the text encoder was trained, else the CLIP as given) and the
    outcome's input map (SINE's F(v)) on the MODEL."""
    if outcome.text_trained and clip is None:
        raise NodeInputError("clip", "this fine-tune also trained the text encoder", "connect the CLIP")
    m, c = bridge.apply_delta_with_clip(model, clip if outcome.text_trained else None, outcome.delta, strength)
    if outcome.input_map is not None:
        m = m.clone() if m is model else m
        m.set_model_input_block_patch(FixedInputMap(outcome.input_map))
    return m, (c if outcome.text_trained else clip)


def stage_extra(model, **inputs) -> tuple[dict, dict]:
    """The optional inputs as a recipe reads them (CONDITIONING as [1, 77, D] tensors, IMAGE as [1, 3, H, W],
    MASK as given), and each CONDITIONING's options dict."""
    extra, options = {}, {}
    for name, value in inputs.items():
        if value is None:
            continue
        if name.startswith("conditioning"):
            extra[name], options[name] = cond_tensor(value, model, name)
        elif name.endswith("image"):
            extra[name] = image_to_bchw(value, name, min_side=8)[:1]
        else:
            extra[name] = value
    return extra, options


# --------------------------------------------------------------------------------------
class OptimizeEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_OptimizeEmbedding", display_name="Optimize Text Embedding", category=CATEGORY,
            description="One optimiser node for the pack's methods, the model frozen. Imagic stage 1 (Kawar et "
                        "al., CVPR 2023): optimises the target text's embedding so that it reconstructs the "
                        "image (eq. 2); SD ports: 500 steps at lr 0.001 (the paper: 100 steps on Imagen). With "
                        "conditioning_b and mask, LayerDiffusion stage 1 (eq. 2 of Li et al. 2023): the object "
                        "text's e_a and the background text's e_b optimised jointly under the image's object "
                        "mask (paper: Adam lr 1e-3, 500 steps).",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x or SDXL MODEL (frozen here)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint; encodes the image once."),
                io.Image.Input("image",
                               tooltip="The image to edit; only the first image of a batch is used (SD 1.x works "
                                       "best at 512x512, SDXL at 1024x1024). On SDXL the size conditioning is "
                                       "the image's own: size = target = (height, width), crop (0, 0), what "
                                       "KSampler gives the output CONDITIONING (its size keys are dropped)."),
                io.Conditioning.Input("conditioning",
                                      tooltip="The target text, encoded (CLIP Text Encode): e_tgt. Only the first "
                                              "conditioning entry is used."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Adam steps (SD ports: 500)."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               tooltip="Adam learning rate (paper and ports: 0.001)."),
                io.Int.Input("seed", **SEED, tooltip="Seed of the timesteps and noise drawn at each step."),
                io.Conditioning.Input("conditioning_b", optional=True,
                                      tooltip="LayerDiffusion: the background text T_b, encoded; conditioning is "
                                              "then the object text T_a."),
                io.Mask.Input("mask", optional=True,
                              tooltip="LayerDiffusion: the image's object mask M (e.g. Segment (SAM points / "
                                      "box)); same size as the image."),
                io.Custom("SIE_RECIPE").Input("recipe", optional=True,
                                              tooltip="LayerDiffusion: Recipe (how [e_a, e_b] enters the UNet, "
                                                      "the mask rule); empty: its defaults."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="LayerDiffusion, the recipe's separate_reference reading only: the "
                                       "reference (background) image e_b is trained on (same size as the image); "
                                       "other readings ignore it."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="LayerDiffusion, separate_reference reading only: the reference's object "
                                      "mask (all black for a pure background); e_b is trained outside it."),
                *resume.checkpoint_inputs(None, ["embedding"]),
                resume.preview_input(),
                *memory_inputs(False),
            ],
            outputs=[
                io.Conditioning.Output(display_name="e_opt / ê_a",
                                       tooltip="The optimised embedding (same layout as the input conditioning). "
                                               "Imagic (no conditioning_b): e_opt. LayerDiffusion (with "
                                               "conditioning_b and mask): ê_a, the optimised object embedding "
                                               "(for ConditioningAverage's conditioning_to and Iterative "
                                               "Guidance's object_positive)."),
                io.Image.Output(display_name="loss_curve", tooltip="The loss per step."),
                io.Conditioning.Output(display_name="ê_b",
                                       tooltip="LayerDiffusion: ê_b, the optimised background embedding (empty "
                                               "without conditioning_b)."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image, conditioning, steps, learning_rate, seed, conditioning_b=None, mask=None,
                recipe=None, reference_image=None, reference_mask=None, checkpoint_every=0,
                resume_from=resume.NONE, preview_every=0, gradient_checkpointing="auto"):
        check_model(model)
        check_positive(steps, "steps")
        checkpointing, _ = memory_choices(gradient_checkpointing)
        device = torch.device(bridge.torch_device())
        optional = {"conditioning_b": conditioning_b, "mask": mask, "reference_image": reference_image,
                    "reference_mask": reference_mask}
        recipe = recipe_for(recipe, "embedding", optional)
        preflight(recipe, "embedding", optional)
        x = image_to_bchw(image, "image", min_side=8)[:1]
        check_memory(model, torch.zeros(1, *recipe.trains_at(tuple(x.shape[-2:])), 3), "embedding", device,
                     device.type == "cuda" if checkpointing is None else checkpointing)
        progress = bridge.Progress(steps)
        run_plan = resume.plan(recipe.method, checkpoint_every, resume_from, progress)
        try:
            with torch.inference_mode(False), resume.resume_errors():  # ordinary tensors
                cond, opts = cond_tensor(conditioning, model)
                extra, options = stage_extra(model, **optional)
                sd = bridge.ComfySD(model, None, vae)
                request = StageRequest(sd, x, cond, int(steps), float(learning_rate), int(seed), device, extra=extra,
                                       on_step=progress, should_stop=progress.should_stop, checkpoints=run_plan,
                                       previews=resume.previews(preview_every, sd, progress),
                                       checkpointing=checkpointing)
                out = recipe.optimize_embedding(request)
        except RecipeInputError as e:
            raise input_error(e) from None
        finally:
            bridge.free_memory()
        log.info("%s: loss %.4f -> %.4f in %.1f s", out.title, out.losses[0], out.losses[-1], out.seconds)
        e_b = to_conditioning(out.e_b, model, options.get("conditioning_b")) if out.e_b is not None else []
        return io.NodeOutput(to_conditioning(out.e, model, opts), curve(out.losses, out.title), e_b)


class FineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_FineTune", display_name="Fine-Tune Model", category=CATEGORY,
            description="One fine-tune node for the pack's methods (Imagic, SINE, LayerDiffusion). Without a "
                        "recipe, Imagic stage 2: fine-tunes the model to reconstruct the image at the frozen "
                        "e_opt (eq. 2); SD ports: 1000 steps. With SINE: Fine-Tune Recipe, SINE's fine-tuning at "
                        "the fine-tune prompt (paper: 800 steps on the whole image, 10,000 on patches). lora "
                        "(default): low-rank adapters on every conv/linear weight, little memory, lr 1e-4. full: "
                        "the whole UNet (Imagic lr 2e-6, SINE 1e-6; about 14 GB of optimiser state for SD 1.5). "
                        "With LayerDiffusion: Recipe (or a mask), LayerDiffusion stage 2 at e_opt: lambda_1 "
                        "L_obj under the mask + lambda_2 L_bg under 1 - reference_mask (paper: lr 2e-6 full, 250 "
                        "steps). The output MODEL is a native patched clone: use it with KSampler or the pack's "
                        "guiders. steps 0 (the default) trains the recipe's step count; a number set on the node "
                        "is used as it is.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x or SDXL MODEL (not modified)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint."),
                io.Image.Input("image",
                               tooltip="The image to edit (the same as for the embedding); only the first image "
                                       "of a batch is used. On SDXL the size conditioning is the training "
                                       "size's own (size = target, crop (0, 0)), as KSampler computes it."),
                io.Conditioning.Input("conditioning",
                                      tooltip="e_opt from Imagic: Optimize Text Embedding (only its first entry "
                                              "is used)."),
                io.Combo.Input("mode", options=["lora", "full"], default="lora",
                               tooltip="lora: adapters (small, fast); full: every UNet weight (the paper's; large "
                                       "memory)."),
                io.Int.Input("steps", default=0, min=0, max=100000,
                             tooltip="Adam steps. 0 = the recipe's default: Imagic (no recipe) 1,000 (SD ports), "
                                     "SINE 800 on the whole image or 10,000 with patches, LayerDiffusion 250 (the "
                                     "papers)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-6, round=1e-8,
                               tooltip=f"0 = the mode's default ({DEFAULT_LR['lora']} for lora, "
                                       f"{DEFAULT_LR['full']} for full)."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank (lora mode); alpha = rank."),
                io.Int.Input("seed", **SEED, tooltip="Seed of the adapters' initialisation, timesteps and noise."),
                io.Custom("SIE_RECIPE").Input("recipe", optional=True,
                                              tooltip="A method's training recipe (SINE: Fine-Tune Recipe); "
                                                      "empty: Imagic. With SINE, conditioning is the encoded "
                                                      "fine-tune prompt."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The checkpoint's CLIP: needed when the recipe trains the text encoder; "
                                      "passed through to the clip output otherwise."),
                io.Mask.Input("mask", optional=True,
                              tooltip="LayerDiffusion: the object mask M_t of the image (same size)."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="LayerDiffusion: the reference (background) image O_r, the same size as "
                                       "the image."),
                io.Mask.Input("reference_mask", optional=True,
                              tooltip="LayerDiffusion: the reference's object mask M_r (all black for a pure "
                                      "background)."),
                io.Mask.Input("target_mask", optional=True,
                              tooltip="LayerDiffusion, with the recipe's object_mask 'target' (the paper's M_t): "
                                      "the object mask of the target image O_t that SD generates from the target "
                                      "text (same size as the image)."),
                *resume.checkpoint_inputs(None, ["finetune"]),
                resume.preview_input(),
                *memory_inputs(True),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="A clone of the input MODEL with the trained weights applied as patches "
                                        "(the input MODEL is unchanged); with a SINE patch recipe it also carries "
                                        "the positional map F(v)."),
                io.Image.Output(display_name="loss_curve", tooltip="The loss per step."),
                io.Custom(TRAINED).Output(display_name="trained",
                                          tooltip="The trained delta and e_opt (Imagic: Save Trained) or the SINE "
                                                  "fine-tune (SINE: Save)."),
                io.Clip.Output(display_name="clip",
                               tooltip="With a recipe that trains the text encoder: a clone of the CLIP with the "
                                       "trained text encoder (encode the fine-tune prompt with it); otherwise the "
                                       "clip input as given."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image, conditioning, mode, steps, learning_rate, rank, seed, recipe=None, clip=None,
                mask=None, reference_image=None, reference_mask=None, target_mask=None, checkpoint_every=0,
                resume_from=resume.NONE, preview_every=0, gradient_checkpointing="auto", optimizer_state="32-bit"):
        check_model(model)
        check_positive(rank, "rank")
        if mode not in MODES:
            raise NodeInputError("mode", f"unknown mode {mode!r}", "use lora or full")
        checkpointing, eight_bit = memory_choices(gradient_checkpointing, optimizer_state)
        device = torch.device(bridge.torch_device())
        optional = {"mask": mask, "reference_image": reference_image, "reference_mask": reference_mask,
                    "target_mask": target_mask}
        recipe = recipe_for(recipe, "finetune", optional)
        steps = steps_for(steps, recipe, "finetune")
        preflight(recipe, "finetune", optional, clip=clip)
        text = "clip" in recipe.inputs("finetune")  # the recipe may train the text encoder
        if text:
            check_clip(clip)
        x = image_to_bchw(image, "image", min_side=8)[:1]
        check_memory(model, torch.zeros(1, *recipe.trains_at(tuple(x.shape[-2:])), 3), mode, device,
                     device.type == "cuda" if checkpointing is None else checkpointing, int(rank),
                     optimizer="adam8bit" if eight_bit else "adam")
        progress = bridge.Progress(steps)
        run_plan = resume.plan(recipe.method, checkpoint_every, resume_from, progress)
        try:
            with torch.inference_mode(False), resume.resume_errors():  # ordinary tensors
                cond, _ = cond_tensor(conditioning, model)
                extra, _ = stage_extra(model, **optional)
                sd = bridge.ComfySD(model, clip if text else None, vae)
                request = StageRequest(sd, x, cond, steps, float(learning_rate) or None, int(seed), device, mode,
                                       int(rank), extra, text and clip is not None, progress, progress.should_stop,
                                       run_plan, resume.previews(preview_every, sd, progress), checkpointing,
                                       eight_bit)
                out = recipe.finetune(request)
        except RecipeInputError as e:
            raise input_error(e) from None
        finally:
            bridge.free_memory()
        log.info("%s: loss %.4f -> %.4f in %.1f s", out.summary or out.title, out.losses[0], out.losses[-1],
                 out.seconds)
        out_model, out_clip = apply_outcome(model, clip, out)
        return io.NodeOutput(out_model, curve(out.losses, out.title), out.trained, out_clip)


NODES = [OptimizeEmbedding, FineTune]
