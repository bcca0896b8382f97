"""Offline loading of pixel-space DDPMs (diffusers ``UNet2DModel``).

These are the unconditional 256x256 DDPMs of Ho et al. 2020 as published in the
diffusers layout (google/ddpm-celebahq-256, -church-256, -bedroom-256, ...) and
models trained or fine-tuned by the pack.  Accepted layouts, all read from local files:

* a **model folder**: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or
  ``.bin``, an ``fp16`` variant, or a sharded ``*.safetensors.index.json``), with
  ``scheduler_config.json`` beside it or in ``../scheduler/`` of a pipeline;
* a **pipeline folder**: ``model_index.json`` with ``unet/`` and ``scheduler/``
  subfolders (what ``DDPMPipeline.save_pretrained`` writes);
* a **single file**: a ``.safetensors`` whose header metadata holds the UNet config as
  JSON under ``"config"`` (and optionally ``"scheduler"`` / ``"alphas_cumprod"``, as
  :func:`save_pixel_unet` writes), or any weight file with a ``config.json`` beside it.

Why not ``UNet2DModel.from_pretrained``: it may reach for the hub, and for ``.bin``
files it may unpickle arbitrary objects.  Here the module is built from its config with
``from_config`` (on the meta device, so nothing is initialised twice), the tensors are
read with safetensors or with ``torch.load(weights_only=True)``, and the state dict is
checked key by key and shape by shape before it is assigned.  Everything that is not a
pixel-space ``UNet2DModel`` (Stable Diffusion checkpoints and folders, LoRAs,
class-conditional or score-SDE models, pickles of custom objects, corrupt files) is
refused with a :class:`PixelModelError` that names the file and says what to do.

The noise schedule comes back as ``alphas_cumprod`` (float64 [T], CPU), built from the
scheduler config (``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2 /
sigmoid, or ``trained_betas``); without one, DDPMScheduler's defaults are used
(linear 1e-4..0.02, T = 1000).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.artifact_io import atomic_save_safetensors
from core.diffusion import alphas_cumprod as _cumprod
from core.diffusion import cosine_betas, scaled_linear_betas

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_NAMES = (  # in order of preference inside a model folder
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
SHARD_INDEX_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
)
# DDPMScheduler's defaults, used when no scheduler config is found.
DEFAULT_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
# Old diffusers attention blocks (<= 0.13) named their projections differently.
_LEGACY_ATTENTION = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


class PixelModelError(ValueError):
    """A path that is not a loadable pixel-space DDPM; the message names it and the fix."""


# --------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PixelModelError(f"{path}: cannot read this JSON file ({e}); restore it from the model's source.") from None
    if not isinstance(data, dict):
        raise PixelModelError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def _parse_meta_json(raw: str, key: str, path: Path) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise PixelModelError(f"{path}: header metadata {key!r} is not valid JSON ({e}).") from None


def _read_safetensors(path: Path, keys: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; ``keys`` restricts what is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            wanted = list(f.keys()) if keys is None else list(keys)
            tensors = {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError) as e:
        raise PixelModelError(
            f"{path}: not a readable safetensors file ({e}). It may be truncated, corrupt or another format "
            "renamed to .safetensors; download or convert it again."
        ) from None
    return tensors, meta


def _read_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a .bin/.pt/.pth/.ckpt file, never unpickling custom objects."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PixelModelError(
            f"{path}: this file needs unpickling of arbitrary Python objects, which the pack refuses "
            f"(torch.load weights_only=True failed: {str(e).splitlines()[0]}). Convert it to .safetensors "
            "in a trusted environment and load that file."
        ) from None
    except Exception as e:  # zip/pickle corruption surfaces as RuntimeError, EOFError, ...
        raise PixelModelError(f"{path}: cannot read this PyTorch file ({type(e).__name__}: {e}).") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PixelModelError(
            f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}; "
            "save the UNet's state_dict() or use save_pixel_unet."
        )
    return dict(obj)


def _refuse_foreign_keys(keys: Iterable[str], path: Path) -> None:
    """Recognise Stable Diffusion checkpoints and LoRAs from their tensor names."""
    keys = list(keys)
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        raise PixelModelError(
            f"{path}: a Stable Diffusion single-file checkpoint (keys 'model.diffusion_model.*'), i.e. a "
            "text-conditioned latent model, not a pixel-space DDPM. Load it with the Stable Diffusion loader "
            "(ComfyUI's 'Load Checkpoint') instead."
        )
    lora = [k for k in keys if "lora_" in k]
    if lora:
        raise PixelModelError(
            f"{path}: a LoRA ({len(lora)} 'lora_' tensors, e.g. {lora[0]!r}), not a full model. "
            "Load the base model and apply the LoRA with a LoRA loader."
        )


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
def _check_unet_config(config: Mapping, source: Path) -> dict:
    cls = config.get("_class_name")
    if cls is None and "cross_attention_dim" in config:
        cls = "UNet2DConditionModel"
    if cls == "UNet2DConditionModel":
        raise PixelModelError(
            f"{source}: a UNet2DConditionModel config, i.e. a text-conditioned latent UNet (Stable Diffusion "
            "family), not a pixel-space DDPM. Load it as Stable Diffusion instead."
        )
    if cls is not None and cls != "UNet2DModel":
        hint = " (a scheduler config: point at the model folder instead)" if str(cls).endswith("Scheduler") else ""
        raise PixelModelError(f"{source}: config of a {cls}{hint}; the pixel loader needs a UNet2DModel.")
    if "down_block_types" not in config or "block_out_channels" not in config:
        raise PixelModelError(
            f"{source}: not a UNet2DModel config (no down_block_types/block_out_channels)."
        )
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise PixelModelError(
            f"{source}: a class-conditional UNet2DModel (num_class_embeds={config.get('num_class_embeds')}, "
            f"class_embed_type={config.get('class_embed_type')}); class-conditional models are not supported. "
            "Use an unconditional pixel-space DDPM."
        )
    return dict(config)


def alphas_cumprod_from_config(
    scheduler_config: Mapping | None, source: str | os.PathLike = "scheduler config"
) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) from a diffusers scheduler config, float64 [T] on the CPU.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (linear,
    scaled_linear, squaredcos_cap_v2, sigmoid) or ``trained_betas``; missing entries take
    DDPMScheduler's defaults, ``None`` means DDPMScheduler's default schedule.
    """
    cfg = {**DEFAULT_SCHEDULER, **{k: v for k, v in (scheduler_config or {}).items() if v is not None}}
    cls = str(cfg.get("_class_name", ""))
    if cls.startswith(("ScoreSdeVe", "KarrasVe")) or ("sigma_max" in cfg and "beta_schedule" not in (scheduler_config or {})):
        raise PixelModelError(
            f"{source}: a variance-exploding score-SDE scheduler ({cls or 'sigma_min/sigma_max'}); "
            "the pixel loader supports DDPM (variance-preserving) models only."
        )
    if cfg.get("rescale_betas_zero_snr"):
        raise PixelModelError(
            f"{source}: rescale_betas_zero_snr=True gives alpha_bar = 0 at the last step, which the pack's "
            "epsilon-prediction samplers cannot use."
        )
    try:
        if cfg.get("trained_betas") is not None:
            betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten()  # [T]
        else:
            T = int(cfg["num_train_timesteps"])
            b0, b1 = float(cfg["beta_start"]), float(cfg["beta_end"])
            if T < 1:
                raise ValueError(f"num_train_timesteps={T}")
            schedule = cfg["beta_schedule"]
            if schedule == "linear":
                betas = torch.linspace(b0, b1, T, dtype=torch.float64)
            elif schedule == "scaled_linear":
                betas = scaled_linear_betas(T, b0, b1)
            elif schedule == "squaredcos_cap_v2":
                betas = cosine_betas(T)
            elif schedule == "sigmoid":
                betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (b1 - b0) + b0
            else:
                raise PixelModelError(
                    f"{source}: beta_schedule {schedule!r} is not supported; use linear, scaled_linear, "
                    "squaredcos_cap_v2 or sigmoid."
                )
    except PixelModelError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise PixelModelError(f"{source}: invalid scheduler config ({e}).") from None
    if betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
        raise PixelModelError(f"{source}: the betas must lie in (0, 1) and there must be at least one.")
    return _cumprod(betas)  # float64 [T]


