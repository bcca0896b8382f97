"""Offline Stable Diffusion 1.x and SDXL loading with diffusers modules.

Two sources, both read entirely from local files:

* a single-file checkpoint in the original layout (``models/checkpoints/*.safetensors``):
  the header is inspected first (:mod:`core.sd.checkpoint`), the modules are built from
  the configs shipped in ``configs/sd15`` or ``configs/sdxl`` and the tensors are renamed
  with :mod:`core.sd.keymap`;
* a diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``
  (SDXL: also ``text_encoder_2/``) and optionally the tokenizers), read with
  ``from_pretrained(local_files_only=True)``.

:func:`load_sd` reads which family a file or folder is and loads it; :func:`load_sd15` and
:func:`load_sdxl` load one family and refuse the other.

Nothing here touches the network: configs and tokenizer files come with the pack.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import SUPPORTED, CheckpointError, inspect_checkpoint, require_sd1, require_sdxl
from .keymap import to_diffusers, to_diffusers_xl

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"
XL_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sdxl"


def read_config(component: str, root: Path = CONFIG_DIR) -> dict:
    """The JSON config of one component ("unet", "vae", "text_encoder", "scheduler")."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((root / component / name).read_text(encoding="utf-8"))


def build_modules(unet_config: dict, vae_config: dict, text_config: dict, device: str | torch.device = "meta"):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) from configs, on ``device``.

    On the meta device no memory is allocated; load weights with
    ``load_state_dict(..., assign=True)`` and then :func:`materialize_buffers`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in text_config.items() if not k.startswith("_")}
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text = CLIPTextModel(CLIPTextConfig(**cfg))
    return unet, vae, text


def materialize_buffers(module: torch.nn.Module) -> None:
    """Recreate the non-persistent buffers that a meta-device build leaves empty.

    The only one in SD 1.x's modules is CLIP's ``position_ids`` (0..76); anything else
    left on the meta device is a loading bug and raises.
    """
    for mod_name, mod in module.named_modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None or buf.device.type != "meta":
                continue
            if name == "position_ids":
                n = buf.shape[-1]
                mod._buffers[name] = torch.arange(n).expand(buf.shape).clone()
            else:
                raise RuntimeError(f"buffer {mod_name}.{name} was not loaded")
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            raise RuntimeError(f"parameter {name} was not loaded")


class _Lazy(dict):
    """A safetensors file as a mapping that reads a tensor only when the key map asks for it."""

    def __init__(self, f, keys):
        super().__init__()
        self._f, self._keys = f, list(keys)
        self._set = set(self._keys)

    def __contains__(self, k):
        return k in self._set

    def __getitem__(self, k):
        return self._f.get_tensor(k)

    def keys(self):
        return list(self._keys)


def load_single_file_modules(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", config_dir: str | os.PathLike | None = None
):
    """(unet, vae, text_encoder) from an SD 1.x single-file checkpoint (.safetensors).

    ``config_dir`` holds unet/vae/text_encoder configs (default: the shipped SD 1.5 ones).
    """
    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    ucfg, vcfg, tcfg = read_config("unet", root), read_config("vae", root), read_config("text_encoder", root)
    require_sd1(inspect_checkpoint(path), context_dim=ucfg["cross_attention_dim"])
    modules = build_modules(ucfg, vcfg, tcfg, "meta")
    return _fill(path, "SD 1.x", modules, (dtype,) * 3, to_diffusers, ucfg, vcfg, device)


def _fill(path, family: str, modules, dtypes, to_layout, ucfg: dict, vcfg: dict, device) -> tuple:
    """Load a single file's tensors into ``modules`` (built on the meta device): ``to_layout`` maps the
    original keys to each module's, a missing tensor is named, shapes are checked, each module gets its dtype."""
    from safetensors import safe_open

    targets = [m.state_dict().keys() for m in modules]
    with safe_open(str(path), framework="pt", device="cpu") as f:
        *sds, missing = to_layout(_Lazy(f, f.keys()), *targets, ucfg, vcfg)
    if missing:
        raise CheckpointError(
            f"{Path(path).name}: an {family} checkpoint with {len(missing)} tensors missing "
            f"(first: {', '.join(missing[:3])}). The file is incomplete or was saved by an unusual tool."
        )
    _assign(tuple(zip(modules, sds, dtypes)), Path(path).name, family)
    return tuple(m.to(device).eval() for m in modules)


