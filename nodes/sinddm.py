"""SinDDM nodes: train on one image, sample at any size, save and load models.  The guidance,
inject and edit nodes live in :mod:`.sinddm_guidance` and share this module's types and helpers.

Thin wrappers over :mod:`core.sinddm`; every check raises :class:`NodeInputError`
naming the input.  Custom types: ``SIE_SINDDM`` (a trained model),
``SIE_SINDDM_GUIDANCE`` (a chain of guidance specs), ``SIE_OPEN_CLIP`` (a CLIP model).
Before allocating, training and sampling estimate their memory (:mod:`core.resources`)
and refuse what cannot fit, naming the input to change.
"""

from __future__ import annotations

import logging
import re

import torch

from comfy_api.latest import io

from ..core.artifact_io import ArtifactError
from ..core.images import pil_to_tensor
from ..core.plot import loss_curve
from ..core.resources import ResourceError, check_fits, sinddm_sample_bytes, sinddm_train_bytes
from ..core.sinddm import NetConfig, SinDDM, TrainConfig, build_pyramid, load, output_sizes, sample, save, train
from ..core.sinddm.pyramid import MIN_INPUT_SIDE
from . import comfy_bridge as bridge
from . import resume
from .common import CATEGORY_ROOT, NodeInputError, bchw_to_image, check_positive, image_to_bchw, save_output

log = logging.getLogger("comfyui-single-image-edit")

