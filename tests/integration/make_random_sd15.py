"""Build a Stable Diffusion 1.5 checkpoint with random weights using ComfyUI's own classes.

Run with ComfyUI's Python, from anywhere:

    $COMFYUI_DIR/.venv/bin/python tests/integration/make_random_sd15.py OUT.safetensors [--comfyui DIR]

The file has the real SD 1.5 architecture (UNet, VAE, CLIP-L text encoder) in the
original single-file key layout, fp16, so that every loader and code path sees real
shapes, dtypes and keys.  Its images are noise: no pretrained weights exist here.
The write is atomic (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# The SD 1.5 UNet hyper-parameters, as ComfyUI's model detection reports them.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def randomise(module, generator) -> None:
    """Fill every parameter: fan-in scaled normals for weights, ones/zeros for norms and biases."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "embedding" in name and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif leaf == "bias":
                p.zero_()
            elif leaf == "weight":
                p.fill_(1.0)
            else:  # scalars such as logit_scale
                p.fill_(1.0)


def build(out_path: str, seed: int = 0) -> None:
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    g = torch.Generator().manual_seed(seed)
    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    if config is None or type(config).__name__ != "SD15":
        raise RuntimeError(f"ComfyUI did not match the SD 1.5 UNet config (got {config!r})")
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    randomise(model.diffusion_model, g)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    clip = comfy.sd.CLIP(target=config.clip_target(), model_options={"dtype": torch.float32})
    randomise(clip.cond_stage_model, g)

    vae_module = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    randomise(vae_module, g)
    vae = comfy.sd.VAE(sd=vae_module.state_dict())

    tmp = out_path + ".tmp"
    comfy.sd.save_checkpoint(tmp, patcher, clip, vae, metadata={"format": "pt", "note": "random weights, for tests"})
    # store as fp16, the format users' checkpoints come in
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, tmp, metadata={"format": "pt", "note": "random weights, for tests"})
    os.replace(tmp, out_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", os.getcwd()))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    sys.path.insert(0, os.path.abspath(a.comfyui))
    os.chdir(a.comfyui)
    build(out, a.seed)


if __name__ == "__main__":
    main()
