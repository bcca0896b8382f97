"""High-Fidelity rectifier nodes (Hou, Wei, Chen, AAAI 2024): train, apply, save and load.

* ``SIE_TrainRectifier`` trains R(x_0, P_t, t), the hypernetwork of :mod:`core.rectifier`, on a
  batch of images with the SD MODEL frozen: reconstruction (eq. 3) or editing (Alg. 1: directional
  CLIP + L1, continuing from a reconstruction rectifier).  The result is a ``SIE_RECTIFIER``.
* ``SIE_ApplyRectifier`` (the "rectifier modulator") returns a clone of the MODEL whose every
  denoiser call is rectified (eq. 2): an unmodulated pass gives P_t, R gives the per-sample
  offsets Delta from (x_0, P_t, t), a second pass runs with theta (1 + s Delta) in the modulated
  convolutions.  Any ComfyUI sampler drives it, from pure noise (the paper's inference, x_0 given
  at every step) or with denoise < 1 (SDEdit, the paper's image-to-image section).
* ``SIE_SaveRectifier`` / ``SIE_LoadRectifier``: the ``sie.rectifier`` file in
  models/single_image_edit/rectifier.

The per-call plumbing (a ``model_function_wrapper`` over a views clone) lives in
:mod:`nodes.comfy_views` (:func:`install_call_rule`); :class:`RectifierRule` here is only the
rectifier's maths per call.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from comfy_api.latest import io

from ..core.artifact_io import ArtifactError
from ..core.images import pil_to_tensor
from ..core.plot import loss_curve
from ..core.rectifier import (
    Rectifier,
    RectifierInfo,
    TrainConfig,
    check_fits,
    load_encoder_weights,
    load_rectifier,
    new_rectifier,
    save_rectifier,
    train_rectifier,
)
from ..core.rectifier.rule import ESTIMATES, Trajectory, modulation, rectified_call
from ..core.rectifier.train import MODES
from ..core.resources import IMAGIC_ACT_BYTES_PER_LATENT_PIXEL, ResourceError
from ..core.resources import check_fits as check_memory_fits
from ..core.seam import ViewSpec
from . import comfy_bridge as bridge
from . import resume
from .common import CATEGORY_ROOT, OPEN_CLIP, NodeInputError, bchw_to_image, check_positive, image_to_bchw, save_output

log = logging.getLogger("comfyui-single-image-edit")

CATEGORY = f"{CATEGORY_ROOT}/rectifier"
RECTIFIER = "SIE_RECTIFIER"
FOLDER = "sie_rectifier"
ENCODER_FOLDER = "sie_rectifier_encoders"  # models/single_image_edit/rectifier_encoders: ImageNet ResNet-34 files
SEED = {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}
LATENT_CHANNELS = 4  # SD 1.x latents: the rectifier's encoder sees concat(x_0, P_t), 8 channels
ESTIMATE_CLIP = 4.0  # |P_t| clip for SD latents (model space: |x_0| is a few units; see core.rectifier.hypernet)
MIN_SIDE = 64  # px: an 8x8 latent, the smallest the ResNet encoder and the UNet take comfortably
STRENGTH_MAX = 2.0


@dataclass(frozen=True)
class TrainedRectifier:
    """The ``SIE_RECTIFIER`` object: the network and what it was trained for.  Nodes never change
    it (training continues on a deep copy; Apply Rectifier runs its own copy on the device)."""

    net: Rectifier
    info: RectifierInfo

    def describe(self) -> str:
        i = self.info
        text = f"{i.mode} rectifier, {i.steps} steps, {len(self.net.layer_names)} modulated layers"
        if i.target_text:
            text += f", '{i.source_text}' -> '{i.target_text}'"
        return text


# --------------------------------------------------------------------------------------
# Input checks (all before anything is loaded)
# --------------------------------------------------------------------------------------
def check_sd_model(model, name: str = "model") -> None:
    problem = bridge.sd_problem(model)
    if problem:
        raise NodeInputError(name, f"this is {problem}; the rectifier nodes here modulate a "
                                   f"{bridge.SUPPORTED_FAMILIES} UNet",
                             "load an SD 1.x or SDXL checkpoint (e.g. v1-5-pruned-emaonly.safetensors)")


def unet_parameters(model) -> dict[str, torch.Tensor]:
    """The MODEL's UNet parameters under their canonical (original SD) names."""
    return dict(model.model.diffusion_model.named_parameters())


