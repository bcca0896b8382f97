"""Build a Stable Diffusion XL checkpoint with random weights using ComfyUI's own classes.

Run with ComfyUI's Python, from anywhere:

    $COMFYUI_DIR/.venv/bin/python tests/integration/make_random_sdxl.py OUT.safetensors [--comfyui DIR]
    $COMFYUI_DIR/.venv/bin/python tests/integration/make_random_sdxl.py --keys OUT.json [--comfyui DIR]

The first writes the real SDXL base architecture (UNet with the added conditioning, VAE, CLIP-L
and OpenCLIP-G text encoders) in the original single-file key layout, fp16 (about 6.9 GB; it needs
about 16 GB of free memory while it is built).  Its images are noise: no pretrained weights exist
here.  The write is atomic (temporary file, then rename).  ``--keys`` builds the same model on
PyTorch's meta device (no memory, seconds) and writes only the key list with shapes
(``tests/data/sdxl_original_keys.json``), the reference the default tier's key-map test reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from make_random_sd15 import SD_VAE, randomise

# The SDXL base UNet hyper-parameters, as ComfyUI's model detection reports them.
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _parts(device: str, seed: int, half: bool = False):
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET))
    if config is None or type(config).__name__ != "SDXL":
        raise RuntimeError(f"ComfyUI did not match the SDXL UNet config (got {config!r})")
    dtype = torch.float16 if half else torch.float32  # built in fp16 directly: peak memory ~ the file's size
    config.set_inference_dtype(dtype, None)
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):
        model = config.get_model({})
        clip_model = config.clip_target().clip(dtype=dtype, device=torch.device(device))
        vae_module = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4).to(dtype)
    if device != "meta":
        for m in (model.diffusion_model, clip_model, vae_module):
            randomise(m, g)
    return config, model, clip_model, vae_module


def write_keys(out_path: str, comfyui_commit: str) -> None:
    config, model, clip_model, vae_module = _parts("meta", 0)
    sd = model.state_dict_for_saving(clip_model.state_dict(), vae_module.state_dict())
    keys = {k: list(v.shape) for k, v in sorted(sd.items())}
    doc = {"comfyui_commit": comfyui_commit,
           "note": "keys and shapes of an SDXL base checkpoint in the original single-file layout, as ComfyUI's "
                   "SDXL classes write it (tests/integration/make_random_sdxl.py --keys)",
           "keys": keys}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=0)
    os.replace(tmp, out_path)


def build(out_path: str, seed: int = 0) -> None:
    config, model, clip_model, vae_module = _parts("cpu", seed, half=True)  # first: it sets ComfyUI's --cpu
    from safetensors.torch import save_file

    sd = model.state_dict_for_saving(clip_model.state_dict(), vae_module.state_dict())
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = out_path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt", "note": "random weights, for tests"})
    os.replace(tmp, out_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--keys", default=None, help="write only the key list with shapes (JSON) here")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", os.getcwd()))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not a.out and not a.keys:
        ap.error("give OUT.safetensors or --keys OUT.json")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(a.comfyui))
    out = os.path.abspath(a.keys or a.out)
    os.chdir(a.comfyui)
    if a.keys:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        snapshot = os.path.basename(os.path.dirname(os.path.abspath(a.comfyui)))  # e.g. comfyui-0.8.0-618b803d
        write_keys(out, commit or snapshot)
    else:
        build(out, a.seed)


if __name__ == "__main__":
    main()
