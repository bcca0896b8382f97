"""The ComfyUI bridge (with ``comfy_views`` and ``comfy_guider``, the only modules that touch ComfyUI
internals); every import of ComfyUI is lazy.

What the pack uses from ComfyUI, all of it here:

* ``comfy.utils.ProgressBar`` and ``comfy.model_management`` (interrupts, devices,
  model loading) for long-running nodes, and the server's progress text:
  :class:`Progress`;
* ``folder_paths`` for the pack's model folders: :func:`list_models`,
  :func:`model_path`, :func:`save_dir`;
* ``MODEL`` / ``CLIP`` / ``VAE`` objects, seen through the core seam: :class:`ComfySD`
  (in :mod:`nodes.comfy_views`, with the views that coexist on one loaded MODEL), and
  the GUIDER base that hands per-step rules their step index (:mod:`nodes.comfy_guider`).

Outside a ComfyUI process (tests, scripts) the folder and progress helpers degrade to
no-ops or empty lists instead of failing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from ..core.fit import pace_text
from ..core.images import tensor_to_pil
from .comfy_views import ComfySD, context_dim  # noqa: F401  (re-exported: the seam over MODEL / CLIP / VAE)

# folder_paths name -> (sub-folder of ComfyUI's models dir, accepted extensions)
MODEL_FOLDERS = {
    "sie_sinddm": (os.path.join("single_image_edit", "sinddm"), {".safetensors"}),
    "sie_trained": (os.path.join("single_image_edit", "trained"), {".safetensors"}),
    "sie_sine": (os.path.join("single_image_edit", "sine"), {".safetensors"}),  # not for Load LoRA: F(v) flag
    "sie_rectifier": (os.path.join("single_image_edit", "rectifier"), {".safetensors"}),
    "sie_rectifier_encoders": (os.path.join("single_image_edit", "rectifier_encoders"), {".safetensors", ".pth"}),
    "sie_checkpoints": (os.path.join("single_image_edit", "checkpoints"), {".safetensors"}),  # <method>/ sub-folders
    "open_clip": ("open_clip", {".safetensors", ".bin", ".pt", ".pth"}),
    "sams": ("sams", {".safetensors", ".pth", ".pt"}),  # Segment Anything (shared with other packs)
}
# Folders of ours that ComfyUI's own loaders should also list (name -> ComfyUI folder name)
ALSO_REGISTER = {"sie_trained": "loras"}


def _folder_paths():
    try:
        import folder_paths  # ComfyUI's top-level module
    except ImportError:
        return None
    return folder_paths


def register_model_folders() -> bool:
    """Register the pack's folders with ComfyUI (idempotent); False outside ComfyUI.

    Paths users added for the same names in ``extra_model_paths.yaml`` are kept.
    """
    fp = _folder_paths()
    if fp is None:
        return False
    for name, (sub, exts) in MODEL_FOLDERS.items():
        default = os.path.join(fp.models_dir, sub)
        if name in fp.folder_names_and_paths:
            paths, old_exts = fp.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            fp.folder_names_and_paths[name] = (paths, set(old_exts) | exts)
        else:
            fp.folder_names_and_paths[name] = ([default], set(exts))
    for ours, theirs in ALSO_REGISTER.items():
        default = os.path.join(fp.models_dir, MODEL_FOLDERS[ours][0])
        if theirs in fp.folder_names_and_paths and default not in fp.folder_names_and_paths[theirs][0]:
            fp.folder_names_and_paths[theirs][0].append(default)
    return True


def list_models(name: str) -> list[str]:
    """File names in a registered folder, for a COMBO input ([] outside ComfyUI)."""
    if not register_model_folders():
        return []
    return list(_folder_paths().get_filename_list(name))


def model_path(name: str, file_name: str) -> str:
    """Full path of a file in a registered folder, or FileNotFoundError naming the folders."""
    if not register_model_folders():
        p = Path(file_name)
        if p.is_file():
            return str(p)
        raise FileNotFoundError(f"{file_name}: not found (no ComfyUI folder registry in this process)")
    fp = _folder_paths()
    path = fp.get_full_path(name, file_name)
    if path is None:
        raise FileNotFoundError(
            f"'{file_name}' is not in the {name} folders ({', '.join(fp.get_folder_paths(name))}); "
            "put the file there and refresh the node list"
        )
    return path


def default_dir(name: str) -> Path:
    """The first (default) folder of a registered name (not created)."""
    if register_model_folders():
        return Path(_folder_paths().get_folder_paths(name)[0])
    return Path("models") / MODEL_FOLDERS[name][0]


def save_dir(name: str) -> Path:
    """The first (default) folder of a registered name, created on demand."""
    d = default_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    return d


def output_dir() -> Path:
    fp = _folder_paths()
    return Path(fp.get_output_directory()) if fp else Path("output")


# --------------------------------------------------------------------------------------
# Progress and cancellation
# --------------------------------------------------------------------------------------
class Progress:
    """Adapter from core's ``on_step(i, total, info)`` to ComfyUI's progress bar.

    Every call is a cancellation point: ComfyUI's interrupt exception propagates out of
    the core loop (which cleans up in ``finally`` blocks).  ``info["preview"]`` (an image
    [3, H, W] in [0, 1]) is shown on the node; when the loop reports ``info["loss"]``
    instead, the node shows the loss as text and, every few seconds, the loss curve, until the
    trainer shows its own previews (:meth:`show`), which then replace the curve.
    """

    TEXT_EVERY, CURVE_EVERY = 0.5, 5.0  # seconds

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        try:
            import comfy.model_management
            import comfy.utils

            self._mm = comfy.model_management
            self._bar = comfy.utils.ProgressBar(self.total)
        except ImportError:
            self._mm = self._bar = None
        self.last_info: dict = {}
        self.losses: list[float] = []
        self._text_at = self._curve_at = 0.0
        self._step = 0
        self._previews = False  # the trainer shows previews: no loss-curve previews

    def __call__(self, i: int, total: int | None = None, info: dict | None = None) -> None:
        import time

        self.last_info = info or {}
        self._step = i
        if self._mm is not None:
            self._mm.throw_exception_if_processing_interrupted()
        if self._bar is None:
            return
        preview = None
        now = time.monotonic()
        if self.last_info.get("preview") is not None:
            preview = ("JPEG", tensor_to_pil(self.last_info["preview"]), 512)
        elif "loss" in self.last_info:
            self.losses.append(float(self.last_info["loss"]))
            if now - self._text_at >= self.TEXT_EVERY or i >= self.total:
                self._text_at = now
                pace = pace_text(self.last_info)
                _progress_text(f"step {i}/{total or self.total}  loss {self.losses[-1]:.4f}"
                               + (f"  ({pace})" if pace else ""))
            if not self._previews and now - self._curve_at >= self.CURVE_EVERY and len(self.losses) > 1:
                from ..core.plot import loss_curve

                self._curve_at = now
                preview = ("JPEG", loss_curve(self.losses, 480, 240, title="loss"), 512)
        self._bar.update_absolute(min(i, self.total), total or self.total, preview)

    def show(self, image: torch.Tensor) -> None:
        """Show ``image`` [3, H, W] in [0, 1] as the node's preview (a trainer's preview; from then on the
        loss curve is no longer shown over it)."""
        self._previews = True
        if self._bar is not None:
            self._bar.update_absolute(min(self._step, self.total), self.total, ("JPEG", tensor_to_pil(image), 512))

    def text(self, text: str) -> None:
        """Show ``text`` on the node (ComfyUI's progress text)."""
        _progress_text(text)

    def should_stop(self) -> bool:
        """Raises ComfyUI's own interrupt exception (so the server reports the prompt as
        interrupted, not failed) instead of returning True."""
        if self._mm is not None:
            self._mm.throw_exception_if_processing_interrupted()
        return False


def _progress_text(text: str) -> None:
    """Show ``text`` on the executing node (ComfyUI's progress text), when running in a server."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id, PromptServer.instance.client_id)
    except (ImportError, AttributeError):
        pass


def torch_device() -> torch.device:
    try:
        import comfy.model_management

        return comfy.model_management.get_torch_device()
    except ImportError:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    """After a node that held large tensors (training, SAM, SinDDM): collect what is unreachable, empty
    the GPU cache and hand the freed host heap back to the OS.

    glibc keeps the pages of freed small allocations (autograd's saved tensors on the CPU, optimiser
    state) in the process, and the next training node's memory check, which reads the free memory,
    would then refuse; ``malloc_trim(0)`` returns them (on Linux with glibc; a no-op elsewhere).
    """
    gc.collect()  # first, so that what it frees reaches the cache emptied below
    try:
        import comfy.model_management

        comfy.model_management.soft_empty_cache()
    except ImportError:
        pass
    trim_heap()


def trim_heap() -> bool:
    """``malloc_trim(0)``: give memory glibc keeps after frees back to the OS; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
    return True


# --------------------------------------------------------------------------------------
# MODEL checks and patches, sampling
# --------------------------------------------------------------------------------------
SUPPORTED_FAMILIES = "Stable Diffusion 1.x or SDXL (base or a fine-tune of it, epsilon prediction)"


def model_family(model) -> str:
    """"sd1" or "sdxl" for a MODEL :func:`sd_problem` accepts (call that first)."""
    unet = model.model.model_config.unet_config
    return "sdxl" if unet.get("adm_in_channels") == 2816 else "sd1"


def sd_problem(model) -> str | None:
    """None for an SD 1.x or SDXL epsilon-prediction MODEL, else what it is (family, width, prediction)."""
    try:
        base = model.model
        config = base.model_config
    except AttributeError:
        return f"not a ComfyUI MODEL ({type(model).__name__})"
    name = type(config).__name__
    unet = getattr(config, "unet_config", {}) or {}
    ctx, cin, adm = unet.get("context_dim"), unet.get("in_channels"), unet.get("adm_in_channels")
    model_type = getattr(getattr(base, "model_type", None), "name", "?")
    sd1 = ctx == 768 and not adm
    sdxl = ctx == 2048 and adm == 2816  # SDXL base and its fine-tunes (the refiner is 1280 / 2560)
    if not (sd1 or sdxl) or cin != 4 or model_type != "EPS":
        return f"a {name} model (context {ctx}, {cin} input channels, {model_type} prediction)"
    return None


def apply_delta(model, delta: Mapping[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``model`` with a LoRA-layout delta applied as ComfyUI weight patches.

    Uses ComfyUI's own LoRA loading (what LoraLoaderModelOnly does), so a saved delta
    loaded by the native node gives exactly the same MODEL.
    """
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, dict(delta), float(strength), 0.0)
    return patched


def apply_delta_with_clip(model, clip, delta: Mapping[str, torch.Tensor], strength: float = 1.0):
    """(MODEL, CLIP) clones with a LoRA-layout delta (UNet and text-encoder keys) applied, by
    ComfyUI's own LoRA loading (what LoraLoader does); ``clip`` None: the MODEL only."""
    import comfy.sd

    if clip is None:
        return apply_delta(model, delta, strength), None
    return comfy.sd.load_lora_for_models(model, clip, dict(delta), float(strength), float(strength))


def sampler_names() -> list[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS)
    except ImportError:
        return ["ddim"]


def scheduler_names() -> list[str]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return ["ddim_uniform"]


def ksample(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
            scheduler: str, noise: torch.Tensor | None = None, callback=None) -> torch.Tensor:
    """ComfyUI's own sampling (what KSampler runs) with given starting noise; returns samples."""
    import comfy.sample

    samples = latent["samples"]
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    if noise is None:
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                               denoise=1.0, noise_mask=latent.get("noise_mask"), callback=callback,
                               disable_pbar=True, seed=seed)


def sample_with_function(model, sampler_function, sigmas: torch.Tensor, positive, negative, samples: torch.Tensor,
                         cfg: float = 1.0) -> torch.Tensor:
    """ComfyUI's sampling machinery (what SamplerCustom runs: the CFGGuider with its conditioning, patches and
    model wrappers) with our own k-diffusion-style ``sampler_function(model, x, sigmas, extra_args=...)``,
    zero added noise and ``samples`` as the latent image; returns what the function returns."""
    import comfy.sample
    import comfy.samplers

    sampler = comfy.samplers.KSAMPLER(sampler_function)
    return comfy.sample.sample_custom(model, torch.zeros_like(samples), float(cfg), sampler, sigmas, positive,
                                      negative, samples, disable_pbar=True, seed=0)


def prepare_noise(samples: torch.Tensor, seed: int) -> torch.Tensor:
    import comfy.sample

    return comfy.sample.prepare_noise(samples, seed)


def guider_sample(guider, latent: dict, seed: int, steps: int, sampler_name: str, scheduler: str,
                  noise: torch.Tensor, callback=None) -> torch.Tensor:
    """What SamplerCustomAdvanced runs (KSamplerSelect + BasicScheduler at denoise 1) with a GUIDER
    and given starting noise; returns the samples."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers

    samples = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent["samples"])
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), scheduler,
                                             int(steps)).cpu()
    sampler = comfy.samplers.sampler_object(sampler_name)

    def cb(step, x0, x, total):
        if callback is not None:
            callback(step, x0, x, total)

    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"), callback=cb,
                        disable_pbar=True, seed=int(seed))
    return out.to(comfy.model_management.intermediate_device())