def check_rectifier(rectifier, model, name: str = "rectifier") -> TrainedRectifier:
    """A SIE_RECTIFIER that fits this MODEL's UNet (its layers exist with its kernel shapes)."""
    if not isinstance(rectifier, TrainedRectifier):
        raise NodeInputError(name, f"expected a rectifier, got {type(rectifier).__name__}",
                             "connect Train Rectifier or Load Rectifier")
    cfg = rectifier.net.config
    if rectifier.info.backbone != "ldm" or cfg.channels != LATENT_CHANNELS:
        raise NodeInputError(name, f"this rectifier was made for a {rectifier.info.backbone or '?'} denoiser with "
                                   f"{cfg.channels}-channel inputs (a pixel-space DDPM), not for SD latents",
                             "train a rectifier on this SD MODEL with Train Rectifier")
    try:
        check_fits(rectifier.net, unet_parameters(model))
    except ValueError as e:
        raise NodeInputError(name, str(e), "use a rectifier trained on this MODEL's architecture (SD 1.x or SDXL), or "
                                           "train one with Train Rectifier") from None
    return rectifier


def encoder_path(encoder_weights) -> str | None:
    """The file of the ``encoder_weights`` input (None for "none"), or an error naming the input."""
    if encoder_weights in (None, "", "none"):
        return None
    try:
        return bridge.model_path(ENCODER_FOLDER, str(encoder_weights))
    except FileNotFoundError as e:
        raise NodeInputError("encoder_weights", str(e), "put torchvision's resnet34 ImageNet file in "
                                                        "models/single_image_edit/rectifier_encoders, or use none") from None


def fresh_rectifier(params: dict[str, torch.Tensor], seed: int, encoder_weights: str | None = None) -> Rectifier:
    """A new SD rectifier (Delta = 0); with ``encoder_weights`` (a torchvision ResNet-34 ImageNet file) its
    encoder has BatchNorm with those weights and statistics (:func:`core.rectifier.load_encoder_weights`)."""
    net = new_rectifier(params, channels=LATENT_CHANNELS, estimate_clip=ESTIMATE_CLIP, seed=int(seed),
                        encoder_norm="batch" if encoder_weights else "group")
    if encoder_weights:
        try:
            skipped = load_encoder_weights(net, encoder_weights)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise NodeInputError("encoder_weights", str(e), "use torchvision's ResNet-34 ImageNet weights "
                                                            "(resnet34-b627a593.pth), or none") from None
        log.info("Rectifier encoder: ImageNet weights from %s (random: %s)", encoder_weights,
                 ", ".join(skipped) or "nothing")
    return net


def check_images(images, name: str = "images") -> torch.Tensor:
    """IMAGE batch -> [N, 3, H, W] in [0, 1], sides >= 64 and multiples of 8."""
    x = image_to_bchw(images, name, min_side=MIN_SIDE)
    h, w = x.shape[-2:]
    if h % 8 or w % 8:
        raise NodeInputError(name, f"the images are {w}x{h}; both sides must be multiples of 8 (the VAE's "
                                   "downsampling)", "scale them first, e.g. Upscale Image to 512x512")
    return x


def text_context(conditioning, model) -> tuple[torch.Tensor, str]:
    """(cond [1, 77, D] float32, how it was made): the first entry of ``conditioning``, or zeros."""
    sd = bridge.ComfySD(model)
    if conditioning is None:  # SDXL: a zero context and a zero pooled vector, packed
        return torch.zeros(1, 77 + (1 if sd.pooled_dim else 0), sd.context_dim or 768), "zero text context"
    from .training import cond_tensor

    cond, _ = cond_tensor(conditioning, model)
    return cond, "conditioning input"


