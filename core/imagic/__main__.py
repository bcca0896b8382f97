"""Imagic end to end outside ComfyUI (Kawar et al., CVPR 2023), on an SD 1.x or SDXL checkpoint.

    python -m core.imagic --checkpoint v1-5-pruned-emaonly.safetensors --image in.png \\
        --prompt "a photo of a sitting dog" --eta 0.9 --out out.png

Stages: see :mod:`core.imagic.pipeline`.  Everything is read from local files (offline).  ``--etas``
renders several etas with one seed; ``--save-delta`` keeps the trained delta and e_opt
in the pack's file layout (loadable by ComfyUI's LoRA loaders and by Load Trained),
``--save-fp16`` stores that delta in half precision (half the file).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import cli
from ..artifact_io import atomic_write_image
from ..fit import optimizer_library
from ..images import tensor_to_pil
from ..lora import LoRAConfig
from .embedding import EmbeddingConfig
from .finetune import FineTuneConfig
from ..images import load_image
from .pipeline import edit, save_edit

def parse_etas(text: str) -> list[float]:
    try:
        etas = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise cli.CLIError("--etas", f"'{text}' is not a list of numbers", "write e.g. --etas 0.7,0.8,0.9") from None
    if not etas:
        raise cli.CLIError("--etas", "no eta given", "write e.g. --etas 0.7,0.8,0.9")
    return etas


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m core.imagic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="SD 1.x or SDXL .safetensors (original layout) or diffusers folder")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True, help="the target text")
    ap.add_argument("--eta", type=float, default=0.9, help="interpolation eta (SD: ~0.9-1.2; may exceed 1)")
    ap.add_argument("--etas", default=None, help="comma-separated etas: render one image per eta (same seed)")
    ap.add_argument("--out", default="imagic_out.png", help="output PNG (with --etas: a horizontal strip)")
    ap.add_argument("--size", type=cli.positive_int, default=512, help="square working size (multiple of 8)")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--emb-steps", type=cli.positive_int, default=500)
    ap.add_argument("--emb-lr", type=cli.positive_float, default=1e-3)
    ap.add_argument("--ft-steps", type=cli.positive_int, default=1000)
    ap.add_argument("--ft-lr", type=cli.positive_float, default=None, help="default: 1e-4 (lora) / 2e-6 (full)")
    ap.add_argument("--rank", type=cli.positive_int, default=8)
    ap.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=cli.seed, default=0, help="0 .. 2**64-1")
    ap.add_argument("--device", default=None)
    ap.add_argument("--config-dir", default=None, help="unet/vae/text_encoder configs (SDXL: and text_encoder_2) for a non-standard file "
                                                       "(default: the shipped SD 1.5 / SDXL configs)")
    ap.add_argument("--save-delta", default=None, help="also save the trained delta + e_opt (.safetensors)")
    ap.add_argument("--save-fp16", action="store_true", help="store the --save-delta delta in float16: half the "
                                                             "file (a full SD 1.5 fine-tune: 1.7 GB, not 3.4 GB)")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "adam8bit"],
                    help="fine-tune optimiser: adam (the SD ports') or adam8bit (8-bit moments from bitsandbytes, "
                         "which must be installed: a full SD 1.5 fine-tune's optimiser state drops from 6.9 to 1.7 GB)")
    ap.add_argument("--gradient-checkpointing", default="auto", choices=["auto", "on", "off"],
                    help="recompute activations in backward (less memory, slower); auto: on for a GPU")
    cli.add_checkpoint_args(ap)
    a = ap.parse_args(argv)
    if a.size % 8:
        ap.error("--size must be a multiple of 8")
    if a.save_delta and Path(a.save_delta).suffix != ".safetensors":
        ap.error("--save-delta must name a .safetensors file")
    if a.save_fp16 and not a.save_delta:
        ap.error("--save-fp16 applies to --save-delta: give --save-delta edit.safetensors too")

    # Every check that bad input can fail, before the (slow) model load and training.
    etas = parse_etas(a.etas) if a.etas else [a.eta]
    image = cli.open_image(a.image, "--image")
    out = cli.check_image_output(a.out, "--out")
    if a.save_delta:
        cli.make_folder(Path(a.save_delta).parent, "--save-delta")
    device = cli.device(a.device)
    try:
        optimizer_library(a.optimizer)
    except ImportError as e:
        ap.error(f"--optimizer: {e}")
    cli.check_checkpoint(a.checkpoint, a.config_dir)
    plan = cli.checkpoint_plan(a, out)

    from ..sd.loader import load_sd

    t0 = time.perf_counter()
    model = load_sd(a.checkpoint, device=device, config_dir=a.config_dir)
    print(f"loaded {a.checkpoint} on {device} in {time.perf_counter() - t0:.1f} s")
    gpu = device.type == "cuda" if a.gradient_checkpointing == "auto" else a.gradient_checkpointing == "on"
    result = edit(model, load_image(image, a.size), a.prompt,
                  EmbeddingConfig(a.emb_steps, a.emb_lr, a.seed, gradient_checkpointing=gpu),
                  FineTuneConfig(mode=a.mode, steps=a.ft_steps, lr=a.ft_lr, lora=LoRAConfig(a.rank, float(a.rank)),
                                 seed=a.seed, gradient_checkpointing=gpu, optimizer=a.optimizer), checkpoints=plan)
    shape = (1, 4, a.size // 8, a.size // 8)
    images = [result.render(model, eta, shape, a.steps, a.cfg, a.seed)[0] for eta in etas]
    strip = torch.cat(images, dim=-1)
    atomic_write_image(tensor_to_pil(strip), out)
    print(f"wrote {out} (eta {', '.join(f'{e:g}' for e in etas)})")
    if a.save_delta:
        path = save_edit(result, a.save_delta, "fp16" if a.save_fp16 else "fp32")
        print(f"saved the trained delta{' (float16)' if a.save_fp16 else ''} and e_opt to {path}")


if __name__ == "__main__":
    cli.run_cli(main)