def _assign(parts, file_name: str, family: str) -> None:
    """Load each (module, state dict, dtype) in place (meta -> real tensors), shapes checked first."""
    for module, sd, dt in parts:
        sd = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()}
        _check_shapes(module, sd, file_name, family)
        module.load_state_dict(sd, strict=True, assign=True)
        materialize_buffers(module)


def _check_shapes(module: torch.nn.Module, sd: dict[str, torch.Tensor], file_name: str, family: str = "SD 1.x") -> None:
    expected = module.state_dict()
    for k, v in sd.items():
        if tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{file_name}: tensor for {k} has shape {tuple(v.shape)}, {family} expects "
                f"{tuple(expected[k].shape)}; this is not a standard {family} checkpoint."
            )


def vae_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in float16 (diffusers' ``force_upcast``): it stays float32 then."""
    return torch.float32 if dtype == torch.float16 else dtype


def load_single_file_modules_xl(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu",
                                config_dir: str | os.PathLike | None = None):
    """(unet, vae, text_encoder, text_encoder_2) from an SDXL single-file checkpoint (.safetensors).

    ``config_dir`` holds unet/vae/text_encoder/text_encoder_2 configs (default: the shipped SDXL ones)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    root = Path(config_dir) if config_dir is not None else XL_CONFIG_DIR
    ucfg, vcfg = read_config("unet", root), read_config("vae", root)
    tcfg, t2cfg = read_config("text_encoder", root), read_config("text_encoder_2", root)
    require_sdxl(inspect_checkpoint(path), context_dim=ucfg["cross_attention_dim"])
    unet, vae, text = build_modules(ucfg, vcfg, tcfg, "meta")
    with torch.device("meta"):
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in t2cfg.items() if not k.startswith("_")}))
    return _fill(path, "SDXL", (unet, vae, text, text_2), (dtype, vae_dtype_for(dtype), dtype, dtype),
                 to_diffusers_xl, ucfg, vcfg, device)


def folder_family(folder: str | os.PathLike) -> str:
    """"sd1" or "sdxl" for a diffusers folder; CheckpointError naming anything else."""
    root = Path(folder)
    for sub in ("unet", "vae"):
        if not (root / sub / "config.json").is_file():
            raise CheckpointError(f"{root}: not a diffusers Stable Diffusion folder (no {sub}/config.json)")
    ucfg = read_config("unet", root)
    ctx, cin, add = ucfg.get("cross_attention_dim"), ucfg.get("in_channels"), ucfg.get("addition_embed_type")
    has_l = (root / "text_encoder" / "config.json").is_file()
    has_g = (root / "text_encoder_2" / "config.json").is_file()
    if add == "text_time" and cin == 4 and has_l and has_g:
        return "sdxl"
    family = None
    if add == "text_time":
        family = "an SDXL inpainting model" if has_l and has_g else "the Stable Diffusion XL refiner"
    elif add or isinstance(ctx, list):
        family = f"a UNet with '{add}' added conditioning"
    elif ctx == 1024:
        family = "Stable Diffusion 2.x"
    elif cin != 4:
        family = f"a UNet with {cin} input channels (inpainting/instruct)"
    elif not has_l:
        raise CheckpointError(f"{root}: not a diffusers Stable Diffusion folder (no text_encoder/config.json)")
    if family is not None:
        raise CheckpointError(
            f"{root}: this is {family} (cross_attention_dim={ctx}, in_channels={cin}, "
            f"addition_embed_type={add}); the pack needs {SUPPORTED}."
        )
    return "sd1"


def load_diffusers_folder_modules(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """(unet, vae, text_encoder, tokenizer folder or None) from a diffusers SD 1.x folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(folder)
    if folder_family(root) != "sd1":
        raise CheckpointError(f"{root}: this is Stable Diffusion XL; load it with load_sdxl (or load_sd)")

    unet = _from_folder(UNet2DConditionModel, root, "unet", dtype)
    vae = _from_folder(AutoencoderKL, root, "vae", dtype)
    text = _from_folder(CLIPTextModel, root, "text_encoder", dtype)
    tok = root / "tokenizer" if (root / "tokenizer" / "vocab.json").is_file() else None
    return unet.to(device).eval(), vae.to(device).eval(), text.to(device).eval(), tok


def _from_folder(cls, root: Path, sub: str, dtype: torch.dtype):
    try:
        return cls.from_pretrained(str(root), subfolder=sub, torch_dtype=dtype, local_files_only=True)
    except (OSError, EnvironmentError):  # only an fp16 variant present
        return cls.from_pretrained(str(root), subfolder=sub, torch_dtype=dtype, local_files_only=True, variant="fp16")


def load_diffusers_folder_modules_xl(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """(unet, vae, text_encoder, text_encoder_2, tokenizer folder or None, tokenizer_2 folder or None)
    from a diffusers SDXL folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    if folder_family(root) != "sdxl":
        raise CheckpointError(f"{root}: this is Stable Diffusion 1.x; load it with load_sd15 (or load_sd)")
    unet = _from_folder(UNet2DConditionModel, root, "unet", dtype)
    vae = _from_folder(AutoencoderKL, root, "vae", vae_dtype_for(dtype))
    text = _from_folder(CLIPTextModel, root, "text_encoder", dtype)
    text_2 = _from_folder(CLIPTextModelWithProjection, root, "text_encoder_2", dtype)
    toks = [root / t if (root / t / "vocab.json").is_file() else None for t in ("tokenizer", "tokenizer_2")]
    return (*(m.to(device).eval() for m in (unet, vae, text, text_2)), *toks)


def load_sd15(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config_dir: str | os.PathLike | None = None,
):
    """Load an SD 1.x model from a single file or a diffusers folder as a :class:`DiffusersSD`.

    ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA and float32
    on the CPU.  ``config_dir`` overrides the shipped SD 1.5 configs for single files.
    """
    from .backend import DiffusersSD
    from .tokenizer import load_clip_tokenizer

    device, dtype = _device_dtype(device, dtype)
    p = Path(path)
    if p.is_dir():
        unet, vae, text, tok_dir = load_diffusers_folder_modules(p, dtype, device)
    else:
        unet, vae, text = load_single_file_modules(p, dtype, device, config_dir)
        tok_dir = None
    for m in (unet, vae, text):
        m.requires_grad_(False)
    return DiffusersSD(unet=unet, vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(tok_dir))


def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_sdxl(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config_dir: str | os.PathLike | None = None,
):
    """Load an SDXL model (base or a fine-tune of it) from a single file or a diffusers folder as a
    :class:`DiffusersSDXL`; device and dtype as :func:`load_sd15` (the VAE stays float32 under
    float16, :func:`vae_dtype_for`)."""
    from .backend import DiffusersSDXL
    from .tokenizer import load_clip_tokenizer

    device, dtype = _device_dtype(device, dtype)
    p = Path(path)
    if p.is_dir():
        unet, vae, text, text_2, tok, tok_2 = load_diffusers_folder_modules_xl(p, dtype, device)
    else:
        unet, vae, text, text_2 = load_single_file_modules_xl(p, dtype, device, config_dir)
        tok = tok_2 = None
    for m in (unet, vae, text, text_2):
        m.requires_grad_(False)
    return DiffusersSDXL(unet=unet, vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(tok),
                         text_encoder_2=text_2, tokenizer_2=load_clip_tokenizer(tok_2, pad_token="!"))


def family_of(path: str | os.PathLike) -> str:
    """"sd1" or "sdxl" for a checkpoint file or diffusers folder (header and configs only)."""
    p = Path(path)
    if p.is_dir():
        return folder_family(p)
    from .checkpoint import require_supported

    info = inspect_checkpoint(p)
    return "sd1" if info.family == "ldm" else require_supported(info)


def load_sd(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config_dir: str | os.PathLike | None = None,
):
    """An SD 1.x or SDXL model, whichever the file or folder is (:func:`load_sd15` / :func:`load_sdxl`).

    With ``config_dir`` (a single file with non-standard configs), a ``text_encoder_2`` config in it
    says SDXL."""
    p = Path(path)
    if config_dir is not None and not p.is_dir():
        xl = (Path(config_dir) / "text_encoder_2" / "config.json").is_file()
    else:
        xl = family_of(p) == "sdxl"
    return (load_sdxl if xl else load_sd15)(p, device=device, dtype=dtype, config_dir=config_dir)
