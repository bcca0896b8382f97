"""LayerDiffusion end to end outside ComfyUI (Li et al. 2023, arXiv 2305.18676), on an SD 1.x checkpoint.

    python -m core.layerdiffusion --checkpoint v1-5-pruned-emaonly.safetensors \\
        --image dog.png --mask-image dog_mask.png --reference beach.png --mask-reference beach_mask.png \\
        --object-text "a photo of a jumping dog" --background-text "on the beach" --out out.png

(Not lllyasviel's "LayerDiffuse" transparency project.)  Stages: see :mod:`core.layerdiffusion.pipeline`.
Masks are image files, white = object, at the size of their image (``--mask-reference`` all black
for a reference that is pure background), or come from Segment Anything as the paper's do:
``--sam sam_vit_b.pth --object-box x0,y0,x1,y1`` instead of ``--mask-image`` (and
``--reference-box`` instead of ``--mask-reference``), boxes in pixels of the original image
(:func:`core.sam.segment`, single-mask output for a box).  Everything is read from local files
(offline).  ``--save-delta`` keeps the trained delta with e^_a, e^_b and e_opt (``sie.layerdiffusion``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from PIL import Image

from .. import cli
from ..artifact_io import atomic_write_image
from ..images import tensor_to_pil
from .embedding import READINGS, LayerEmbeddingConfig
from .finetune import SOURCES, LayeredFineTuneConfig
from .guidance import GuidanceConfig
from .masks import REDUCTIONS, RULES

LATENT_FACTOR = 8  # SD 1.x VAE: the latent grid is 1/8 of the image
MASK_FIX = {"--mask-image": "give the object mask of --image (white = object) at the size of --image, or "
                            "--sam FILE --object-box x0,y0,x1,y1",
            "--mask-reference": "give the object mask of --reference (white = object; all black for a pure "
                                "background) at the size of --reference, or --sam FILE --reference-box x0,y0,x1,y1"}
BOX_OF = {"--mask-image": "--object-box", "--mask-reference": "--reference-box"}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core.layerdiffusion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="SD 1.x .safetensors (original layout) or diffusers folder")
    ap.add_argument("--image", required=True, help="the input image (its subject is kept)")
    ap.add_argument("--mask-image", default=None, help="object mask of --image (white = object)")
    ap.add_argument("--reference", default=None, help="the reference image (its background is used)")
    ap.add_argument("--mask-reference", default=None, help="object mask of --reference (all black: none)")
    ap.add_argument("--sam", default=None, help="a Segment Anything checkpoint (ViT-B/L/H .pth or .safetensors): "
                                                "masks from --object-box / --reference-box")
    ap.add_argument("--object-box", default=None, help="x0,y0,x1,y1: the object in --image, in its pixels (with --sam)")
    ap.add_argument("--reference-box", default=None, help="x0,y0,x1,y1: the object in --reference (with --sam)")
    ap.add_argument("--object-text", required=True, help="T_a: the object, its properties and action")
    ap.add_argument("--background-text", required=True, help="T_b: the background")
    ap.add_argument("--out", default="layerdiffusion_out.png", help="output PNG")
    ap.add_argument("--size", type=cli.positive_int, default=512, help="square working size (multiple of 8)")
    ap.add_argument("--alpha", type=float, default=0.7, help="eq. 3: weight of e^_a in e_opt (paper: 0.7)")
    ap.add_argument("--reading", default="separate", choices=READINGS, help="how [e_a, e_b] enters the UNet")
    ap.add_argument("--emb-steps", type=cli.positive_int, default=500)
    ap.add_argument("--emb-lr", type=cli.positive_float, default=1e-3)
    ap.add_argument("--mode", default="lora", choices=["lora", "full"], help="fine-tune LoRA or every weight "
                                                                            "(the paper: full)")
    ap.add_argument("--ft-steps", type=cli.positive_int, default=250)
    ap.add_argument("--ft-lr", type=cli.positive_float, default=None, help="default: 1e-4 (lora) / 2e-6 (full)")
    ap.add_argument("--rank", type=cli.positive_int, default=8)
    ap.add_argument("--lambda-obj", type=float, default=2.0, help="lambda_1 (paper: 2, 3 for small objects)")
    ap.add_argument("--lambda-bg", type=float, default=1.0, help="lambda_2 (paper: 1)")
    ap.add_argument("--object-source", default="image", choices=SOURCES, help="the image L_obj is computed on")
    ap.add_argument("--background-source", default="reference", choices=SOURCES,
                    help="the image L_bg is computed on")
    ap.add_argument("--reduction", default="image", choices=REDUCTIONS, help="masked loss: mean over the image "
                                                                             "or over the mask")
    ap.add_argument("--mask-rule", default="area", choices=RULES, help="pixel mask -> latent grid")
    ap.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps")
    ap.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance inside each step")
    ap.add_argument("--start-parity", default="auto", choices=["auto", "0", "1"],
                    help="step indices of this parity use e^_a (auto: the paper's t = steps - index even)")
    ap.add_argument("--seed", type=cli.seed, default=0, help="0 .. 2**64-1")
    ap.add_argument("--device", default=None)
    ap.add_argument("--config-dir", default=None, help="unet/vae/text_encoder configs for a non-standard SD 1.x "
                                                       "file (default: the shipped SD 1.5 configs)")
    ap.add_argument("--save-delta", default=None, help="also save the delta and e^_a, e^_b, e_opt (.safetensors)")
    return ap


def parse_box(text: str, arg: str) -> tuple[float, ...]:
    try:
        box = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise cli.CLIError(arg, f"'{text}' is not a box", "write x0,y0,x1,y1 in pixels, e.g. 30,20,90,80")
    return box


def mask_sources(a, image, reference) -> dict:
    """Phase 1 of the masks (cheap): which argument gives each mask, mask files opened and checked against
    their image's size, SAM boxes parsed and checked against it.  {mask arg: (image, PIL mask or None,
    box or None)}."""
    from ..sam import check_prompt

    wanted = [("--mask-image", a.mask_image, a.object_box, "--image", image)]
    if reference is not None:
        wanted.append(("--mask-reference", a.mask_reference, a.reference_box, "--reference", reference))
    elif a.reference_box is not None:
        raise cli.CLIError("--reference-box", "given without --reference", "give --reference too, or drop it")
    sources = {}
    for arg, path, box, of, img in wanted:
        box_arg = BOX_OF[arg]
        if path is not None and box is not None:
            raise cli.CLIError(box_arg, f"given with {arg}", f"give {arg} or {box_arg}, not both")
        if path is None and box is None:
            raise cli.CLIError(arg, "missing" + (" (the reference needs its object mask)" if of == "--reference"
                                                 else ""), MASK_FIX[arg])
        if box is not None:
            if a.sam is None:
                raise cli.CLIError(box_arg, "needs --sam FILE (a Segment Anything checkpoint)",
                                   f"add --sam, or give {arg} instead")
            box = parse_box(box, box_arg)
            with cli.checking(box_arg, f"give x0,y0,x1,y1 inside {of} ({img.size[0]}x{img.size[1]} pixels)"):
                check_prompt(None, None, box, img.size[1], img.size[0])
            sources[arg] = (img, None, box)
            continue
        mask = cli.open_image(path, arg)
        if mask.size != img.size:
            raise cli.CLIError(arg, f"the mask is {mask.size[0]}x{mask.size[1]} but {of} is "
                                    f"{img.size[0]}x{img.size[1]}", MASK_FIX[arg])
        sources[arg] = (img, mask, None)
    if any(box is not None for _, _, box in sources.values()):
        try:
            import segment_anything  # noqa: F401
        except ImportError:
            raise cli.CLIError("--sam", "the segment_anything package is not installed",
                               "pip install segment-anything, or give mask files") from None
        if not Path(a.sam).is_file():
            raise cli.CLIError("--sam", f"{a.sam}: file not found",
                               "give an original SAM ViT-B/L/H checkpoint (.pth or .safetensors)")
    return sources


def make_masks(a, sources: dict, emb_config, ft_config, device):
    """Phase 2: SAM masks for the boxes (the SAM model loaded once, then dropped), every mask brought to
    the working size and checked on the latent grid; a bad mask names its argument (or its box)."""
    from ..images import pil_to_tensor
    from .pipeline import load_mask, prepare_masks

    pixel = {}
    boxes = {arg: box for arg, (_, _, box) in sources.items() if box is not None}
    if boxes:
        from .. import sam as sam_module

        with cli.checking("--sam", "give an original SAM ViT-B/L/H checkpoint (.pth or .safetensors)"):
            predictor = sam_module.load_sam(a.sam, device)
        for arg, box in boxes.items():
            m = sam_module.segment(predictor, pil_to_tensor(sources[arg][0]).permute(1, 2, 0), box=box)
            pixel[arg] = load_mask(Image.fromarray((m.cpu().numpy() * 255).round().astype("uint8"), "L"), a.size)
            print(f"SAM mask for {BOX_OF[arg]}: {m.mean().item():.1%} of the image")
        del predictor
    for arg, (_, mask, _) in sources.items():
        if mask is not None:
            pixel[arg] = load_mask(mask, a.size)
    hw = (a.size // LATENT_FACTOR, a.size // LATENT_FACTOR)
    try:
        prepare_masks(pixel["--mask-image"], pixel.get("--mask-reference"), hw, emb_config, ft_config,
                      rule=a.mask_rule)
    except ValueError as e:
        arg = "--mask-reference" if str(e).startswith("mask_reference") else "--mask-image"
        problem = str(e).split(": ", 1)[-1]
        if arg in boxes:  # a SAM mask: name the box that gave it
            raise cli.CLIError(BOX_OF[arg], f"the SAM mask: {problem}", "draw the box around a larger object, "
                                                                       "or give a mask file") from None
        raise cli.CLIError(arg, problem, MASK_FIX[arg]) from None
    return pixel["--mask-image"], pixel.get("--mask-reference")


def main(argv: list[str] | None = None) -> None:
    from ..imagic.__main__ import check_checkpoint
    from ..lora import LoRAConfig

    ap = parser()
    a = ap.parse_args(argv)
    if a.size % LATENT_FACTOR:
        ap.error("--size must be a multiple of 8")
    if a.save_delta and Path(a.save_delta).suffix != ".safetensors":
        ap.error("--save-delta must name a .safetensors file")

    # Every check that bad input can fail, before the (slow) model load and training.
    if not math.isfinite(a.alpha):
        raise cli.CLIError("--alpha", f"{a.alpha} is not a finite number", "use e.g. --alpha 0.7 (the paper)")
    for arg, value in (("--lambda-obj", a.lambda_obj), ("--lambda-bg", a.lambda_bg)):
        if not (math.isfinite(value) and value >= 0):
            raise cli.CLIError(arg, f"{value} is not a weight >= 0", "paper: --lambda-obj 2 --lambda-bg 1")
    if a.lambda_obj + a.lambda_bg == 0:
        raise cli.CLIError("--lambda-obj", "both loss weights are 0, nothing would be trained",
                           "paper: --lambda-obj 2 --lambda-bg 1")
    ft_config = LayeredFineTuneConfig(mode=a.mode, steps=a.ft_steps, lr=a.ft_lr, lora=LoRAConfig(a.rank, float(a.rank)),
                                      lambda_obj=a.lambda_obj, lambda_bg=a.lambda_bg, object_source=a.object_source,
                                      background_source=a.background_source, reduction=a.reduction, seed=a.seed)
    if ft_config.needs_reference and a.reference is None:
        raise cli.CLIError("--reference", "missing; the fine-tuning computes a term on the reference",
                           "give --reference (and --mask-reference), or --object-source image --background-source "
                           "image")
    image = cli.open_image(a.image, "--image")
    reference = cli.open_image(a.reference, "--reference") if a.reference is not None else None
    emb_config = LayerEmbeddingConfig(a.emb_steps, a.emb_lr, a.reading, a.reduction, a.seed)
    out = cli.check_image_output(a.out, "--out")
    if a.save_delta:
        cli.make_folder(Path(a.save_delta).parent, "--save-delta")
    device = cli.device(a.device)
    sources = mask_sources(a, image, reference)
    check_checkpoint(a.checkpoint, a.config_dir)
    mask_image, mask_reference = make_masks(a, sources, emb_config, ft_config, device)  # SAM runs here

    from dataclasses import replace

    from ..sd.loader import load_sd15
    from .artifact import save_layerdiffusion
    from .pipeline import edit, load_image

    t0 = time.perf_counter()
    model = load_sd15(a.checkpoint, device=device, config_dir=a.config_dir)
    print(f"loaded {a.checkpoint} on {device} in {time.perf_counter() - t0:.1f} s")
    gpu = device.type == "cuda"
    result = edit(model, load_image(image, a.size), load_image(reference, a.size) if reference is not None else None,
                  a.object_text, a.background_text, mask_image, mask_reference,
                  replace(emb_config, gradient_checkpointing=gpu), a.alpha,
                  replace(ft_config, gradient_checkpointing=gpu), a.mask_rule)
    parity = None if a.start_parity == "auto" else int(a.start_parity)
    trace: list[int] = []
    side = a.size // LATENT_FACTOR
    img = result.render(model, (1, 4, side, side), GuidanceConfig(a.steps, a.cfg, parity), a.seed, trace)
    atomic_write_image(tensor_to_pil(img[0]), out)
    print(f"wrote {out} (alpha {a.alpha:g}; e^_a on {trace.count(0)} of {len(trace)} steps)")
    if a.save_delta:
        path = save_layerdiffusion(result, a.save_delta, a.object_text, a.background_text)
        print(f"saved the trained delta and e^_a, e^_b, e_opt to {path}")


if __name__ == "__main__":
    cli.run_cli(main)
