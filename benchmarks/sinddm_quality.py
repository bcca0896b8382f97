"""SinDDM sample quality after a fixed training budget (no pretrained network needed).

    python benchmarks/sinddm_quality.py [--image ...] [--steps 1200 --width 64 --batch 8] [--samples 16]
    python benchmarks/sinddm_quality.py --model sinddm_out/sinddm.safetensors      # a trained model

Prints the paper's Table-1 pixel diversity and the sliced Wasserstein distance between
7x7 patch distributions of samples and training image at every pyramid scale (lower is
closer), next to two references: the untrained network (what training must beat) and
the training image against itself flipped (a "perfectly in-distribution" floor).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.sinddm import NetConfig, SinDDM, SinDDMNet, TrainConfig, build_pyramid, load, sample, train  # noqa: E402
from core.sinddm.metrics import multiscale_patch_swd, pixel_diversity  # noqa: E402


def measure(samples: torch.Tensor, reference: torch.Tensor, sizes) -> dict:
    """The paper's pixel diversity (nan for one sample) and the 7x7 patch SWD at every scale, with its mean."""
    swd = multiscale_patch_swd(samples, reference, sizes)
    div = pixel_diversity(samples, reference) if samples.shape[0] > 1 else float("nan")
    return {"diversity": div, "patch_swd_per_scale": swd, "patch_swd_mean": sum(swd) / len(swd)}


def report(name: str, samples: torch.Tensor, reference: torch.Tensor, sizes) -> None:
    m = measure(samples, reference, sizes)
    print(f"{name:<28} diversity {m['diversity']:.3f}   patch SWD per scale "
          + " ".join(f"{v:.4f}" for v in m["patch_swd_per_scale"]) + f"   mean {m['patch_swd_mean']:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=str(ROOT / "core/sinddm/data/coffee_128x100.png"))
    ap.add_argument("--model", default=None, help="evaluate a saved model instead of training")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.model:
        model = load(a.model, device)
        pyr = model.pyramid
        print(f"model {a.model}: {model.describe()}")
    else:
        from PIL import Image

        pyr = build_pyramid(Image.open(a.image))
        t0 = time.perf_counter()
        res = train(pyr, NetConfig(a.width), TrainConfig(steps=a.steps, batch_size=a.batch), device)
        model = SinDDM.create(res.net, pyr, res.info())
        print(f"trained {a.steps} steps, width {a.width}, batch {a.batch} in {time.perf_counter() - t0:.0f} s "
              f"(final loss {sum(res.losses[-50:]) / len(res.losses[-50:]):.4f})")
    ref = (pyr.images[-1] + 1) / 2
    sizes = pyr.spec.sizes
    report("training image, flipped", ref.flip(-1), ref, sizes)
    untrained = SinDDM.create(SinDDMNet(model.net.config), pyr)
    report("untrained network", sample(untrained, count=a.samples, seed=0, device=device), ref, sizes)
    t0 = time.perf_counter()
    samples = sample(model, count=a.samples, seed=0, device=device)
    print(f"sampled {a.samples} in {time.perf_counter() - t0:.1f} s")
    report("trained model", samples, ref, sizes)


if __name__ == "__main__":
    main()
