"""Offline Stable Diffusion 1.x loading with diffusers modules.

Two sources, both read entirely from local files:

* a single-file checkpoint in the original layout (``models/checkpoints/*.safetensors``):
  the header is inspected first (:mod:`core.sd.checkpoint`), the modules are built from
  the configs shipped in ``configs/sd15`` and the tensors are renamed with
  :mod:`core.sd.keymap`;
* a diffusers folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``
  and optionally ``tokenizer/``), read with ``from_pretrained(local_files_only=True)``.

Nothing here touches the network: configs and tokenizer files come with the pack.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, inspect_checkpoint, require_sd1
from .keymap import to_diffusers

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"


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


def load_single_file_modules(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu", config_dir: str | os.PathLike | None = None
):
    """(unet, vae, text_encoder) from an SD 1.x single-file checkpoint (.safetensors).

    ``config_dir`` holds unet/vae/text_encoder configs (default: the shipped SD 1.5 ones).
    """
    from safetensors import safe_open

    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    ucfg, vcfg, tcfg = read_config("unet", root), read_config("vae", root), read_config("text_encoder", root)
    info = inspect_checkpoint(path)
    require_sd1(info, context_dim=ucfg["cross_attention_dim"])
    unet, vae, text = build_modules(ucfg, vcfg, tcfg, "meta")
    targets = (unet.state_dict().keys(), vae.state_dict().keys(), text.state_dict().keys())

    class _Lazy(dict):  # reads a tensor from the file only when the key map asks for it
        def __init__(self, f, keys):
            super().__init__()
            self._f, self._keys = f, set(keys)

        def __contains__(self, k):
            return k in self._keys

        def __getitem__(self, k):
            return self._f.get_tensor(k)

    with safe_open(str(path), framework="pt", device="cpu") as f:
        usd, vsd, tsd, missing = to_diffusers(_Lazy(f, f.keys()), *targets, ucfg, vcfg)
    if missing:
        raise CheckpointError(
            f"{Path(path).name}: an SD 1.x checkpoint with {len(missing)} tensors missing "
            f"(first: {', '.join(missing[:3])}). The file is incomplete or was saved by an unusual tool."
        )
    for module, sd in ((unet, usd), (vae, vsd), (text, tsd)):
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        _check_shapes(module, sd, Path(path).name)
        module.load_state_dict(sd, strict=True, assign=True)
        materialize_buffers(module)
    return unet.to(device).eval(), vae.to(device).eval(), text.to(device).eval()


def _check_shapes(module: torch.nn.Module, sd: dict[str, torch.Tensor], file_name: str) -> None:
    expected = module.state_dict()
    for k, v in sd.items():
        if tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{file_name}: tensor for {k} has shape {tuple(v.shape)}, SD 1.x expects {tuple(expected[k].shape)}; "
                "this is not a standard SD 1.x checkpoint."
            )


def load_diffusers_folder_modules(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """(unet, vae, text_encoder, tokenizer folder or None) from a diffusers SD 1.x folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(folder)
    for sub in ("unet", "vae", "text_encoder"):
        if not (root / sub / "config.json").is_file():
            raise CheckpointError(f"{root}: not a diffusers Stable Diffusion folder (no {sub}/config.json)")
    ucfg = read_config("unet", root)
    ctx = ucfg.get("cross_attention_dim")
    family = None
    if ucfg.get("addition_embed_type") or ctx == 2048 or isinstance(ctx, list):
        family = "Stable Diffusion XL"
    elif ctx == 1024:
        family = "Stable Diffusion 2.x"
    elif ucfg.get("in_channels") != 4:
        family = f"a UNet with {ucfg.get('in_channels')} input channels (inpainting/instruct)"
    if family is not None:
        raise CheckpointError(
            f"{root}: this is {family} (cross_attention_dim={ctx}, in_channels={ucfg.get('in_channels')}, "
            f"addition_embed_type={ucfg.get('addition_embed_type')}); the pack needs Stable Diffusion 1.x."
        )

    def load(cls, sub):
        try:
            return cls.from_pretrained(str(root), subfolder=sub, torch_dtype=dtype, local_files_only=True)
        except (OSError, EnvironmentError):  # only an fp16 variant present
            return cls.from_pretrained(str(root), subfolder=sub, torch_dtype=dtype, local_files_only=True, variant="fp16")

    unet = load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    text = load(CLIPTextModel, "text_encoder")
    tok = root / "tokenizer" if (root / "tokenizer" / "vocab.json").is_file() else None
    return unet.to(device).eval(), vae.to(device).eval(), text.to(device).eval(), tok


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

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    p = Path(path)
    if p.is_dir():
        unet, vae, text, tok_dir = load_diffusers_folder_modules(p, dtype, device)
    else:
        unet, vae, text = load_single_file_modules(p, dtype, device, config_dir)
        tok_dir = None
    for m in (unet, vae, text):
        m.requires_grad_(False)
    return DiffusersSD(unet=unet, vae=vae, text_encoder=text, tokenizer=load_clip_tokenizer(tok_dir))
