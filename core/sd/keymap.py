"""Parameter names of Stable Diffusion 1.x: diffusers layout <-> original single-file layout.

The original ("LDM", CompVis) layout is what users keep in ``models/checkpoints`` and
what ComfyUI reads and writes: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (CLIP).
diffusers names the same tensors differently.  :func:`unet_names`, :func:`vae_names`
and :func:`text_encoder_names` build the one-to-one table from a model's
configuration, so it works for SD 1.x at full size and for the tiny models the tests
build.  The only tensors whose *shape* differs are the VAE's mid-block attention
projections (1x1 convolutions in the original, linear layers in diffusers); see
:func:`to_original` / :func:`to_diffusers`.

The same table names LoRA targets: ComfyUI's LoRA loader expects
``diffusion_model.<original module path>``.

SDXL keeps the UNet and VAE prefixes; its UNet adds the added-conditioning MLP
(diffusers' ``add_embedding``, the original ``label_emb.0``), and its two text encoders
live under ``conditioner.embedders.0.transformer.`` (CLIP ViT-L, transformers' layout) and
``conditioner.embedders.1.model.`` (OpenCLIP ViT-bigG in open_clip's layout,
:mod:`core.sd.openclip`): :func:`to_original_xl` / :func:`to_diffusers_xl`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
XL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
XL_TEXT2_PREFIX = "conditioner.embedders.1.model."

_RESNET_UNET = {  # diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(name: str, n: int) -> tuple[str, str]:
    """Split 'a.b.c.rest' after n dotted components -> ('a.b.c', 'rest')."""
    parts = name.split(".")
    return ".".join(parts[:n]), ".".join(parts[n:])


def _module_prefixes(keys: Iterable[str]) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in keys}


def unet_module_map(config: Mapping) -> dict[str, str]:
    """diffusers UNet2DConditionModel module path -> LDM UNetModel module path (no prefix).

    Covers the block containers; names inside a resnet or a transformer are handled by
    :func:`unet_names`.
    """
    L = config["layers_per_block"]
    down = config["down_block_types"]
    up = config["up_block_types"]
    m: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: MLP of [pooled text, size embeddings]
        m["add_embedding.linear_1"] = "label_emb.0.0"
        m["add_embedding.linear_2"] = "label_emb.0.2"
    for i, kind in enumerate(down):
        for j in range(L):
            idx = 1 + i * (L + 1) + j
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{idx}.0"
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
        if i < len(down) - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (L + 1)}.0.op"
    for i, kind in enumerate(up):
        attn = kind.startswith("CrossAttn")
        for j in range(L + 1):
            idx = i * (L + 1) + j
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{idx}.0"
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
        if i < len(up) - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (L + 1) + L}.{2 if attn else 1}.conv"
    return m


def _map_with_blocks(name: str, blocks: Mapping[str, str], resnet: Mapping[str, str]) -> str:
    """Rename one parameter through the longest matching block prefix."""
    parts = name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head, rest = ".".join(parts[:n]), ".".join(parts[n:])
        if head in blocks:
            target = blocks[head]
            if ".resnets." in head:
                sub, leaf = _split(rest, len(rest.split(".")) - 1)
                rest = f"{resnet.get(sub, sub)}.{leaf}"
            return f"{target}.{rest}"
    raise KeyError(name)


def unet_names(diffusers_keys: Iterable[str], config: Mapping) -> dict[str, str]:
    """{diffusers UNet key: original key without prefix} for every given key."""
    blocks = unet_module_map(config)
    return {k: _map_with_blocks(k, blocks, _RESNET_UNET) for k in diffusers_keys}


def vae_module_map(config: Mapping) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> LDM AutoencoderKL module path."""
    L = config["layers_per_block"]
    n = len(config["block_out_channels"])
    m: dict[str, str] = {
        "encoder.conv_in": "encoder.conv_in",
        "encoder.conv_out": "encoder.conv_out",
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_in": "decoder.conv_in",
        "decoder.conv_out": "decoder.conv_out",
        "decoder.conv_norm_out": "decoder.norm_out",
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        for d, o in _VAE_ATTN.items():
            m[f"{part}.mid_block.attentions.0.{d}"] = f"{part}.mid.attn_1.{o}"
    for i in range(n):
        for j in range(L):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        o = n - 1 - i  # the original decoder lists its levels from the lowest resolution up
        for j in range(L + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{o}.block.{j}"
        if i < n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{o}.upsample.conv"
    return m


def vae_names(diffusers_keys: Iterable[str], config: Mapping) -> dict[str, str]:
    """{diffusers VAE key: original key without prefix} for every given key."""
    blocks = vae_module_map(config)
    return {k: _map_with_blocks(k, blocks, _RESNET_VAE) for k in diffusers_keys}


def text_encoder_names(hf_keys: Iterable[str]) -> dict[str, str]:
    """{transformers CLIPTextModel key: original key without prefix}.

    The original layout stores the text transformer under ``text_model.``; transformers
    4.x names it the same way, transformers 5 drops that level.
    """
    return {k: k if k.startswith("text_model.") else "text_model." + k for k in hf_keys}


def is_vae_attention_projection(original_key: str) -> bool:
    """True for the VAE mid-attention q/k/v/proj_out weights stored as 1x1 convolutions."""
    return ".mid.attn_1." in original_key and original_key.endswith(
        ("q.weight", "k.weight", "v.weight", "proj_out.weight")
    )


def to_original(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae_config: Mapping,
    text_prefix: str = TEXT_PREFIX,
) -> dict[str, torch.Tensor]:
    """Three diffusers/transformers state dicts -> one original single-file state dict."""
    out: dict[str, torch.Tensor] = {}
    for k, o in unet_names(unet.keys(), unet_config).items():
        out[UNET_PREFIX + o] = unet[k]
    for k, o in vae_names(vae.keys(), vae_config).items():
        t = vae[k]
        if is_vae_attention_projection(o) and t.ndim == 2:
            t = t[:, :, None, None]
        out[VAE_PREFIX + o] = t
    for k, o in text_encoder_names(text_encoder.keys()).items():
        if k.endswith("position_ids"):
            continue
        out[text_prefix + o] = text_encoder[k]
    return out


def to_original_xl(unet, vae, text_encoder, text_encoder_2, unet_config: Mapping, vae_config: Mapping
                   ) -> dict[str, torch.Tensor]:
    """SDXL's four diffusers/transformers state dicts -> one original single-file state dict."""
    from .openclip import hf_to_openclip

    out = to_original(unet, vae, text_encoder, unet_config, vae_config, text_prefix=XL_TEXT_PREFIX)
    out.update({XL_TEXT2_PREFIX + k: v for k, v in hf_to_openclip(text_encoder_2).items()})
    return out


def to_diffusers(
    original: Mapping[str, torch.Tensor],
    unet_keys: Iterable[str],
    vae_keys: Iterable[str],
    text_keys: Iterable[str],
    unet_config: Mapping,
    vae_config: Mapping,
    text_prefix: str = TEXT_PREFIX,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """One original state dict -> (unet, vae, text_encoder) state dicts for the given target keys.

    Returns the three dicts and the list of target keys that the checkpoint lacks.  Keys
    of the checkpoint that no target asks for are simply not read.
    """
    missing: list[str] = []
    parts = []
    for keys, names, prefix in (
        (unet_keys, lambda ks: unet_names(ks, unet_config), UNET_PREFIX),
        (vae_keys, lambda ks: vae_names(ks, vae_config), VAE_PREFIX),
        (text_keys, text_encoder_names, text_prefix),
    ):
        sd: dict[str, torch.Tensor] = {}
        for k, o in names(list(keys)).items():
            src = prefix + o
            if src not in original and prefix == text_prefix:
                src = prefix + o[len("text_model.") :]  # very old checkpoints lack "text_model."
            if src not in original:
                if not k.endswith("position_ids"):
                    missing.append(src)
                continue
            t = original[src]
            if prefix == VAE_PREFIX and is_vae_attention_projection(o) and t.ndim == 4:
                t = t[:, :, 0, 0]
            sd[k] = t
        parts.append(sd)
    return parts[0], parts[1], parts[2], missing


def to_diffusers_xl(original: Mapping[str, torch.Tensor], unet_keys, vae_keys, text_keys, text2_keys,
                    unet_config: Mapping, vae_config: Mapping):
    """An SDXL single-file state dict -> (unet, vae, text_encoder, text_encoder_2, missing keys).

    ``original`` needs ``keys()`` (the OpenCLIP tower is read whole and converted)."""
    from .openclip import openclip_to_hf

    usd, vsd, tsd, missing = to_diffusers(original, unet_keys, vae_keys, text_keys, unet_config, vae_config,
                                          text_prefix=XL_TEXT_PREFIX)
    g = openclip_to_hf({k[len(XL_TEXT2_PREFIX):]: original[k] for k in original.keys()
                        if k.startswith(XL_TEXT2_PREFIX)})
    t2: dict[str, torch.Tensor] = {}
    for k in text2_keys:
        c = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
        if c in g:
            t2[k] = g[c]
        elif not k.endswith("position_ids"):
            missing.append(XL_TEXT2_PREFIX + "(open_clip) " + c)
    return usd, vsd, tsd, t2, missing


def lora_module_name(diffusers_module: str, config: Mapping) -> str:
    """ComfyUI LoRA key stem for a diffusers UNet module, e.g.
    'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' ->
    'diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q'."""
    return "diffusion_model." + unet_names([diffusers_module + ".weight"], config)[diffusers_module + ".weight"][: -len(".weight")]
