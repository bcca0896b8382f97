"""The rectifier outside ComfyUI (Hou et al., AAAI 2024), on a pixel DDPM or an SD 1.x / SDXL checkpoint.

    python -m core.rectifier train --mode recon --model ddpm-celebahq-256 --images faces/ --out recon.safetensors
    python -m core.rectifier train --mode edit --model ddpm-celebahq-256 --images faces/ --continue recon.safetensors \\
        --clip ViT-B-16.safetensors --clip-arch ViT-B-16 --source "face" --target "smiling face" --out smile.safetensors
    python -m core.rectifier edit --model ddpm-celebahq-256 --rectifier smile.safetensors --image face.png \\
        --out smiling.png [--t0 500]

``--model``: a diffusers UNet2DModel folder / single file (pixel DDPM) or an SD 1.x / SDXL checkpoint
(``--kind`` says which when the file does not).  Several processes (``torchrun --nproc_per_node N
-m core.rectifier train ...``) train with DistributedDataParallel, N x --batch images per step.
``edit`` by default inverts the image to x_T with DDIM, then samples x_T back with DDIM and the
rectified model, the image as x_0 at every step (the paper's "N inversion and denoising steps", Table 1
and Figs. 1, 5, 12-13).  A reconstruction rectifier inverts too (the rectified model runs both halves of
the round trip); for an edit rectifier the plain model inverts, or ``--invert-with recon.safetensors``
(the rectifier the edit continued from).  ``--plain-out`` also writes the plain model's own round trip,
and the outputs are scored against the input (L1, L2, SSIM).  ``--start noise`` samples the full DDPM
trajectory from pure noise instead, ``--start sdedit --t0 T`` (or ``--t0`` alone) from the image noised
to T (SDEdit, the paper's image-to-image section).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import cli
from ..fit import pace_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _blocks(text: str) -> tuple[int, ...]:
    v = tuple(int(x) for x in text.split(","))
    if len(v) != 4 or min(v) < 1:
        raise argparse.ArgumentTypeError("four positive block counts, e.g. 3,4,6,3 (ResNet-34)")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="pixel DDPM (diffusers folder or file) or SD 1.x / SDXL checkpoint")
    p.add_argument("--kind", default="auto", choices=["auto", "pixel", "sd"])
    p.add_argument("--size", type=cli.positive_int, default=None,
                   help="image size (default: the pixel model's sample_size, 512 for SD)")
    p.add_argument("--prompt", default="", help="SD only: the text condition (default: empty)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--device", default=None)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core.rectifier", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="reconstruction (eq. 3) or editing (Alg. 1) training")
    _common(t)
    t.add_argument("--mode", default="recon", choices=["recon", "edit"])
    t.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    t.add_argument("--out", required=True, help="the rectifier (.safetensors)")
    t.add_argument("--continue", dest="cont", default=None, help="a rectifier file to continue from")
    t.add_argument("--steps", type=cli.positive_int, default=None, help="default: 5000 (recon), 200 (edit)")
    t.add_argument("--batch", type=cli.positive_int, default=8, help="images per step and process")
    t.add_argument("--lr", type=cli.positive_float, default=1e-3)
    t.add_argument("--estimate", default="base", choices=["base", "modulated"])
    t.add_argument("--clip", default=None, help="edit: an OpenCLIP checkpoint (local file)")
    t.add_argument("--clip-arch", default="ViT-B-16")
    t.add_argument("--source", default="", help='edit: the source text, e.g. "face"')
    t.add_argument("--target", default="", help='edit: the target text, e.g. "smiling face"')
    t.add_argument("--lambda-clip", type=float, default=1.0)
    t.add_argument("--lambda-recon", type=float, default=1.0)
    t.add_argument("--encoder-blocks", type=_blocks, default=(3, 4, 6, 3), help="ResNet blocks (3,4,6,3 = ResNet-34)")
    t.add_argument("--encoder-weights", default=None, help="torchvision ResNet-34 ImageNet weights (local file)")
    cli.add_checkpoint_args(t)
    t.add_argument("--width", type=cli.positive_int, default=64, help="channels of each subnet branch")
    e = sub.add_parser("edit", help="reconstruct or edit an image with the rectified model (DDIM inversion, then "
                                    "sampling; or DDPM from noise; or SDEdit)")
    _common(e)
    e.add_argument("--rectifier", required=True)
    e.add_argument("--image", required=True)
    e.add_argument("--out", default="rectified.png")
    e.add_argument("--start", default=None, choices=STARTS,
                   help="inversion (default): DDIM-invert the image (see --invert-with), then DDIM-sample it back "
                        "with the rectified model (the paper's 'N inversion and denoising steps'); noise: DDPM from "
                        "pure noise with the image as x_0 at every step; sdedit: DDPM from the image noised to --t0")
    e.add_argument("--steps", type=cli.positive_int, default=50,
                   help="inversion and sampling steps (DDIM), or DDPM steps (respaced) for noise / sdedit")
    e.add_argument("--t0", type=int, default=None, help="SDEdit: start from the image noised to this timestep "
                                                        "(implies --start sdedit)")
    e.add_argument("--invert-with", default=None, metavar="rectifier|plain|FILE",
                   help="inversion: the model that inverts. Default: the rectifier itself when it was trained for "
                        "reconstruction (a DDIM round trip is faithful when one model runs both halves), the plain "
                        "model when it was trained for an edit (inverting with it would let its sampling undo the "
                        "edit); or another rectifier file, e.g. the reconstruction rectifier the edit continued from")
    e.add_argument("--plain-out", default=None, help="inversion: also write the plain model's reconstruction (the "
                                                     "plain model inverting and sampling back), to compare")
    e.add_argument("--strength", type=float, default=1.0)
    e.add_argument("--estimate", default="base", choices=["base", "modulated"])
    return ap


STARTS = ("inversion", "noise", "sdedit")


def start_of(a) -> str:
    """--start, resolved: --t0 alone means sdedit (as before --start existed); otherwise inversion."""
    start = a.start or ("sdedit" if a.t0 is not None else "inversion")
    if start == "sdedit" and a.t0 is None:
        raise cli.CLIError("--t0", "SDEdit needs the timestep to start from", "e.g. --start sdedit --t0 500")
    if start != "sdedit" and a.t0 is not None:
        raise cli.CLIError("--t0", f"only SDEdit starts from a timestep, not --start {start}",
                           "drop --t0, or use --start sdedit")
    for flag, value in (("--plain-out", a.plain_out), ("--invert-with", a.invert_with)):
        if value is not None and start != "inversion":
            raise cli.CLIError(flag, f"only --start inversion inverts, not --start {start}",
                               f"drop {flag}, or use --start inversion")
    return start


def _kind(a) -> str:
    if a.kind != "auto":
        return a.kind
    p = Path(a.model)
    if p.is_file() and p.suffix == ".safetensors":
        from ..sd.checkpoint import CheckpointError, inspect_checkpoint

        try:
            if inspect_checkpoint(p).family.startswith("sd"):
                return "sd"
        except CheckpointError:
            pass
    return "pixel"


def load_model(a, device):
    if not Path(a.model).exists():
        raise cli.CLIError("--model", f"{a.model}: not found", "give a pixel DDPM folder/file or an SD 1.x / SDXL checkpoint")
    kind = _kind(a)
    t0 = time.perf_counter()
    with cli.checking("--model", "give a diffusers UNet2DModel DDPM or an SD 1.x / SDXL checkpoint (--kind)"):
        if kind == "sd":
            from ..sd.loader import load_sd

            model = load_sd(a.model, device=device)
        else:
            from ..pixel import DiffusersPixel

            model = DiffusersPixel.load(a.model, device=device)
    print(f"loaded {Path(a.model).name} ({kind}) on {device} in {time.perf_counter() - t0:.1f} s")
    return model, kind


def image_paths(items: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise cli.CLIError("--images", f"{item}: not found", "give image files or folders of images")
    if not out:
        raise cli.CLIError("--images", "no images found", f"use files ending in {sorted(IMAGE_SUFFIXES)}")
    return out


def to_model_space(model, kind: str, images: torch.Tensor) -> torch.Tensor:
    if kind == "sd":
        return torch.cat([model.encode(images[i:i + 1]) for i in range(images.shape[0])])
    return images.to(model.device) * 2 - 1


def _size(a, model, kind) -> int:
    if a.size:
        return a.size
    return int(model.unet.config.sample_size) if kind == "pixel" else 512


def train_command(ap, a) -> None:
    from ..images import load_image
    from .artifact import RectifierInfo, check_fits, load_rectifier, save_rectifier
    from .distributed import setup, teardown
    from .train import TrainConfig, train_rectifier

    if Path(a.out).suffix != ".safetensors":
        ap.error("--out must name a .safetensors file")
    if a.mode == "edit" and not (a.clip and a.target):
        raise cli.CLIError("--clip" if not a.clip else "--target", "edit training needs a CLIP model and a target text",
                           '--clip open_clip.safetensors --source "face" --target "smiling face"')
    paths = image_paths(a.images)
    rank, size, device = setup(cli.device(a.device))
    try:
        if rank == 0:
            cli.make_folder(Path(a.out).parent, "--out")
        plan = cli.checkpoint_plan(a, a.out)  # every rank resumes; rank 0 writes
        model, kind = load_model(a, device)
        s = _size(a, model, kind)
        if kind == "sd" and s % 8:
            ap.error("--size must be a multiple of 8 for SD")
        with cli.checking("--images"):
            images = torch.cat([load_image(p, s) for p in paths])
        x0 = to_model_space(model, kind, images)
        params = model.unet_parameters()
        if a.cont:
            rectifier, info = load_rectifier(a.cont, device)
            with cli.checking("--continue"):
                check_fits(rectifier, params)
        else:
            from . import new_rectifier

            rectifier = new_rectifier(params, x0.shape[1], encoder_layers=a.encoder_blocks, width=a.width,
                                      estimate_clip=1.0 if kind == "pixel" else 4.0, seed=a.seed,
                                      encoder_norm="batch" if a.encoder_weights else "group")
            if a.encoder_weights:
                from .hypernet import load_encoder_weights

                with cli.checking("--encoder-weights"):
                    load_encoder_weights(rectifier, a.encoder_weights)
            info = RectifierInfo("pixel" if kind == "pixel" else "ldm")
        steps = a.steps or (5000 if a.mode == "recon" else 200)
        with cli.checking("--lambda-clip"):
            config = TrainConfig(mode=a.mode, steps=steps, batch=a.batch, lr=a.lr, estimate=a.estimate,
                                 lambda_clip=a.lambda_clip, lambda_recon=a.lambda_recon, seed=a.seed)
        cond = model.encode_text([a.prompt]) if kind == "sd" else None
        clip = to_image = None
        if a.mode == "edit":
            from ..clip_model import load_open_clip
            from .clip_direction import DirectionalCLIP

            with cli.checking("--clip"):
                oc = load_open_clip(a.clip, a.clip_arch, device)
            with cli.checking("--target"):
                clip = DirectionalCLIP(oc, a.source, a.target)
            to_image = (lambda z: (z.clamp(-1, 1) + 1) / 2) if kind == "pixel" else model.decode_differentiable
        every = max(1, steps // 20)

        def report(i, n, inf):
            if rank == 0 and (i % every == 0 or i == n):
                terms = " ".join(f"{k} {v:.4f}" for k, v in inf["terms"].items())
                pace = pace_text(inf)
                print(f"step {i}/{n} loss {inf['loss']:.4f} ({terms}) lr {inf['lr']:.2e}" + (f"  ({pace})" if pace else ""))

        # edit: the CLIP source images are the originals as to_image renders them (train_rectifier's default):
        # for SD the VAE-decoded latents, so the VAE's own reconstruction error is no part of dI (as in the node)
        res = train_rectifier(model, rectifier, x0, config, cond=cond, clip=clip, to_image=to_image, on_step=report,
                              checkpoints=plan)
        info.mode = a.mode
        info.steps += steps
        if a.mode == "edit":
            info.source_text, info.target_text = a.source, a.target
        info.history.append({"mode": a.mode, "steps": steps, "batch": a.batch, "processes": size, "lr": a.lr,
                             "images": len(paths), "final_loss": res.losses[-1], "seconds": res.seconds})
        if rank == 0:
            print(f"trained ({a.mode}, {steps} steps, {size} process(es)) in {res.seconds:.1f} s")
            print(f"saved the rectifier to {save_rectifier(rectifier, info, a.out)}")
    finally:
        teardown()


def edit_command(ap, a) -> None:
    from ..artifact_io import atomic_write_image
    from ..images import tensor_to_pil
    from ..images import load_image
    from .artifact import check_fits, load_rectifier
    from .metrics import reconstruction_report
    from .sample import ddim_invert, ddim_sample, ddpm_sample, rectified

    out = cli.check_image_output(a.out, "--out")
    plain_out = cli.check_image_output(a.plain_out, "--plain-out") if a.plain_out else None
    start = start_of(a)
    image = cli.open_image(a.image, "--image")
    device = cli.device(a.device)
    rectifier, info = load_rectifier(a.rectifier, device)
    inverter, inverter_name = None, "plain"
    if start == "inversion":
        choice = a.invert_with or ("rectifier" if info.mode == "recon" else "plain")
        if choice == "rectifier":
            inverter, inverter_name = rectifier, "the rectifier itself"
        elif choice != "plain":
            if not Path(choice).is_file():
                raise cli.CLIError("--invert-with", f"{choice}: not found", "use rectifier, plain or a rectifier file")
            with cli.checking("--invert-with"):
                inverter, inv_info = load_rectifier(choice, device)
            inverter_name = f"{Path(choice).name} ({inv_info.mode})"
    model, kind = load_model(a, device)
    for flag, r in (("--rectifier", rectifier), ("--invert-with", inverter)):
        if r is not None:
            with cli.checking(flag):
                check_fits(r, model.unet_parameters())
    original = load_image(image, _size(a, model, kind))  # [1, 3, H, W] in [0, 1]
    x0 = to_model_space(model, kind, original)
    if a.t0 is not None and not 0 <= a.t0 < len(model.alphas_cumprod):
        raise cli.CLIError("--t0", f"{a.t0} is outside 0..{len(model.alphas_cumprod) - 1}", "e.g. --t0 500")
    cond = model.encode_text([a.prompt]) if kind == "sd" else None
    ab = model.alphas_cumprod
    to_image = (lambda z: (z.clamp(-1, 1) + 1) / 2) if kind == "pixel" else model.decode
    plain = None
    with torch.no_grad():
        def plain_eps(z, t):
            return model.eps(z, t, cond)

        if start == "inversion":  # DDIM inversion (plain model or a rectifier), then rectified DDIM sampling
            if inverter is None:
                x_T = ddim_invert(plain_eps, x0, ab, a.steps)
            else:
                with rectified(model, inverter, x0, a.strength, a.estimate, cond) as inv:
                    x_T = ddim_invert(inv, x0, ab, a.steps)
            with rectified(model, rectifier, x0, a.strength, a.estimate, cond) as r:
                x = ddim_sample(r, x_T, ab, a.steps)
            if plain_out is not None:
                plain = ddim_sample(plain_eps, ddim_invert(plain_eps, x0, ab, a.steps), ab, a.steps)
        else:
            gen = torch.Generator().manual_seed(a.seed)
            with rectified(model, rectifier, x0, a.strength, a.estimate, cond) as r:
                x = ddpm_sample(r, ab, tuple(x0.shape), a.steps, gen, device,
                                x_start=x0 if start == "sdedit" else None, t0=a.t0,
                                clip_x0=1.0 if kind == "pixel" else None)
        img = to_image(x)
    atomic_write_image(tensor_to_pil(img[0]), out)
    what = {"inversion": f"DDIM inversion by {inverter_name}, then rectified DDIM sampling",
            "noise": "DDPM from noise", "sdedit": f"SDEdit from t0 {a.t0}"}[start]
    print(f"wrote {out} ({what}, {a.steps} steps, strength {a.strength:g}, rectifier trained for {info.mode})")
    if start == "inversion":
        ref = original.to(img.device)
        scores = {"rectified": reconstruction_report(ref, img.float())}
        if plain is not None:
            with torch.no_grad():
                plain_img = to_image(plain)
            atomic_write_image(tensor_to_pil(plain_img[0]), plain_out)
            print(f"wrote {plain_out} (the plain model's DDIM inversion and sampling)")
            scores["plain"] = reconstruction_report(ref, plain_img.float())
        for name, sc in scores.items():
            print(f"{name} vs the input: L1 {sc['l1']:.4f}  L2 {sc['l2']:.4f}  SSIM {sc['ssim']:.4f}")


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    a = ap.parse_args(argv)
    (train_command if a.command == "train" else edit_command)(ap, a)


if __name__ == "__main__":
    cli.run_cli(main)
