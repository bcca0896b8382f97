"""Tiny SD-1.x-shaped models built in code, and writers for the two on-disk layouts.

Same module types, block layout and key structure as SD 1.5, at a few hundred
thousand parameters, so loaders, key maps and training loops run for real on a CPU.
The text encoder keeps CLIP's 49,408-token vocabulary so the shipped tokenizer works.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64], cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16], sample_size=32, scaling_factor=0.18215,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def build_tiny(seed: int = 0):
    """(unet, vae, text_encoder) with deterministic random weights, eval mode, fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    # diffusers zero-initialises conv_out: randomise everything so a wrong mapping shows
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(**TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    return unet.eval(), vae.eval(), text.eval()


def write_config_dir(root: Path, unet, vae, text) -> Path:
    """The unet/vae/text_encoder config files the single-file loader reads."""
    root = Path(root)
    unet.save_config(root / "unet")
    vae.save_config(root / "vae")
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    text.config.save_pretrained(root / "text_encoder")
    return root


def write_single_file(path: Path, unet, vae, text, dtype=torch.float32) -> Path:
    """Save the three modules as one safetensors file in the original SD key layout."""
    from safetensors.torch import save_file

    from core.sd.keymap import to_original

    sd = to_original(unet.state_dict(), vae.state_dict(), text.state_dict(), unet.config, vae.config)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={"format": "pt"})
    return Path(path)


def write_diffusers_folder(root: Path, unet, vae, text) -> Path:
    root = Path(root)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    index = json.loads((Path(__file__).resolve().parents[1] / "core/sd/configs/sd15/model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def tiny_sd_model(seed: int = 0):
    """The tiny modules, frozen, behind the diffusers back end (:class:`core.sd.backend.DiffusersSD`)."""
    from core.sd.backend import DiffusersSD
    from core.sd.tokenizer import load_clip_tokenizer

    unet, vae, text = build_tiny(seed)
    for m in (unet, vae, text):
        m.requires_grad_(False)
    return DiffusersSD(unet, vae, text, load_clip_tokenizer())


# -- SDXL-shaped ------------------------------------------------------------------------------
# SDXL's structure at toy width: no attention in the first block, 2 transformer layers in the
# second (and the mid block), linear projections, the "text_time" added conditioning (pooled text
# vector + 6 size embeddings of addition_time_embed_dim each), a 64-wide context made of two 32-wide
# text encoders (CLIP-L-like, and an OpenCLIP-G-like one with a projection: the pooled vector).
TINY_XL_POOLED = 24
TINY_XL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64], transformer_layers_per_block=[1, 2], use_linear_projection=True,
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=TINY_XL_POOLED + 6 * 8,
)
TINY_XL_VAE = {**TINY_VAE, "scaling_factor": 0.13025}
TINY_XL_TEXT_2 = {**TINY_TEXT, "hidden_act": "gelu", "projection_dim": TINY_XL_POOLED, "num_hidden_layers": 3}


def build_tiny_xl(seed: int = 0):
    """(unet, vae, text_encoder, text_encoder_2), SDXL-shaped, deterministic random weights, eval, fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_XL_UNET)
    with torch.no_grad():  # conv_out is zero-initialised; randomise all so a wrong mapping shows
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(**TINY_XL_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_XL_TEXT_2))
    return unet.eval(), vae.eval(), text.eval(), text_2.eval()


def write_config_dir_xl(root: Path, unet, vae, text, text_2) -> Path:
    root = write_config_dir(root, unet, vae, text)
    (root / "text_encoder_2").mkdir(parents=True, exist_ok=True)
    text_2.config.save_pretrained(root / "text_encoder_2")
    return root


def write_single_file_xl(path: Path, unet, vae, text, text_2, dtype=torch.float32) -> Path:
    """The four modules as one safetensors file in SDXL's original single-file layout."""
    from safetensors.torch import save_file

    from core.sd.keymap import to_original_xl

    sd = to_original_xl(unet.state_dict(), vae.state_dict(), text.state_dict(), text_2.state_dict(),
                        unet.config, vae.config)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata={"format": "pt"})
    return Path(path)


def write_diffusers_folder_xl(root: Path, unet, vae, text, text_2) -> Path:
    root = Path(root)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text), ("text_encoder_2", text_2)):
        module.save_pretrained(root / name)
    index = (Path(__file__).resolve().parents[1] / "core/sd/configs/sdxl/model_index.json").read_text()
    (root / "model_index.json").write_text(index)
    return root


def tiny_sdxl_model(seed: int = 0):
    """The tiny SDXL modules, frozen, behind the diffusers back end (:class:`core.sd.backend.DiffusersSDXL`)."""
    from core.sd.backend import DiffusersSDXL
    from core.sd.tokenizer import load_clip_tokenizer

    unet, vae, text, text_2 = build_tiny_xl(seed)
    for m in (unet, vae, text, text_2):
        m.requires_grad_(False)
    return DiffusersSDXL(unet, vae, text, load_clip_tokenizer(), text_encoder_2=text_2,
                         tokenizer_2=load_clip_tokenizer(pad_token="!"))
