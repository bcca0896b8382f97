"""Imagic end to end outside ComfyUI (Kawar et al., CVPR 2023), on an SD 1.x checkpoint.

    python -m core.imagic --checkpoint v1-5-pruned-emaonly.safetensors --image in.png \\
        --prompt "a photo of a sitting dog" --eta 0.9 --out out.png

Stages: (1) optimise e_tgt into e_opt (:mod:`core.optimize_embedding`), (2) fine-tune
the UNet at e_opt (:mod:`core.finetune`, LoRA by default), (3) sample with DDIM and
classifier-free guidance at e = eta e_tgt + (1 - eta) e_opt (:mod:`core.interpolate`,
:mod:`core.sampling`).  Everything is read from local files (offline).  ``--etas``
renders several etas with one seed; ``--save-delta`` keeps the trained delta and e_opt
in the pack's file layout (loadable by ComfyUI's LoRA loaders and by Load Trained).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .artifact_io import atomic_save_safetensors
from .finetune import FineTuneConfig, FineTuneResult, finetune
from .interpolate import interpolate
from .lora import LoRAConfig
from .optimize_embedding import EmbeddingConfig, EmbeddingResult, optimize_embedding
from .sampling import ddim_sample
from .seam import LatentDiffusion


@dataclass
class ImagicEdit:
    e_tgt: torch.Tensor
    embedding: EmbeddingResult
    tuned: FineTuneResult

    def render(self, model: LatentDiffusion, eta: float, shape, steps: int = 50, guidance: float = 7.5,
               seed: int = 0) -> torch.Tensor:
        """Decoded image(s) [B, 3, H, W] in [0, 1] for one eta."""
        uncond = model.encode_text([""])
        e = interpolate(self.e_tgt, self.embedding.e_opt, eta)
        with model.adapted(self.tuned.weight_functions()) as tuned:
            latent = ddim_sample(tuned, e, uncond, shape=shape, steps=steps, guidance=guidance, seed=seed)
        return model.decode(latent)


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """RGB image resized (shorter side) and centre-cropped to size x size -> [1, 3, S, S] in [0, 1]."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255).permute(2, 0, 1)[None]


def edit(model: LatentDiffusion, image: torch.Tensor, prompt: str, emb_config: EmbeddingConfig,
         ft_config: FineTuneConfig, log=print) -> ImagicEdit:
    """Run stages 1 and 2 for ``image`` [1, 3, H, W] in [0, 1] and target ``prompt``."""
    latent = model.encode(image)
    e_tgt = model.encode_text([prompt])

    def progress(name):
        def on_step(i, n, info):
            if i == 1 or i % max(1, n // 10) == 0 or i == n:
                log(f"  {name} {i}/{n}  loss {info['loss']:.4f}")
        return on_step

    t0 = time.perf_counter()
    emb = optimize_embedding(model, latent, e_tgt, emb_config, on_step=progress("embedding"))
    log(f"stage 1 (embedding, {emb_config.steps} steps): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    tuned = finetune(model, latent, emb.e_opt, ft_config, on_step=progress(f"fine-tune ({ft_config.mode})"))
    log(f"stage 2 (fine-tune, {ft_config.steps} steps, {tuned.trainable_parameters:,} trainable): "
        f"{time.perf_counter() - t0:.1f} s")
    return ImagicEdit(e_tgt, emb, tuned)


def save_edit(result: ImagicEdit, path: str | Path) -> Path:
    tensors = dict(result.tuned.delta)
    tensors["sie.embedding"] = result.embedding.e_opt.detach().float().cpu()
    meta = {"format": "sie.trained", "version": "1", "method": "imagic", "mode": result.tuned.mode,
            "info": json.dumps({"final_loss": result.tuned.losses[-1]})}
    return atomic_save_safetensors(tensors, path, meta)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
                           .astype(np.uint8))


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
    from .sd.loader import load_sd15

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