def check_train_memory(model, latent_hw: tuple[int, int], batch: int, rectifier_params: int, device,
                       free: int | None = None) -> None:
    """Refuse a training run that cannot fit, naming ``batch`` (when one image would fit) or ``images``.

    Estimate (``core.resources``' figures): the rectifier's weights, gradients and Adam moments
    (16 bytes per parameter) plus the UNet activations autograd keeps, Imagic's measured 1 MiB per
    latent pixel per image in fp32 (it counts the whole UNet; only the modulated middle and output
    blocks need their activations here, so this errs on the safe side), half of it under 16-bit
    autocast.  Not counted: the frozen UNet (loaded by ComfyUI) and, in edit mode, the VAE decoder
    and CLIP activations."""
    from ..core.fit import autocast_dtype

    h, w = latent_hw
    per_image = IMAGIC_ACT_BYTES_PER_LATENT_PIXEL * h * w
    if autocast_dtype(torch.device(device), "auto") is not None:
        per_image //= 2
    fixed = 16 * rectifier_params
    try:
        check_memory_fits(fixed + batch * per_image, device, f"rectifier training with batch {batch} at "
                                                             f"{8 * w}x{8 * h}", "", free)
    except ResourceError as e:
        if batch > 1 and fixed + per_image <= e.free:
            fits = max(1, (e.free - fixed) // per_image)
            raise NodeInputError("batch", e.problem, f"lower batch to {fits} or less") from None
        raise NodeInputError("images", e.problem, "use smaller images, or a device with more memory") from None


def loss_image(result, mode: str) -> torch.Tensor:
    """IMAGE [1, H, W, 3]: the loss per step; in edit mode one chart per term under the total."""
    if mode == "recon":
        charts = [loss_curve(result.losses, title="rectifier reconstruction loss (eq. 3, eps MSE)")]
    else:
        charts = [loss_curve(result.losses, title="rectifier edit loss (eq. 6, weighted total)")]
        names = {"clip": "directional CLIP loss (eq. 4)", "l1": "L1 to x_0 (eq. 5)"}
        charts += [loss_curve(v, title=names.get(k, k)) for k, v in result.terms.items()]
    return bchw_to_image(torch.cat([pil_to_tensor(c) for c in charts], dim=1)[None])


# --------------------------------------------------------------------------------------
class TrainRectifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_TrainRectifier", display_name="Train Rectifier", category=CATEGORY,
            description="High-Fidelity rectifier (Hou, Wei, Chen, AAAI 2024): trains the hypernetwork R(x_0, "
                        "P_t, t) that modulates the frozen SD UNet's middle and output-block convolutions, theta "
                        "(1 + Delta), at every step. recon: eq. 3, the usual noise-prediction loss of the "
                        "rectified model on the training images (Adam lr 1e-3 x 0.9 every 5,000 steps, weight "
                        "decay 1e-5). edit: Alg. 1, directional CLIP loss (source -> target text) + L1 to the "
                        "original on x0_hat from each step of the original trajectory (lr 1e-3 x 0.9 every 10 "
                        "steps); continue from a reconstruction rectifier through the 'rectifier' input, as the "
                        "paper does. The paper uses about 100 images per attribute.",
            inputs=[
                io.Model.Input("model", tooltip="An SD 1.x or SDXL MODEL; frozen (not modified)."),
                io.Vae.Input("vae", tooltip="The VAE of the same checkpoint: encodes the training images once (and "
                                            "decodes x0_hat for CLIP in edit mode)."),
                io.Image.Input("images",
                               tooltip="The training set, a batch of images of one domain (the paper: about 100 "
                                       "per attribute), at least 64 px, sides multiples of 8 (SD 1.x: 512x512, SDXL: "
                                       "1024x1024)."),
                io.Combo.Input("mode", options=list(MODES), default="recon",
                               tooltip="recon: reconstruction training (eq. 3). edit: editing training (Alg. 1), "
                                       "needs open_clip and target_text; continue from a recon rectifier."),
                io.Int.Input("steps", default=5000, min=1, max=1000000,
                             tooltip="Adam steps. The paper gives no count, only the schedules: recon lr x 0.9 "
                                     "every 5,000 steps (the default is one such interval), edit lr x 0.9 every "
                                     "10 steps (a few hundred steps)."),
                io.Float.Input("lr", default=1e-3, min=1e-7, max=1.0, step=1e-4, round=1e-7,
                               tooltip="Adam learning rate at the start (paper: 0.001 in both modes)."),
                io.Int.Input("seed", **SEED,
                             tooltip="Seed of a new rectifier's initial weights and of the images, timesteps and "
                                     "noise drawn at each step."),
                io.Custom(OPEN_CLIP).Input("open_clip", optional=True,
                                           tooltip="Edit mode: a CLIP model from Load OpenCLIP for the "
                                                   "directional CLIP loss (eq. 4)."),
                io.String.Input("source_text", optional=True, default="face",
                                tooltip="Edit mode: what the images show now (t_src, e.g. 'face')."),
                io.String.Input("target_text", optional=True, default="",
                                tooltip="Edit mode: what they should show (t_tar, e.g. 'smiling face')."),
                io.Custom(RECTIFIER).Input("rectifier", optional=True,
                                           tooltip="Continue training this rectifier (a copy of it; e.g. the edit "
                                                   "training continues from the reconstruction rectifier, as the "
                                                   "paper does: connect Load Rectifier). Empty: a new one with "
                                                   "Delta = 0 (the plain model), also in edit mode, which then "
                                                   "starts without any reconstruction training (the log says so)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The text condition the UNet sees while training (use the same at "
                                              "sampling, e.g. an encoded empty prompt). Empty: a zero text "
                                              "context [1, 77, 768]. Only the first entry is used."),
                io.Int.Input("batch", optional=True, default=8, min=1, max=256,
                             tooltip="Images (with their own t and noise) per step."),
                io.Combo.Input("estimate", options=list(ESTIMATES), optional=True, default="base",
                               tooltip="R's input P_t: base = the unmodulated model's x_0 estimate (eq. 1); "
                                       "modulated = the rectified model's own (one extra modulated pass, no "
                                       "gradient)."),
                io.Combo.Input("encoder_weights", options=["none"] + bridge.list_models(ENCODER_FOLDER),
                               optional=True, default="none",
                               tooltip="A new rectifier's encoder: none = a randomly initialised ResNet-34 "
                                       "(GroupNorm); or torchvision's ImageNet ResNet-34 weights from "
                                       "models/single_image_edit/rectifier_encoders (resnet34-b627a593.pth or a "
                                       ".safetensors of it; BatchNorm with ImageNet's statistics). Ignored when a "
                                       "rectifier is connected (it keeps its own)."),
                *resume.checkpoint_inputs(["rectifier"]),
            ],
            outputs=[
                io.Custom(RECTIFIER).Output(display_name="rectifier",
                                            tooltip="The trained rectifier (a new object; a connected rectifier "
                                                    "input is never changed), for Apply Rectifier, Save "
                                                    "Rectifier, or further training."),
                io.Image.Output(display_name="loss",
                                tooltip="The loss per step (edit mode: the weighted total, then the CLIP and L1 "
                                        "terms)."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, images, mode, steps, lr, seed, open_clip=None, source_text="face", target_text="",
                rectifier=None, conditioning=None, batch=8, estimate="base", encoder_weights="none",
                checkpoint_every=0, resume_from=resume.NONE):
        check_sd_model(model)
        if mode not in MODES:
            raise NodeInputError("mode", f"unknown mode {mode!r}", "use recon or edit")
        if estimate not in ESTIMATES:
            raise NodeInputError("estimate", f"unknown estimate {estimate!r}", "use base or modulated")
        check_positive(steps, "steps")
        check_positive(batch, "batch")
        if not float(lr) > 0:
            raise NodeInputError("lr", f"must be positive, got {lr}", "use e.g. 0.001 (the paper's)")
        x = check_images(images)
        source_text, target_text = str(source_text or "").strip(), str(target_text or "").strip()
        if mode == "edit":
            if open_clip is None:
                raise NodeInputError("open_clip", "edit training needs a CLIP model for the directional loss",
                                     "connect Load OpenCLIP (e.g. ViT-B-32), or use mode recon")
            if not hasattr(open_clip, "encode_image") or not hasattr(open_clip, "model"):
                raise NodeInputError("open_clip", f"expected an OpenCLIP model, got {type(open_clip).__name__}",
                                     "connect Load OpenCLIP")
            if not target_text:
                raise NodeInputError("target_text", "edit training needs the target text t_tar",
                                     "write what the edited images should show, e.g. 'smiling face'")
            if target_text == source_text:
                raise NodeInputError("target_text", "it equals source_text: there is no direction to edit along",
                                     "write a different target, e.g. 'smiling face' for 'face'")
        if rectifier is not None:
            check_rectifier(rectifier, model)
        weights_path = encoder_path(encoder_weights) if rectifier is None else None
        if rectifier is None and mode == "edit":
            log.warning("Rectifier edit training without a rectifier connected: it starts from Delta = 0 (the plain "
                        "model), not from a reconstruction rectifier as in the paper; connect Load Rectifier to "
                        "continue from one")
        device = torch.device(bridge.torch_device())
        with torch.inference_mode(False):  # the rectifier's tensors must be ordinary ones: autograd saves them
            if rectifier is not None:
                net, previous = copy.deepcopy(rectifier.net), rectifier.info
            else:
                net = fresh_rectifier(unet_parameters(model), int(seed), weights_path)
                previous = RectifierInfo("ldm")
        check_train_memory(model, (x.shape[-2] // 8, x.shape[-1] // 8), int(batch),
                           sum(p.numel() for p in net.parameters()), device)
        config = TrainConfig(mode=mode, steps=int(steps), batch=int(batch), lr=float(lr), estimate=estimate,
                             seed=int(seed))
        progress = bridge.Progress(steps)
        run_plan = resume.plan("rectifier", checkpoint_every, resume_from, progress)
        clip_model = getattr(open_clip, "model", None) if mode == "edit" else None
        try:
            with torch.inference_mode(False), resume.resume_errors():  # ordinary tensors
                cond, cond_from = text_context(conditioning, model)
                sd = bridge.ComfySD(model, None, vae)
                latents = sd.encode(x).clone()
                kw = {}
                if mode == "edit":
                    from ..core.rectifier.clip_direction import DirectionalCLIP

                    clip_model.to(sd.device)
                    try:
                        direction = DirectionalCLIP(open_clip, source_text, target_text, device=sd.device)
                    except ValueError as e:
                        raise NodeInputError("target_text", str(e)) from None
                    # train_rectifier decodes the originals with this decoder (its default source_images) before
                    # it loads the UNet with everything else evicted, which also makes the decoder copy then
                    kw = {"clip": direction, "to_image": sd.decode_differentiable}
                result = train_rectifier(sd, net, latents, config, cond=cond.to(latents.device), on_step=progress,
                                         should_stop=progress.should_stop, checkpoints=run_plan, **kw)
                net = net.cpu().eval()
        finally:
            if clip_model is not None:
                clip_model.to("cpu")
            bridge.free_memory()
        entry = {"mode": mode, "steps": int(steps), "batch": int(batch), "lr": float(lr), "seed": int(seed),
                 "estimate": estimate, "images": int(x.shape[0]), "size": [int(x.shape[-1]), int(x.shape[-2])],
                 "text_context": cond_from, "final_loss": result.losses[-1], "seconds": round(result.seconds, 1)}
        if mode == "edit":
            entry.update(source_text=source_text, target_text=target_text)
        if rectifier is None:
            entry["start"] = "ImageNet encoder: " + str(encoder_weights) if weights_path else "Delta = 0"
        info = RectifierInfo("ldm", mode, source_text if mode == "edit" else "",
                             target_text if mode == "edit" else "", previous.steps + int(steps),
                             list(previous.history) + [entry])
        log.info("Rectifier %s training (%d images, batch %d): loss %.4f -> %.4f in %.1f s", mode, x.shape[0],
                 batch, result.losses[0], result.losses[-1], result.seconds)
        return io.NodeOutput(TrainedRectifier(net, info), loss_image(result, mode))


# --------------------------------------------------------------------------------------
class RectifierRule:
    """Per denoiser call (:class:`nodes.comfy_views.DenoiserCall`): the rectified model's denoised
    output, eq. 2, by :func:`core.rectifier.rule.rectified_call` (the standalone samplers' rule too).
    P_t is the unmodulated pass (``estimate="base"``) or the previous call's modulated output of the
    same trajectory (``"modulated"``: the same conditioning chunks, a lower sigma, the same shape;
    otherwise a base pass).  Strength 0 is the unmodulated pass alone."""

    def __init__(self, net: Rectifier, reference: torch.Tensor, strength: float, estimate: str = "base"):
        self.source, self.reference = net, reference  # shared, never changed; reference [R, 4, h, w] model space
        self.strength, self.estimate = float(strength), estimate
        self.net: Rectifier | None = None  # this rule's own copy, on the device of the calls
        self.trajectory = Trajectory() if estimate == "modulated" else None  # P_t per conditioning chunk
        self.calls = {"base": 0, "modulated": 0}

    def to(self, *args, **kwargs) -> "RectifierRule":
        """Follow the model between devices (ComfyUI moves model wrappers with it); dtypes are ignored:
        R stays in float32."""
        device = kwargs.get("device")
        for a in args:
            if isinstance(a, (torch.device, str)):
                device = a
        if sys.meta_path is None:  # interpreter shutdown (ComfyUI's ModelPatcher.__del__ offloads): nothing to move
            return self
        if device is not None and self.net is not None:
            with torch.inference_mode(False):
                self.net.to(device)
        return self

    def network(self, device: torch.device) -> Rectifier:
        with torch.inference_mode(False):  # ordinary tensors, whatever mode ComfyUI samples in
            if self.net is None:
                self.net = copy.deepcopy(self.source).eval()
            if next(self.net.parameters()).device != device:
                self.net.to(device)
        return self.net

    def x0_for(self, call) -> torch.Tensor:
        """The reference latent(s) for this call's batch: resized to the latent size, one reference
        broadcast, or one per latent of the batch repeated for each conditioning chunk."""
        x = call.x
        ref = self.reference.to(x.device, torch.float32)
        if ref.shape[-2:] != x.shape[-2:]:
            ref = F.interpolate(ref, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        n, chunks = x.shape[0], max(len(call.cond_or_uncond), 1)
        if ref.shape[0] == 1:
            return ref.expand(n, *ref.shape[1:])
        if ref.shape[0] * chunks == n:
            return ref.repeat(chunks, 1, 1, 1)
        raise NodeInputError("image", f"{ref.shape[0]} reference images for a batch of {n // chunks} latents "
                                      "(Apply Rectifier)", "give one image, or one per latent of the batch")

    def __call__(self, call) -> torch.Tensor:
        if self.strength == 0.0:
            return call.run()

        def base_estimate() -> torch.Tensor:
            self.calls["base"] += 1
            return call.run().to(torch.float32)

        net, x0, t = self.network(call.x.device), self.x0_for(call), call.t.to(call.x.device)
        out, _ = rectified_call(base_estimate, lambda p_t: call.run(1, modulation(net, x0, p_t, t, self.strength)),
                                self.trajectory, tuple(call.cond_or_uncond), call.x, call.sigma,
                                lambda o: o.to(torch.float32))
        self.calls["modulated"] += 1
        return out


class ApplyRectifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_ApplyRectifier", display_name="Apply Rectifier", category=CATEGORY,
            description="The rectifier modulator (Hou et al. 2024, eq. 2): at every denoiser call the "
                        "unmodulated model's x_0 estimate P_t and the reference image x_0 go through the "
                        "rectifier, whose offsets Delta modulate the middle and output-block convolutions, theta "
                        "(1 + strength Delta), for a second pass. The paper's path ('N inversion and denoising "
                        "steps'): DDIM Inversion of the VAE-encoded image, then SamplerCustom (add_noise off, "
                        "euler = DDIM, cfg 1, the inversion's sigmas) with this MODEL; to reconstruct, this "
                        "MODEL also inverts (one model for both halves of the round trip), to edit, a MODEL "
                        "without the edit does (the reconstruction-rectified or the plain one). Any other "
                        "sampler works too: DDPM from pure noise (KSampler ddpm, denoise 1.0) or SDEdit (denoise "
                        "< 1, the paper's image-to-image translation). Costs one extra UNet pass per call (none "
                        "with estimate = modulated).",
            inputs=[
                io.Model.Input("model",
                               tooltip="The SD 1.x or SDXL MODEL the rectifier was trained on (not modified)."),
                io.Custom(RECTIFIER).Input("rectifier", tooltip="From Train Rectifier or Load Rectifier."),
                io.Image.Input("image",
                               tooltip="The reference x_0 (the image to reconstruct or edit): one image for every "
                                       "latent, or one per latent of the sampled batch. Resized to the latent "
                                       "size when it differs."),
                io.Float.Input("strength", default=1.0, min=0.0, max=STRENGTH_MAX, step=0.05,
                               tooltip="Scale s of Delta: theta (1 + s Delta). 1 = as trained, 0 = the plain "
                                       "model."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the reference image once."),
                io.Combo.Input("estimate", options=list(ESTIMATES), optional=True, default="base",
                               tooltip="P_t: base = an unmodulated pass per call (eq. 1, as trained by default); "
                                       "modulated = the previous call's rectified estimate (no extra pass; the "
                                       "first call of a run uses the base)."),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="A clone of the MODEL whose every denoiser call is rectified (the input "
                                        "MODEL is unchanged); sample it with any ComfyUI sampler."),
            ],
        )

    @classmethod
    def execute(cls, model, rectifier, image, strength, vae, estimate="base"):
        check_sd_model(model)
        rect = check_rectifier(rectifier, model)
        if not 0.0 <= float(strength) <= STRENGTH_MAX:
            raise NodeInputError("strength", f"{strength} is outside [0, {STRENGTH_MAX:g}]",
                                 "use 1 for the trained effect, 0 for the plain model")
        if estimate not in ESTIMATES:
            raise NodeInputError("estimate", f"unknown estimate {estimate!r}", "use base or modulated")
        x = image_to_bchw(image, "image", min_side=8)
        if vae is None or not hasattr(vae, "encode"):
            raise NodeInputError("vae", f"expected a VAE, got {type(vae).__name__}", "connect the checkpoint's VAE")
        from .comfy_views import install_call_rule

        reference = bridge.ComfySD(model, None, vae).encode(x).to("cpu", torch.float32)
        rule = RectifierRule(rect.net, reference, float(strength), estimate)
        try:
            out = install_call_rule(model, ViewSpec(modulates=rect.net.layer_names), rule)
        except ValueError as e:
            raise NodeInputError("model", str(e), "apply one rectifier per MODEL (connect the MODEL before the "
                                                  "first Apply Rectifier)") from None
        return io.NodeOutput(out)


# --------------------------------------------------------------------------------------
def ddim_inversion_sampler(alphas_cumprod: torch.Tensor, sigmas: torch.Tensor, steps: int):
    """A ComfyUI sampler function that runs :func:`core.rectifier.sample.ddim_invert` through the sampling
    machinery's model (the CFGGuider: conditioning, cfg, LoRA patches and model wrappers such as Apply Rectifier's
    rule all apply).  It starts from the clean latent (sigma 0) and returns x_T in ComfyUI's convention
    (x_t / sqrt(alpha_bar)) for the first timestep of the sampling schedule."""
    from ..core.rectifier.sample import ddim_invert, inversion_schedule

    t_first = inversion_schedule(alphas_cumprod, steps)[0]

    def invert(model, x, _sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = extra_args or {}
        ab = alphas_cumprod.to(x.device)
        sig = sigmas.to(x.device)

        def eps_fn(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # variance-preserving x_t, t [B]
            a = ab[t].to(x_vp.dtype).view(-1, 1, 1, 1)
            x_ve = x_vp / a.sqrt()
            sigma = sig[t].to(x_vp.dtype)
            denoised = model(x_ve, sigma, **extra_args)
            return (x_ve - denoised) / sigma.view(-1, 1, 1, 1)

        x_T = ddim_invert(eps_fn, x, ab.cpu(), steps)
        return x_T / ab[t_first].sqrt().to(x_T.dtype)

    return invert


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_DDIMInversion", display_name="DDIM Inversion", category=CATEGORY,
            description="Deterministic DDIM inversion (eta 0) of a VAE-encoded image, the High-Fidelity "
                        "rectifier's path for reconstruction and editing (Hou et al. 2024: 'N inversion and "
                        "denoising steps', Table 1): invert here, then sample back with SamplerCustom (add_noise "
                        "off, euler = DDIM, cfg 1, these sigmas). The inversion runs through ComfyUI's sampling "
                        "with the MODEL as connected (LoRAs and Apply Rectifier included). Which model inverts: "
                        "to reconstruct, the rectified MODEL itself (Apply Rectifier with a reconstruction "
                        "rectifier): a DDIM round trip is faithful when one model runs both halves, and the "
                        "rectifier makes that model better on the image; to edit, a model without the edit (that "
                        "reconstruction-rectified MODEL, or the plain one), since an edit rectifier inverting "
                        "would let its own sampling undo the edit. Same maths as python -m core.rectifier edit "
                        "(trailing timesteps 999, ...; the eps of the level moved to).",
            inputs=[
                io.Model.Input("model", tooltip="The model that inverts: the reconstruction-rectified MODEL (Apply "
                                                "Rectifier) to reconstruct, or a model without the edit (that one, or the "
                                                "checkpoint's) to edit."),
                io.Conditioning.Input("positive",
                                      tooltip="The text condition of the inversion (cfg 1); use the same at "
                                              "sampling and the one the rectifier was trained under (e.g. an "
                                              "empty prompt)."),
                io.Latent.Input("latent", tooltip="The image to invert, from VAE Encode."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Inversion steps; sampling back takes the same (the paper's Table 1: 50)."),
            ],
            outputs=[
                io.Latent.Output(display_name="noisy_latent",
                                 tooltip="x_T: the image's latent inverted to the first timestep of the schedule, "
                                         "in ComfyUI's convention. Sample it with SamplerCustom, add_noise off, "
                                         "sampler euler (= DDIM, eta 0), cfg 1, these sigmas."),
                io.Sigmas.Output(display_name="sigmas",
                                 tooltip="The sampling schedule that retraces the inversion (the same timesteps, "
                                         "high to low, then 0): connect it to SamplerCustom's sigmas."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps):
        check_sd_model(model)
        if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor) or \
                latent["samples"].ndim != 4:
            raise NodeInputError("latent", "expected a LATENT (a dict with 'samples' [B, 4, h, w])",
                                 "connect VAE Encode")
        check_positive(steps, "steps")
        from ..core.rectifier.sample import inversion_schedule
        from .training import cond_tensor

        cond_tensor(positive, model, "positive")  # a CONDITIONING that fits the MODEL, or named
        ms = model.get_model_object("model_sampling")
        sig = ms.sigmas.detach().to("cpu", torch.float64)  # [T]
        ab = 1.0 / (sig**2 + 1.0)  # alpha_bar of the MODEL's own schedule
        if not 1 <= int(steps) <= len(ab):
            raise NodeInputError("steps", f"{steps} is outside 1..{len(ab)}", "use e.g. 50")
        ts = inversion_schedule(ab, int(steps))  # high to low
        up = torch.cat([torch.zeros(1), sig[list(reversed(ts))].float()])  # 0, then the levels visited
        x_T = bridge.sample_with_function(model, ddim_inversion_sampler(ab, sig.float(), int(steps)), up, positive,
                                          positive, latent["samples"], cfg=1.0)
        out = {k: v for k, v in latent.items() if k != "noise_mask"}
        out["samples"] = x_T.to("cpu", torch.float32)
        return io.NodeOutput(out, torch.cat([sig[ts].float(), torch.zeros(1)]))


# --------------------------------------------------------------------------------------
class SaveRectifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_SaveRectifier", display_name="Save Rectifier", category=CATEGORY,
            description="Saves a rectifier to models/single_image_edit/rectifier as .safetensors (written "
                        "atomically, never overwriting): its weights, architecture and modulated layers, "
                        "training mode, texts and history. Load it with Load Rectifier instead of training again.",
            inputs=[
                io.Custom(RECTIFIER).Input("rectifier", tooltip="The rectifier to save."),
                io.String.Input("filename_prefix", default="rectifier",
                                tooltip="File name prefix inside models/single_image_edit/rectifier (may contain "
                                        "sub-folders); a counter is appended."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, rectifier, filename_prefix):
        if not isinstance(rectifier, TrainedRectifier):
            raise NodeInputError("rectifier", f"expected a rectifier, got {type(rectifier).__name__}",
                                 "connect Train Rectifier or Load Rectifier")
        return save_output(bridge.save_dir(FOLDER), filename_prefix,
                           lambda path: save_rectifier(rectifier.net, rectifier.info, path), "rectifier")


class LoadRectifier(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SIE_LoadRectifier", display_name="Load Rectifier", category=CATEGORY,
            description="Loads a rectifier saved by Save Rectifier from models/single_image_edit/rectifier.",
            inputs=[
                io.Combo.Input("rectifier_name", options=bridge.list_models(FOLDER),
                               tooltip="A .safetensors file written by Save Rectifier."),
            ],
            outputs=[
                io.Custom(RECTIFIER).Output(display_name="rectifier",
                                            tooltip="The saved rectifier, for Apply Rectifier or further training."),
                io.String.Output(display_name="info",
                                 tooltip="A one-line summary: mode, steps, modulated layers, texts."),
            ],
        )

    @classmethod
    def execute(cls, rectifier_name):
        try:
            path = bridge.model_path(FOLDER, rectifier_name)
            with torch.inference_mode(False):  # ordinary tensors: the rectifier may be trained further
                net, info = load_rectifier(path)
        except (FileNotFoundError, ArtifactError) as e:
            raise NodeInputError("rectifier_name", str(e), "pick a file saved by Save Rectifier") from None
        out = TrainedRectifier(net, info)
        return io.NodeOutput(out, out.describe())


NODES = [TrainRectifier, ApplyRectifier, SaveRectifier, LoadRectifier, DDIMInversion]