CATEGORY = f"{CATEGORY_ROOT}/sinddm"
SINDDM, GUIDANCE = "SIE_SINDDM", "SIE_SINDDM_GUIDANCE"
SEED = {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": True}


def _seed(name: str, tooltip: str) -> io.Int.Input:
    return io.Int.Input(name, **SEED, tooltip=tooltip)


def _guidance_in(name: str, optional: bool = False) -> io.Input:
    return io.Custom(GUIDANCE).Input(name, optional=optional,
                                     tooltip="Optional guidance from other SinDDM Guide nodes; this node adds its own "
                                             "to the chain, so several regions, or regions plus text, act on one "
                                             "sample.")


def check_sample_memory(model: SinDDM, size: tuple[int, int], count: int, device, size_input: str,
                        free: int | None = None) -> None:
    """Refuse ``count`` samples of ``size`` (H, W, the finest scale) that cannot fit in ``device``'s
    free memory: blames ``count`` when one sample would fit, else ``size_input``."""
    h, w = size
    width = model.net.config.width
    try:
        check_fits(sinddm_sample_bytes(h, w, count, width), device, f"sampling {count} x {w}x{h} px", "", free)
    except ResourceError as e:
        one = sinddm_sample_bytes(h, w, 1, width)
        if count > 1 and one <= e.free:
            raise NodeInputError("count", e.problem, f"lower count to {e.free // one} or less, or run it in "
                                                     "several batches") from None
        raise NodeInputError(size_input, e.problem, "sample a smaller size") from None


# --------------------------------------------------------------------------------------
class SinDDMTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMTrain", display_name="SinDDM Train (single image)", category=CATEGORY,
            description="Trains a SinDDM model (Kulikov et al., ICML 2023) on one image: a 1.1 M-parameter "
                        "fully-convolutional denoiser conditioned on the noise level and the pyramid scale. The "
                        "paper trains 120,000 steps (about 7 h on an A6000; far less on recent GPUs). On a CPU "
                        "use a few thousand steps, a smaller width and batch: results are rough but show the "
                        "method. The image is capped at 50,000 pixels and split into 3-6 scales.",
            inputs=[
                io.Image.Input("image",
                               tooltip="The training image; only the first image of a batch is used. At least 32 "
                                       "px per side; larger images are downscaled to 50,000 pixels."),
                io.Int.Input("steps", default=120000, min=1, max=1000000, step=100,
                             tooltip="Training steps (paper: 120,000). LR milestones and EMA are scaled to it."),
                io.Int.Input("batch_size", default=32, min=1, max=256,
                             tooltip="Noisy copies of the image per step (paper: 32)."),
                io.Int.Input("width", default=160, min=8, max=512, step=8,
                             tooltip="Network width (paper: 160, 1.1 M parameters). 64 trains ~6x faster."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1e-1, step=1e-4, round=1e-6,
                               tooltip="Adam learning rate (paper: 0.001)."),
                _seed("seed", "Seed for scales, timesteps and noise drawn during training."),
                io.Int.Input("preview_every", default=1000, min=0, max=1000000,
                             tooltip="Show a coarse-scale sample on the node every N steps (0: off)."),
                io.Combo.Input("precision", options=["auto", "fp32", "bf16"], default="auto",
                               tooltip="auto: bf16 autocast where the device runs it natively (recent GPUs, CPUs "
                                       "with AVX512-BF16), else fp32. Weights stay fp32."),
                *resume.checkpoint_inputs(["sinddm"]),
            ],
            outputs=[
                io.Custom(SINDDM).Output(display_name="model",
                                         tooltip="The trained SinDDM model (EMA weights), for SinDDM Sample / "
                                                 "Harmonize / Save."),
                io.Image.Output(display_name="loss_curve", tooltip="The training loss (L1 on the noise) per step."),
            ],
        )

    @classmethod
    def execute(cls, image, steps, batch_size, width, learning_rate, seed, preview_every, precision,
                checkpoint_every=0, resume_from=resume.NONE):
        x = image_to_bchw(image, "image", min_side=MIN_INPUT_SIDE)[:1]
        check_positive(steps, "steps")
        check_positive(batch_size, "batch_size")
        if width < 8 or width % 2:
            raise NodeInputError("width", f"must be an even number of at least 8, got {width}", "use 64, 128 or 160")
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs ordinary tensors
            pyramid = build_pyramid(x[0])
        device = bridge.torch_device()
        fh, fw = pyramid.spec.sizes[-1]
        try:
            check_fits(sinddm_train_bytes(fh, fw, int(batch_size), int(width)), device,
                       f"training at {fw}x{fh} px with batch {batch_size} and width {width}", "")
        except ResourceError as e:
            one = sinddm_train_bytes(fh, fw, 1, int(width))
            if batch_size > 1 and one <= e.free:
                raise NodeInputError("batch_size", e.problem, "lower batch_size (or width)") from None
            raise NodeInputError("width", e.problem, "lower width (64 needs ~2.5x less), or train on a "
                                                     "device with more memory") from None
        progress = bridge.Progress(steps)
        run_plan = resume.plan("sinddm", checkpoint_every, resume_from, progress)

        def preview(net):
            m = SinDDM.create(net, pyramid)
            return sample(m, count=1, seed=seed, scales=1, device=device)[0]

        cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(learning_rate), seed=int(seed),
                          precision=precision)
        try:
            with torch.inference_mode(False), torch.enable_grad(), resume.resume_errors():
                result = train(pyramid, NetConfig(int(width)), cfg, device, on_step=progress,
                               should_stop=progress.should_stop, preview_every=int(preview_every), preview=preview,
                               checkpoints=run_plan)
        finally:
            bridge.free_memory()
        model = SinDDM.create(result.net, pyramid, result.info())
        log.info("SinDDM trained: %s (final loss %.4f, %.1f s)", model.describe(), result.losses[-1], result.seconds)
        curve = pil_to_tensor(loss_curve(result.losses, title="SinDDM training loss"))[None]
        return io.NodeOutput(model, bchw_to_image(curve))


# --------------------------------------------------------------------------------------
def _parse_start_steps(text: str, n: int) -> list[int] | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [int(v) for v in re.split(r"[,\s]+", text) if v]
    except ValueError:
        raise NodeInputError("start_steps", f"'{text}' is not a list of integers",
                             "write comma-separated steps, e.g. 55, 43") from None
    if len(values) != n - 1:
        raise NodeInputError("start_steps", f"{len(values)} values for a model with {n} scales",
                             f"give {n - 1} values (one per scale above the coarsest), or leave empty")
    return values


