"""The only module that touches ComfyUI internals; every import of ComfyUI is lazy.

What the pack uses from ComfyUI, all of it here:

* ``comfy.utils.ProgressBar`` and ``comfy.model_management`` (interrupts, devices,
  model loading) for long-running nodes, and the server's progress text:
  :class:`Progress`;
* ``folder_paths`` for the pack's model folders: :func:`list_models`,
  :func:`model_path`, :func:`save_dir`;
* ``MODEL`` / ``CLIP`` / ``VAE`` objects, seen through the core seam: :class:`ComfySD`.

Outside a ComfyUI process (tests, scripts) the folder and progress helpers degrade to
no-ops or empty lists instead of failing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

# folder_paths name -> (sub-folder of ComfyUI's models dir, accepted extensions)
MODEL_FOLDERS = {
    "sie_sinddm": (os.path.join("single_image_edit", "sinddm"), {".safetensors"}),
    "sie_trained": (os.path.join("single_image_edit", "trained"), {".safetensors"}),
    "open_clip": ("open_clip", {".safetensors", ".bin", ".pt", ".pth"}),
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


def save_dir(name: str) -> Path:
    """The first (default) folder of a registered name, created on demand."""
    if register_model_folders():
        d = Path(_folder_paths().get_folder_paths(name)[0])
    else:
        d = Path("models") / MODEL_FOLDERS[name][0]
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
    instead, the node shows the loss as text and, every few seconds, the loss curve.
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

    def __call__(self, i: int, total: int | None = None, info: dict | None = None) -> None:
        import time

        self.last_info = info or {}
        if self._mm is not None:
            self._mm.throw_exception_if_processing_interrupted()
        if self._bar is None:
            return
        preview = None
        now = time.monotonic()
        if self.last_info.get("preview") is not None:
            preview = ("JPEG", _to_pil(self.last_info["preview"]), 512)
        elif "loss" in self.last_info:
            self.losses.append(float(self.last_info["loss"]))
            if now - self._text_at >= self.TEXT_EVERY or i >= self.total:
                self._text_at = now
                _progress_text(f"step {i}/{total or self.total}  loss {self.losses[-1]:.4f}")
            if now - self._curve_at >= self.CURVE_EVERY and len(self.losses) > 1:
                from ..core.plot import loss_curve

                self._curve_at = now
                preview = ("JPEG", loss_curve(self.losses, 480, 240, title="loss"), 512)
        self._bar.update_absolute(min(i, self.total), total or self.total, preview)

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


def _to_pil(x: torch.Tensor):
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1).movedim(0, -1).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def torch_device() -> torch.device:
    try:
        import comfy.model_management

        return comfy.model_management.get_torch_device()
    except ImportError:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def free_memory() -> None:
    try:
        import comfy.model_management

        comfy.model_management.soft_empty_cache()
    except ImportError:
        pass


# --------------------------------------------------------------------------------------
# The seam over ComfyUI's MODEL / CLIP / VAE
# --------------------------------------------------------------------------------------
class ComfySD:
    """:class:`core.seam.LatentDiffusion` over a ComfyUI MODEL (ModelPatcher), CLIP and VAE.

    ``eps`` runs through ``BaseModel.apply_model`` with the patcher's
    ``transformer_options``, so weight patches, weight wrappers and model patches set on
    the MODEL apply.  The variance-preserving x_t of the seam is converted to ComfyUI's
    sigma parameterisation (x = x_t / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) /
    alpha_bar)) and the denoised output back to epsilon.  ``encode`` crops images to a
    multiple of 8 as ComfyUI's VAE does.
    """

    def __init__(self, model, clip=None, vae=None):
        import comfy.model_management

        self.model, self.clip, self.vae = model, clip, vae
        self._mm = comfy.model_management
        ms = model.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().to("cpu", torch.float64)
        self._alphas_cumprod = 1.0 / (sigmas**2 + 1.0)
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._mm.load_models_gpu([self.model])
            self._loaded = True

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    @property
    def device(self) -> torch.device:
        return self.model.load_device

    @property
    def context_dim(self) -> int:
        return int(self.model.model.model_config.unet_config.get("context_dim") or 0)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, **extra) -> torch.Tensor:
        self._load()
        a = self._alphas_cumprod.to(x_t.device)[t.long().to(x_t.device)]  # [B] float64
        sigma = ((1 - a) / a).sqrt().to(torch.float32)
        x = x_t / a.sqrt().to(x_t.dtype).view(-1, 1, 1, 1)
        options = dict(self.model.model_options.get("transformer_options", {}))
        den = self.model.model.apply_model(x, sigma, c_crossattn=cond, transformer_options=options, **extra)
        return ((x - den) / sigma.view(-1, 1, 1, 1)).to(x_t.dtype)

    def trainable_module(self) -> torch.nn.Module:
        return self.model.model.diffusion_model

    def unet_parameters(self) -> dict[str, torch.Tensor]:
        return dict(self.model.model.diffusion_model.named_parameters())

    @contextmanager
    def adapted(self, weight_functions: Mapping, gradient_checkpointing: bool = False) -> Iterator["ComfySD"]:
        """A view over a *clone* of the MODEL with ComfyUI weight wrappers.

        Each function is attached with ``ModelPatcher.add_weight_wrapper`` (ComfyUI's own
        mechanism for trainable adapters): the shared module's weights are never written,
        ComfyUI applies the wrappers while the clone is loaded and drops them when another
        patcher of the model loads.  Functions with ``output_delta`` (LoRA) are applied to
        the layer's output through an object patch of its ``forward`` instead (no full-size
        weight gradient), also undone on unload.  *Every* weight gets a wrapper that sees a detached
        copy: ComfyUI loads weights inside inference mode (they cannot be saved for
        backward) and with requires_grad set (they must not collect gradients); a wrapped
        layer computes with an ordinary per-call copy instead.  Gradient checkpointing
        wraps the forward of every block (object patches, also undone on unload).
        """
        import comfy.model_management

        dm = self.model.model.diffusion_model
        params = dict(dm.named_parameters())
        unknown = sorted(set(weight_functions) - set(params))
        if unknown:
            raise KeyError(f"no such UNet parameters: {unknown[:3]}")
        clone = self.model.clone()
        modules = dict(dm.named_modules())
        for name in params:
            path, leaf = name.rsplit(".", 1)
            owner = modules[path]
            if not hasattr(owner, "weight_function"):
                raise RuntimeError(f"cannot adapt {name}: its layer ({type(owner).__name__}) is not a ComfyUI op")
            fn = weight_functions.get(name)
            if fn is not None and hasattr(fn, "output_delta") and leaf == "weight":
                clone.add_object_patch(f"diffusion_model.{path}.forward", _OutputDelta(owner, fn))
                fn = None
            clone.add_weight_wrapper(f"diffusion_model.{name}", _Detached(fn))
        if gradient_checkpointing:
            for path, module in _blocks(dm):
                clone.add_object_patch(f"diffusion_model.{path}.forward", _checkpointed(module.forward))
        comfy.model_management.load_models_gpu([clone], memory_required=1e20, force_full_load=True)
        try:
            yield ComfySD(clone, self.clip, self.vae)
        finally:
            _unload(clone, dm)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this ComfySD has no VAE")
        raw = self.vae.encode(image.movedim(1, -1)[..., :3])
        return self.model.model.process_latent_in(raw.to(self.device)).float()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("this ComfySD has no VAE")
        img = self.vae.decode(self.model.model.process_latent_out(latent))
        return img.reshape(-1, *img.shape[-3:]).movedim(-1, 1).float()

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.clip is None:
            raise ValueError("this ComfySD has no CLIP")
        if isinstance(prompts, str):
            prompts = [prompts]
        conds = [self.clip.encode_from_tokens(self.clip.tokenize(p)) for p in prompts]
        return torch.cat(conds, 0).float()


class _Detached:
    """Weight wrapper: ``fn(W.detach())`` (or the detached copy itself when ``fn`` is None)."""

    def __init__(self, fn=None):
        self.fn = fn

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach()
        return w if self.fn is None else self.fn(w)

    def move_to(self, device=None) -> int:
        """ComfyUI moves weight functions with the model; returns the bytes moved."""
        if isinstance(self.fn, torch.nn.Module) and device is not None:
            self.fn.to(device)
            return sum(p.numel() * p.element_size() for p in self.fn.parameters())
        return 0


def _unload(clone, module: torch.nn.Module) -> None:
    """Unload a training clone now (not whenever ComfyUI next needs the memory), so that
    the trainable tensors its wrappers hold are freed, and drop our wrappers from the
    shared layers (ComfyUI resets these lists on the next load anyway)."""
    import comfy.model_management as mm

    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is clone:
            mm.current_loaded_models.pop(i).model_unload()
            break
    for m in module.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(m, attr, None)
            if fns and any(isinstance(f, _Detached) for f in fns):
                setattr(m, attr, [f for f in fns if not isinstance(f, _Detached)])


class _OutputDelta:
    """Object patch for a layer's ``forward``: y = forward(x) + fn.output_delta(layer, x)."""

    def __init__(self, layer: torch.nn.Module, fn):
        self.forward, self.layer, self.fn = layer.forward, layer, fn

    def __call__(self, x, *args, **kwargs):
        return self.forward(x, *args, **kwargs) + self.fn.output_delta(self.layer, x)


def _checkpointed(forward):
    import torch.utils.checkpoint

    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _blocks(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.nn.Module]]:
    """The outermost non-container sub-modules (ResBlocks, transformers, resamplers...)."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            yield from _blocks(child, path + ".")
        else:
            yield path, child


# --------------------------------------------------------------------------------------
# MODEL checks and patches, sampling
# --------------------------------------------------------------------------------------
def sd1_problem(model) -> str | None:
    """None for an SD 1.x epsilon-prediction MODEL, else what it is."""
    try:
        base = model.model
        config = base.model_config
    except AttributeError:
        return f"not a ComfyUI MODEL ({type(model).__name__})"
    name = type(config).__name__
    unet = getattr(config, "unet_config", {}) or {}
    ctx, cin = unet.get("context_dim"), unet.get("in_channels")
    model_type = getattr(getattr(base, "model_type", None), "name", "?")
    if ctx != 768 or cin != 4 or model_type != "EPS" or unet.get("adm_in_channels"):
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


def prepare_noise(samples: torch.Tensor, seed: int) -> torch.Tensor:
    import comfy.sample

    return comfy.sample.prepare_noise(samples, seed)