def _alphas_from_metadata(meta: Mapping[str, str], path: Path) -> torch.Tensor | None:
    if "alphas_cumprod" not in meta:
        return None
    values = _parse_meta_json(meta["alphas_cumprod"], "alphas_cumprod", path)
    try:
        a = torch.tensor(values, dtype=torch.float64)  # [T]
    except (TypeError, ValueError) as e:
        raise PixelModelError(f"{path}: header metadata 'alphas_cumprod' is not a list of numbers ({e}).") from None
    if a.ndim != 1 or a.numel() == 0 or not bool(((a > 0) & (a <= 1)).all()):
        raise PixelModelError(f"{path}: header metadata 'alphas_cumprod' must be a non-empty list in (0, 1].")
    return a


def _scheduler_beside(folder: Path) -> Path | None:
    """scheduler_config.json next to the weights, or in ../scheduler/ of a pipeline folder."""
    for candidate in (folder / "scheduler_config.json", folder.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file() and (candidate.parent == folder or (folder.parent / "model_index.json").is_file()):
            return candidate
    return None


def _schedule(scheduler_file: Path | None) -> torch.Tensor:
    if scheduler_file is None:
        log.info("no scheduler config found; using DDPMScheduler defaults (linear 1e-4..0.02, T=1000)")
        return alphas_cumprod_from_config(None)
    return alphas_cumprod_from_config(_read_json(scheduler_file), scheduler_file)


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------
def _folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in SHARD_INDEX_NAMES:
        index_file = folder / name
        if index_file.is_file():
            weight_map = _read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PixelModelError(f"{index_file}: no 'weight_map' in this shard index.")
            tensors: dict[str, torch.Tensor] = {}
            by_shard: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                by_shard.setdefault(shard, []).append(key)
            for shard, keys in by_shard.items():
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise PixelModelError(f"{index_file}: shard {shard} is missing; download it again.")
                tensors.update(_read_safetensors(shard_path, keys)[0])
            return tensors
    for name in WEIGHT_NAMES:
        weights = folder / name
        if weights.is_file():
            return _read_weight_file(weights)[0]
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise PixelModelError(
        f"{folder}: config.json but no weights (looked for {', '.join(WEIGHT_NAMES)}; found {present or 'nothing'})."
    )


def _read_weight_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, meta = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        tensors, meta = _read_pickle_weights(path), {}
    else:
        raise PixelModelError(
            f"{path}: unsupported file type {suffix or '(none)'}; give a .safetensors file, a diffusers model "
            "folder (config.json + weights) or a pipeline folder (model_index.json)."
        )
    _refuse_foreign_keys(tensors, path)
    return tensors, meta


def _rename_legacy_attention(state: dict[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map pre-0.14 attention names (query/key/value/proj_attn) onto to_q/to_k/to_v/to_out.0."""
    blocks = [name for name, m in unet.named_modules() if getattr(m, "_from_deprecated_attn_block", False)]
    if not blocks:
        return state
    renames: dict[str, str] = {}
    for block in blocks:
        for old, new in _LEGACY_ATTENTION.items():
            for leaf in ("weight", "bias"):
                renames[f"{block}.{old}.{leaf}"] = f"{block}.{new}.{leaf}"
    return {renames.get(k, k): v for k, v in state.items()}


def _assign_weights(unet: torch.nn.Module, state: dict[str, torch.Tensor], source: Path,
                    dtype: torch.dtype) -> None:
    """Strictly check names and shapes, then assign the tensors (cast to ``dtype``) to ``unet``."""
    state = _rename_legacy_attention(state, unet)
    expected = unet.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise PixelModelError(
            f"{source}: the weights do not match the UNet2DModel config: {'; '.join(parts)}. "
            "The weights and config.json must come from the same model."
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        examples = ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:3]
        )
        raise PixelModelError(
            f"{source}: {len(wrong)} tensors have a shape the config does not expect (file vs model: {examples}). "
            "The weights and config.json must come from the same model."
        )
    # copy=True: fresh, aligned allocations (tensors read from a file may sit at unaligned offsets, which
    # makes oneDNN pick other kernels and outputs differ from the saved module's in the last bits)
    state = {k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    unet.load_state_dict(state, strict=True, assign=True)


def _build(config: dict, source: Path) -> UNet2DModel:
    """The module from its config on the meta device (no initialisation), or on the CPU if it has extra buffers."""
    from diffusers import UNet2DModel

    try:
        with torch.device("meta"):
            unet = UNet2DModel.from_config(config)
    except Exception as e:  # diffusers raises ValueError/TypeError/KeyError for inconsistent configs
        raise PixelModelError(f"{source}: cannot build a UNet2DModel from this config ({type(e).__name__}: {e}).") from None
    saved = set(unet.state_dict())
    if any(n not in saved for n, _ in [*unet.named_parameters(), *unet.named_buffers()]):
        unet = UNet2DModel.from_config(config)  # a non-persistent buffer would stay on meta
    return unet


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def load_pixel_unet(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[UNet2DModel, torch.Tensor]:
    """Load a pixel-space DDPM: (UNet2DModel in eval mode without gradients, alphas_cumprod float64 [T] on the CPU).

    ``path`` is a model folder, a pipeline folder or a single weight file (see the module
    docstring).  ``device`` defaults to the CPU and ``dtype`` to float32.  Raises
    :class:`PixelModelError` for anything that is not a pixel-space UNet2DModel.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise PixelModelError(f"{p}: no such file or folder; check the path (models live in ComfyUI's models folder).")
    dtype = torch.float32 if dtype is None else dtype

    if p.is_dir():
        folder, scheduler_file = p, None
        index = p / "model_index.json"
        if index.is_file() or (p / "unet" / "config.json").is_file():
            components = _read_json(index) if index.is_file() else {}
            unet_entry = components.get("unet")
            if isinstance(unet_entry, list) and len(unet_entry) == 2 and unet_entry[1] == "UNet2DConditionModel":
                raise PixelModelError(
                    f"{p}: a {components.get('_class_name', 'diffusers')} pipeline whose UNet is a "
                    "UNet2DConditionModel (text-conditioned latent UNet). Load it as Stable Diffusion instead."
                )
            if "vae" in components or "vqvae" in components:
                raise PixelModelError(
                    f"{p}: a latent diffusion pipeline (it has a VAE); the pixel loader needs a pixel-space DDPM "
                    "pipeline (unet + scheduler only)."
                )
            folder = p / "unet"
            if not (folder / "config.json").is_file():
                raise PixelModelError(f"{p}: a pipeline folder without unet/config.json; download the unet/ folder.")
            sched = p / "scheduler" / "scheduler_config.json"
            scheduler_file = sched if sched.is_file() else None
        elif (p / "config.json").is_file():
            scheduler_file = _scheduler_beside(p)
        else:
            files = sorted(q.name for q in p.glob("*.safetensors"))
            hint = f" To load a single file, point at it (e.g. {p / files[0]})." if files else ""
            raise PixelModelError(
                f"{p}: no config.json or model_index.json here, so this is not a diffusers model or pipeline folder."
                + hint
            )
        config_file = folder / "config.json"
        config = _check_unet_config(_read_json(config_file), config_file)
        alphas = _schedule(scheduler_file)
        state = _folder_weights(folder)
        source = folder
    else:
        state, meta = _read_weight_file(p)
        if "config" in meta:
            raw = _parse_meta_json(meta["config"], "config", p)
            if not isinstance(raw, dict):
                raise PixelModelError(f"{p}: header metadata 'config' must be a JSON object.")
            config = _check_unet_config(raw, p)
        elif (p.parent / "config.json").is_file():
            config = _check_unet_config(_read_json(p.parent / "config.json"), p.parent / "config.json")
        else:
            raise PixelModelError(
                f"{p}: no UNet config: the file's header has no 'config' metadata and there is no config.json "
                "beside it. Put the model's config.json next to the file (or save it with save_pixel_unet)."
            )
        alphas = _alphas_from_metadata(meta, p)
        if alphas is None and "scheduler" in meta:
            sched = _parse_meta_json(meta["scheduler"], "scheduler", p)
            if not isinstance(sched, dict):
                raise PixelModelError(f"{p}: header metadata 'scheduler' must be a JSON object.")
            alphas = alphas_cumprod_from_config(sched, p)
        if alphas is None:
            alphas = _schedule(_scheduler_beside(p.parent))
        source = p

    unet = _build(config, source)
    _assign_weights(unet, state, source, dtype)
    unet = unet.to(device=device if device is not None else "cpu").eval()
    unet.requires_grad_(False)
    return unet, alphas


def _config_dict(unet: UNet2DModel) -> dict[str, Any]:
    """The UNet's public config plus its class name, JSON-serialisable."""
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    return {"_class_name": type(unet).__name__, **cfg}


def save_pixel_unet(
    unet: UNet2DModel,
    path: str | os.PathLike,
    alphas_cumprod: torch.Tensor | None = None,
    scheduler_config: dict | None = None,
) -> Path:
    """Write ``unet`` as one ``.safetensors`` file that :func:`load_pixel_unet` reads back alone.

    The header metadata holds ``"config"`` (the UNet config, JSON), and when given
    ``"scheduler"`` (the scheduler config, JSON) and ``"alphas_cumprod"`` (a JSON list of
    T floats, which round-trips exactly and takes precedence on load).  The write is
    atomic.  Returns the path written.
    """
    from diffusers import UNet2DModel

    if not isinstance(unet, UNet2DModel):
        raise TypeError(f"save_pixel_unet needs a UNet2DModel, got {type(unet).__name__}")
    metadata = {"format": "pt", "config": json.dumps(_config_dict(unet))}
    if scheduler_config is not None:
        metadata["scheduler"] = json.dumps(dict(scheduler_config))
    if alphas_cumprod is not None:
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)  # [T]
        if a.ndim != 1 or a.numel() == 0 or not bool(((a > 0) & (a <= 1)).all()):
            raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1]")
        metadata["alphas_cumprod"] = json.dumps(a.tolist())
    tensors = {k: v.detach().to("cpu") for k, v in unet.state_dict().items()}
    return atomic_save_safetensors(tensors, path, metadata=metadata)


def save_pixel_folder(
    unet: UNet2DModel, folder: str | os.PathLike, scheduler_config: dict | None = None
) -> Path:
    """Write a diffusers model folder: config.json + diffusion_pytorch_model.safetensors + scheduler_config.json.

    Without ``scheduler_config`` the scheduler file holds DDPMScheduler's defaults, so the
    folder is self-describing.  Returns the folder.
    """
    folder = Path(folder)
    unet.save_pretrained(str(folder), safe_serialization=True)
    sched = {**DEFAULT_SCHEDULER, **(scheduler_config or {})}
    (folder / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
    return folder
