"""Imagic end to end outside ComfyUI (Kawar et al., CVPR 2023), on an SD 1.x checkpoint.

    python -m core.imagic --checkpoint v1-5-pruned-emaonly.safetensors --image in.png \\
        --prompt "a photo of a sitting dog" --eta 0.9 --out out.png

Stages: see :mod:`core.imagic.pipeline`.  Everything is read from local files (offline).  ``--etas``
renders several etas with one seed; ``--save-delta`` keeps the trained delta and e_opt
in the pack's file layout (loadable by ComfyUI's LoRA loaders and by Load Trained).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..lora import LoRAConfig
from .embedding import EmbeddingConfig
from .finetune import FineTuneConfig
from .pipeline import edit, load_image, save_edit, to_pil


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m core.imagic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="SD 1.x .safetensors (original layout) or diffusers folder")
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True, help="the target text")
    ap.add_argument("--eta", type=float, default=0.9, help="interpolation eta (SD: ~0.9-1.2; may exceed 1)")
    ap.add_argument("--etas", default=None, help="comma-separated etas: render one image per eta (same seed)")
    ap.add_argument("--out", default="imagic_out.png", help="output PNG (with --etas: a horizontal strip)")
    ap.add_argument("--size", type=int, default=512, help="square working size (multiple of 8)")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--emb-steps", type=int, default=500)
    ap.add_argument("--emb-lr", type=float, default=1e-3)
    ap.add_argument("--ft-steps", type=int, default=1000)
    ap.add_argument("--ft-lr", type=float, default=None, help="default: 1e-4 (lora) / 2e-6 (full)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--config-dir", default=None, help="unet/vae/text_encoder configs for a non-standard SD 1.x file "
                                                       "(default: the shipped SD 1.5 configs)")
    ap.add_argument("--save-delta", default=None, help="also save the trained delta + e_opt (.safetensors)")
    a = ap.parse_args(argv)
    if a.size % 8:
        ap.error("--size must be a multiple of 8")
    from ..sd.loader import load_sd15

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    model = load_sd15(a.checkpoint, device=device, config_dir=a.config_dir)
    print(f"loaded {a.checkpoint} on {device} in {time.perf_counter() - t0:.1f} s")
    gpu = device.type == "cuda"
    result = edit(model, load_image(a.image, a.size), a.prompt,
                  EmbeddingConfig(a.emb_steps, a.emb_lr, a.seed, gradient_checkpointing=gpu),
                  FineTuneConfig(mode=a.mode, steps=a.ft_steps, lr=a.ft_lr, lora=LoRAConfig(a.rank, float(a.rank)),
                                 seed=a.seed, gradient_checkpointing=gpu))
    etas = [float(v) for v in a.etas.split(",")] if a.etas else [a.eta]
    shape = (1, 4, a.size // 8, a.size // 8)
    images = [result.render(model, eta, shape, a.steps, a.cfg, a.seed)[0] for eta in etas]
    strip = torch.cat(images, dim=-1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(strip).save(out)
    print(f"wrote {out} (eta {', '.join(f'{e:g}' for e in etas)})")
    if a.save_delta:
        print(f"saved the trained delta and e_opt to {save_edit(result, a.save_delta)}")


if __name__ == "__main__":
    main()
