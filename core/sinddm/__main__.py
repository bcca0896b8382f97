"""Command line for SinDDM: ``python -m core.sinddm {demo,train,sample} ...`` from the pack's folder.

``demo`` trains on a bundled image of repeated elements (96x75 colonic glands) with
CPU-sized settings (4 to 9 minutes in all on a 2-core CPU, with or without bf16 units:
benchmarks/results/sinddm_demo_cpu.json), then writes a grid of samples at two sizes, the
loss curve and the model, and prints where they are.  ``--paper`` selects the paper's settings (width 160, batch 32, 120k
steps on the 250x200 image): about 7 h on an A6000 in the paper, weeks on a CPU
(benchmarks/results/sinddm_speed_paper_cpu.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import cli
from ..artifact_io import ArtifactError, atomic_write_image
from ..fit import pace_text
from ..plot import grid, loss_curve
from ..seeds import derive_seed
from . import NetConfig, Pyramid, SinDDM, TrainConfig, build_pyramid, load, sample, save, train
from .pyramid import MIN_INPUT_SIDE

DATA = Path(__file__).resolve().parent / "data"
DEMO = dict(image=DATA / "glands_96x75.png", steps=1400, width=48, batch=8)
PAPER = dict(image=DATA / "coffee_250x200.png", steps=120_000, width=160, batch=32)


def _progress(total: int, every: int):
    window: list[float] = []

    def on_step(i, n, info):
        window.append(info.get("loss", float("nan")))
        if i % every == 0 or i == n:
            pace = pace_text(info)  # the fit loop's moving average: right after a resume too
            print(f"  step {i:>6}/{n}  loss {sum(window) / len(window):.4f}" + (f"  ({pace})" if pace else ""),
                  flush=True)
            window.clear()

    return on_step


def prepare_train(a) -> Pyramid:
    """Every check of demo/train that can fail on bad input, before training starts."""
    img = cli.open_image(a.image, "--image")
    with cli.checking("--image", f"use an image at least {MIN_INPUT_SIDE} px on each side"):
        pyr = build_pyramid(img)
    cli.make_folder(a.out, "--out")
    return pyr


def cmd_train(a, pyr: Pyramid, device: torch.device) -> SinDDM:
    spec = pyr.spec
    print(f"image {a.image} -> {spec.n_scales} scales "
          f"({', '.join(f'{w}x{h}' for h, w in spec.sizes)}), r = {spec.scale_factor:.4f}")
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, lr=a.lr, seed=a.seed, precision=a.precision)
    print(f"training {cfg.steps} steps, width {a.width}, batch {cfg.batch_size} on {device}")
    plan = cli.checkpoint_plan(a, Path(a.out) / "model")  # default folder: <out>/model_checkpoints
    res = train(pyr, NetConfig(a.width), cfg, device, on_step=_progress(cfg.steps, max(1, cfg.steps // 20)),
                checkpoints=plan)
    model = SinDDM.create(res.net, pyr, res.info())
    print(f"done in {res.seconds / 60:.1f} min; start steps T[s] = {list(model.schedule.start_steps)}")
    out = Path(a.out)
    path = save(model, out / "sinddm.safetensors")
    atomic_write_image(loss_curve(res.losses, title="SinDDM training loss (L1 on eps)"), out / "loss.png")
    print(f"model:      {path}\nloss curve: {out / 'loss.png'}")
    return model


def load_model(a, device: torch.device) -> SinDDM:
    """The --model of ``sample``, checked (format tag first) before sampling starts."""
    with cli.checking("--model", "give a .safetensors model written by `python -m core.sinddm train` "
                                 "or Save SinDDM Model", errors=(ArtifactError,)):
        model = load(a.model, device)
    cli.make_folder(a.out, "--out")
    return model


def cmd_sample(a, model: SinDDM, device: torch.device) -> None:
    out = Path(a.out)
    t0 = time.perf_counter()
    same = sample(model, count=a.count, seed=a.seed, device=device)
    wide = sample(model, count=max(1, a.count // 2), seed=derive_seed(a.seed, 1000), scale_mul=(1.0, 2.0),
                  device=device)
    h, w = model.training_size
    print(f"sampled {a.count} at {w}x{h} and {max(1, a.count // 2)} at {2 * w}x{h} in "
          f"{time.perf_counter() - t0:.1f} s")
    train_img = model.pyramid.images[-1][0].add(1).div(2)
    picture = grid([[train_img], list(same), list(wide)])
    atomic_write_image(picture, out / "samples.png")
    print(f"samples:    {out / 'samples.png'}  (row 1: training image; row 2: same size; row 3: twice as wide)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m core.sinddm", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--out", default="sinddm_out", help="output folder (default: ./sinddm_out)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--seed", type=cli.seed, default=0, help="0 .. 2**64-1")

    for name in ("demo", "train"):
        p = sub.add_parser(name, help="train on an image" + (" (bundled, CPU-sized) and sample" if name == "demo" else ""))
        p.add_argument("--image", default=None, help=f"training image (default: {DEMO['image'].name})")
        p.add_argument("--steps", type=cli.positive_int, default=None, help=f"training steps (default {DEMO['steps']})")
        p.add_argument("--width", type=cli.positive_int, default=None,
                       help=f"network width (default {DEMO['width']}; paper 160)")
        p.add_argument("--batch", type=cli.positive_int, default=None,
                       help=f"batch size (default {DEMO['batch']}; paper 32)")
        p.add_argument("--lr", type=cli.positive_float, default=1e-3)
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
        p.add_argument("--paper", action="store_true", help="the paper's settings (250x200 image, width 160, "
                                                            "batch 32, 120k steps): for a GPU")
        p.add_argument("--count", type=cli.positive_int, default=4, help="samples per size (demo)")
        common(p)
        cli.add_checkpoint_args(p)
    p = sub.add_parser("sample", help="sample from a saved model")
    p.add_argument("--model", required=True)
    p.add_argument("--count", type=cli.positive_int, default=4)
    common(p)
    a = ap.parse_args(argv)

    device = cli.device(a.device)
    if a.cmd in ("demo", "train"):
        base = PAPER if a.paper else DEMO
        for key in ("image", "steps", "width", "batch"):
            if getattr(a, key) is None:
                setattr(a, key, base[key])
        pyr = prepare_train(a)
        try:
            model = cmd_train(a, pyr, device)
        except KeyboardInterrupt:
            sys.exit("interrupted")
        if a.cmd == "demo":
            cmd_sample(a, model, device)
    else:
        cmd_sample(a, load_model(a, device), device)


if __name__ == "__main__":
    cli.run_cli(main)
