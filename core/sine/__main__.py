"""SINE outside ComfyUI (Zhang et al., CVPR 2023): fine-tune on one image, then edit, on an SD 1.x or SDXL checkpoint.

    python -m core.sine finetune --checkpoint v1-5-pruned-emaonly.safetensors --image in.png \\
        --prompt "a photo of a sks dog" --out tuned.safetensors [--patches]
    python -m core.sine edit --checkpoint v1-5-pruned-emaonly.safetensors --tuned tuned.safetensors \\
        --target "a photo of a sks dog wearing a hat" --width 1024 --height 768 --out out.png

Everything is read from local files (offline).  ``finetune`` writes the delta (ComfyUI LoRA layout)
with the fine-tune prompt and the positional-map flag (``sie.sine``); ``edit`` samples with
model-based guidance (eq. 3; --v, --K) at any size (a model tuned with --patches is given F(v)).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import cli
from ..fit import pace_text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="SD 1.x or SDXL .safetensors (original layout) or diffusers folder")
    p.add_argument("--seed", type=cli.seed, default=0, help="0 .. 2**64-1")
    p.add_argument("--device", default=None)
    p.add_argument("--config-dir", default=None, help="unet/vae/text_encoder configs (SDXL: and text_encoder_2) for a non-standard "
                                                      "file (default: the shipped SD 1.5 / SDXL configs)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core.sine", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("finetune", help="fine-tune on one image (paper §3.3)")
    _common(f)
    f.add_argument("--image", required=True)
    f.add_argument("--prompt", required=True, help='the fine-tune prompt, e.g. "a photo of a sks dog"')
    f.add_argument("--out", required=True, help="the tuned delta (.safetensors)")
    f.add_argument("--patches", action="store_true", help="patch-based fine-tuning with the positional map")
    f.add_argument("--steps", type=cli.positive_int, default=None, help="default: 800, 10000 with --patches (paper)")
    f.add_argument("--mode", default="lora", choices=["lora", "full"])
    f.add_argument("--lr", type=cli.positive_float, default=None, help="default: 1e-4 (lora) / 1e-6 (full, paper)")
    f.add_argument("--rank", type=cli.positive_int, default=8)
    f.add_argument("--size", type=cli.positive_int, default=512,
                   help="working size (multiple of 8): the square image, or with --patches the crop size "
                        "(crops come from the image resized to 2 x size)")
    f.add_argument("--train-text-encoder", action="store_true",
                   help="also train the text encoder (the official code; the paper does not say)")
    f.add_argument("--text-mode", default="full", choices=["full", "lora"],
                   help="with --train-text-encoder: full (every text-model parameter, token embedding included: "
                        "the official code) or lora (adapters on its layers)")
    f.add_argument("--text-lr", type=cli.positive_float, default=None,
                   help="text encoder lr (default: the UNet's when --text-mode equals --mode, else 1e-6 full / "
                        "1e-4 lora)")
    f.add_argument("--pooled-x0-weight", type=float, default=0.0,
                   help="weight of the official patch code's pooled x0 L1 term (paper: 0)")
    cli.add_checkpoint_args(f)
    e = sub.add_parser("edit", help="edit with model-based classifier-free guidance (eq. 3)")
    _common(e)
    e.add_argument("--tuned", required=True, help="a file written by 'finetune'")
    e.add_argument("--target", required=True, help="the target prompt")
    e.add_argument("--finetune-prompt", default=None,
                   help="default: the conditioning c^ stored in --tuned (exactly what training used)")
    e.add_argument("--width", type=cli.positive_int, default=512)
    e.add_argument("--height", type=cli.positive_int, default=512)
    e.add_argument("--out", default="sine_out.png")
    e.add_argument("--v", type=float, default=0.7, help="eq. 3's v (fine-tuned weight 1 - v)")
    e.add_argument("--K", type=int, default=400, help="eq. 3 for t > K, plain CFG below")
    e.add_argument("--cfg", type=float, default=7.5)
    e.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps")
    return ap


def _load(a, device):
    from ..sd.loader import load_sd

    t0 = time.perf_counter()
    model = load_sd(a.checkpoint, device=device, config_dir=a.config_dir)
    print(f"loaded {a.checkpoint} on {device} in {time.perf_counter() - t0:.1f} s")
    return model


def finetune_command(ap, a) -> None:
    from ..images import pil_to_tensor
    from ..images import load_image
    from ..lora import LoRAConfig
    from .artifact import save_sine
    from .finetune import SineFineTuneConfig, finetune_sine
    from .patches import PatchConfig

    if a.size % 8:
        ap.error("--size must be a multiple of 8")
    if Path(a.out).suffix != ".safetensors":
        ap.error("--out must name a .safetensors file")
    image = cli.open_image(a.image, "--image")
    cli.make_folder(Path(a.out).parent, "--out")
    plan = cli.checkpoint_plan(a, a.out)
    device = cli.device(a.device)
    with cli.checking("--pooled-x0-weight"):
        config = SineFineTuneConfig(mode=a.mode, steps=a.steps, lr=a.lr, lora=LoRAConfig(a.rank, float(a.rank)),
                                    patches=a.patches, patch=PatchConfig(high_resolution=2 * a.size, size=a.size),
                                    pooled_x0_weight=a.pooled_x0_weight, size=a.size, seed=a.seed,
                                    gradient_checkpointing=device.type == "cuda",
                                    train_text_encoder=a.train_text_encoder, text_mode=a.text_mode,
                                    text_lr=a.text_lr)
    cli.check_checkpoint(a.checkpoint, a.config_dir)
    model = _load(a, device)
    if a.train_text_encoder and model.pooled_dim:
        raise cli.CLIError("--train-text-encoder", "the pack trains SD 1.x's text encoder, not SDXL's two",
                           "leave --train-text-encoder off on SDXL: the UNet is fine-tuned alone")
    img = pil_to_tensor(image)[None] if a.patches else load_image(image, a.size)
    every = max(1, config.total_steps // 10)

    def report(i, n, info):
        if i % every == 0 or i == n:
            pace = pace_text(info)
            print(f"step {i}/{n} loss {info['loss']:.4f}" + (f"  ({pace})" if pace else ""))

    cond = None if a.train_text_encoder else model.encode_text([a.prompt])
    tuned = finetune_sine(model, img, cond, config, on_step=report, prompt=a.prompt, checkpoints=plan)
    extra = (", patches" if a.patches else "") + (f", text encoder {a.text_mode}" if a.train_text_encoder else "")
    print(f"fine-tuned ({a.mode}{extra}) in {tuned.seconds:.1f} s")
    print(f"saved the tuned delta to {save_sine(tuned, a.prompt, a.out)}")


def edit_command(ap, a) -> None:
    from ..artifact_io import atomic_write_image
    from ..images import tensor_to_pil
    from .artifact import load_sine
    from .edit import edit

    if a.width % 8 or a.height % 8:
        ap.error("--width and --height must be multiples of 8")
    if not 0.0 <= a.v <= 1.0:
        raise cli.CLIError("--v", f"{a.v} is outside [0, 1]", "use a weight in [0, 1] (paper: 0.7)")
    if not 0 <= a.K <= 999:
        raise cli.CLIError("--K", f"{a.K} is outside [0, 999]", "use a timestep in 0..999 (paper: 400)")
    out = cli.check_image_output(a.out, "--out")
    device = cli.device(a.device)
    tuned, prompt = load_sine(a.tuned)
    finetune_prompt = a.finetune_prompt if a.finetune_prompt is not None else prompt
    if not finetune_prompt and tuned.c_hat is None:
        raise cli.CLIError("--finetune-prompt", f"{Path(a.tuned).name} stores no fine-tune prompt",
                           'give it, e.g. --finetune-prompt "a photo of a sks dog"')
    cli.check_checkpoint(a.checkpoint, a.config_dir)
    model = _load(a, device)
    c, u = (model.encode_text([p]) for p in (a.target, ""))
    if a.finetune_prompt is None and tuned.c_hat is not None:  # exactly the c^ training used
        c_hat = tuned.c_hat
    elif tuned.text_deltas:  # c^ through the fine-tuned text encoder, as the official sampler
        with torch.no_grad(), model.text_adapted(tuned.text_weight_functions()) as encode:
            c_hat = encode(finetune_prompt)
    else:
        c_hat = model.encode_text([finetune_prompt])
    latent = edit(model, tuned, c, c_hat, u, (1, 4, a.height // 8, a.width // 8), a.steps, a.cfg, a.v, a.K, a.seed)
    atomic_write_image(tensor_to_pil(model.decode(latent)[0]), out)
    print(f"wrote {out} (v {a.v:g}, K {a.K}, {'with' if tuned.positional else 'without'} positional map)")


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    a = ap.parse_args(argv)
    (finetune_command if a.command == "finetune" else edit_command)(ap, a)


if __name__ == "__main__":
    cli.run_cli(main)