class SinDDMSample(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SinDDMSample", display_name="SinDDM Sample", category=CATEGORY,
            description="Draws random samples from a SinDDM model, coarse to fine (paper Alg. 2), at any size: "
                        "set width/height in pixels, or leave them at 0 and use the scale multipliers. Sample k "
                        "uses seed + k. Connect SinDDM Guide nodes to constrain regions or steer content/style "
                        "with text.",
            inputs=[
                io.Custom(SINDDM).Input("model",
                                        tooltip="A trained SinDDM model (SinDDM Train or Load SinDDM Model)."),
                io.Int.Input("count", default=4, min=1, max=64, tooltip="Number of samples."),
                _seed("seed", "Seed of the first sample; sample k uses seed + k."),
                io.Float.Input("width_scale", default=1.0, min=0.1, max=16.0, step=0.05,
                               tooltip="Output width as a multiple of the training width (when width is 0)."),
                io.Float.Input("height_scale", default=1.0, min=0.1, max=16.0, step=0.05,
                               tooltip="Output height as a multiple of the training height (when height is 0)."),
                io.Int.Input("width", default=0, min=0, max=8192, step=1,
                             tooltip="Output width in pixels; 0 uses width_scale."),
                io.Int.Input("height", default=0, min=0, max=8192, step=1,
                             tooltip="Output height in pixels; 0 uses height_scale."),
                io.String.Input("start_steps", default="", multiline=False,
                                tooltip="Optional: the noise step at which each finer scale starts "
                                        "(comma-separated, one per scale above the coarsest; the official "
                                        "--sample_t_list). Empty: the model's own T[s]."),
                _guidance_in("guidance", optional=True),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The samples, a batch of 'count' images."),
            ],
        )

    @classmethod
    def execute(cls, model, count, seed, width_scale, height_scale, width, height, start_steps, guidance=None):
        check_positive(count, "count")
        th, tw = model.training_size
        h = int(height) if height > 0 else th * float(height_scale)
        w = int(width) if width > 0 else tw * float(width_scale)
        size = (int(round(h)), int(round(w))) if (height > 0 or width > 0) else None
        mul = (float(height_scale), float(width_scale))
        try:
            sizes = output_sizes(model, mul, size)
        except ValueError as e:
            raise NodeInputError("width" if width > 0 else "width_scale", str(e)) from None
        device = bridge.torch_device()
        check_sample_memory(model, sizes[-1], int(count), device, "width" if width > 0 else "width_scale")
        steps = _parse_start_steps(start_steps, model.pyramid.spec.n_scales)
        sched = model.schedule_with(steps)
        progress = bridge.Progress(sched.num_timesteps + sum(sched.start_steps[1:]))
        with torch.inference_mode(False):
            out = sample(model, count=int(count), seed=int(seed), scale_mul=mul, size=size,
                         guidance=_guidance_list(guidance), start_steps=steps, device=device,
                         on_step=progress, should_stop=progress.should_stop)
        return io.NodeOutput(bchw_to_image(out))


def _guidance_list(chain) -> list:
    """Fresh guidance objects from the chain's factories (guidance keeps per-run state)."""
    try:
        return [factory() for factory in (chain or ())]
    except ValueError as e:
        raise NodeInputError("guidance", str(e)) from None


# --------------------------------------------------------------------------------------
class SaveSinDDM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SaveSinDDM", display_name="Save SinDDM Model", category=CATEGORY,
            description="Saves a trained SinDDM model as .safetensors in models/single_image_edit/sinddm "
                        "(weights, pyramid and settings in one file; written atomically, never overwriting). "
                        "Load it later with Load SinDDM Model instead of training again.",
            inputs=[
                io.Custom(SINDDM).Input("model", tooltip="The model to save."),
                io.String.Input("filename_prefix", default="sinddm",
                                tooltip="File name prefix inside models/single_image_edit/sinddm (may contain "
                                        "sub-folders); a counter is appended (prefix_00001.safetensors)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix):
        return save_output(bridge.save_dir("sie_sinddm"), filename_prefix, lambda path: save(model, path),
                           "SinDDM model")


class LoadSinDDM(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_LoadSinDDM", display_name="Load SinDDM Model", category=CATEGORY,
            description="Loads a SinDDM model saved by Save SinDDM Model from models/single_image_edit/sinddm.",
            inputs=[
                io.Combo.Input("model_name", options=bridge.list_models("sie_sinddm"),
                               tooltip="A .safetensors file written by Save SinDDM Model."),
            ],
            outputs=[
                io.Custom(SINDDM).Output(display_name="model", tooltip="The saved SinDDM model."),
                io.String.Output(display_name="info",
                                 tooltip="A one-line summary: scales, sizes, start steps, training steps."),
            ],
        )

    @classmethod
    def execute(cls, model_name):
        try:
            path = bridge.model_path("sie_sinddm", model_name)
            with torch.inference_mode(False):
                model = load(path)
        except (FileNotFoundError, ArtifactError) as e:
            raise NodeInputError("model_name", str(e), "pick a file saved by Save SinDDM Model") from None
        return io.NodeOutput(model, model.describe())



NODES = [SinDDMTrain, SinDDMSample, SaveSinDDM, LoadSinDDM]
