"""SinDDM training and sampling speed, optionally side by side with the official code.

    python benchmarks/sinddm_speed.py --image core/sinddm/data/coffee_128x100.png \\
        [--official /path/to/fallenshock/SinDDM] [--batch 32 --width 160 --steps 3] [--sample]

For every scale: the median time of one training step (batch of noisy copies, forward,
L1 loss, backward, Adam step) after a warm-up, and the peak resident memory of that
step (peak GPU memory on CUDA).  With ``--official`` the official classes are imported
from that checkout and timed in the same run, interleaved step by step with ours (same
image, batch, width, threads), and the ratio ours / official is printed.  ``--sample``
adds the time of one full-size sample.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import peak_mib, reset_peak, sync  # noqa: E402

from core.sinddm import NetConfig, SinDDM, SinDDMNet, TrainConfig, build_pyramid, sample  # noqa: E402
from core.sinddm.train import TrainStep, native_bf16  # noqa: E402


class Official:
    """The official training step, built from a checkout of fallenshock/SinDDM (not part of the pack)."""

    def __init__(self, checkout: str, image: str, batch: int, width: int, device: torch.device, pyramid):
        sys.path.insert(0, checkout)
        from SinDDM.functions import create_img_scales
        from SinDDM.models import MultiScaleGaussianDiffusion
        from SinDDM.models import SinDDMNet as OfficialNet

        work = Path(tempfile.mkdtemp(prefix="sinddm_official_"))
        shutil.copy(image, work / Path(image).name)
        sizes, losses, r, n = create_img_scales(str(work) + "/", Path(image).name, scale_factor=1.411,
                                                create=False, auto_scale=50000)
        self.net = OfficialNet(dim=width, multiscale=True, device=device).to(device)
        self.diffusion = MultiScaleGaussianDiffusion(
            denoise_fn=self.net, n_scales=n, scale_factor=r, image_sizes=sizes, timesteps=100, train_full_t=True,
            scale_losses=losses, loss_factor=1, loss_type="l1", device=device, results_folder=str(work)).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        # identical inputs: the official trainer loads the same uint8 scales from PNG files
        self.data = []
        for s in range(n):
            x = pyramid.images[s].to(device).repeat(batch, 1, 1, 1)
            self.data.append([x, pyramid.blurry[s].to(device).repeat(batch, 1, 1, 1)])
        shutil.rmtree(work, ignore_errors=True)

    def __call__(self, s: int) -> float:
        loss = self.diffusion(self.data[s], torch.tensor([s]))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=str(ROOT / "core/sinddm/data/coffee_128x100.png"))
    ap.add_argument("--official", default=None, help="path to a checkout of fallenshock/SinDDM")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per scale (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--sample", action="store_true", help="also time one full-size sample")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from PIL import Image

    pyr = build_pyramid(Image.open(a.image))
    cfg = TrainConfig(steps=1000, batch_size=a.batch, precision=a.precision)
    gen = torch.Generator(device=device).manual_seed(0)
    ours = TrainStep(SinDDMNet(NetConfig(a.width)), pyr, cfg, device, gen)
    runners = {"ours": ours.step}
    if a.official:
        runners["official"] = Official(a.official, a.image, a.batch, a.width, device, pyr)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, image {a.image} "
          f"({pyr.spec.n_scales} scales), batch {a.batch}, width {a.width}; ours: channels_last, "
          f"bf16 autocast {'on' if ours.bf16 else 'off'} (native bf16: {native_bf16(device)})", flush=True)
    medians: dict[str, list[float]] = {k: [] for k in runners}
    for s in range(pyr.spec.n_scales):
        times: dict[str, list[float]] = {k: [] for k in runners}
        peaks: dict[str, float] = {}
        for k in range(a.warmup + a.steps):
            for name, run in runners.items():  # interleaved, so load drifts hit both alike
                sync(device)
                reset_peak(device)
                t0 = time.perf_counter()
                run(s)
                sync(device)
                dt = time.perf_counter() - t0
                peaks[name] = max(peaks.get(name, 0.0), peak_mib(device))
                if k >= a.warmup:
                    times[name].append(dt)
        h, w = pyr.spec.sizes[s]
        parts = []
        for name in runners:
            m = statistics.median(times[name])
            medians[name].append(m)
            parts.append(f"{name} {m:.3f} s (peak {peaks[name]:.0f} MiB)")
        ratio = f"  ratio {medians['ours'][-1] / medians['official'][-1]:.2f}" if a.official else ""
        print(f"scale {s} {w}x{h}: " + ", ".join(parts) + ratio, flush=True)
    for name in runners:
        print(f"mean over scales, {name}: {statistics.mean(medians[name]):.3f} s/step", flush=True)
    if a.official:
        r = statistics.mean(medians["ours"]) / statistics.mean(medians["official"])
        print(f"ours / official (mean over scales): {r:.2f}; finest scale: "
              f"{medians['ours'][-1] / medians['official'][-1]:.2f}", flush=True)
    if a.sample:
        model = SinDDM.create(ours.net.eval(), pyr)
        sample(model, count=1, seed=0, device=device, scales=1)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        sample(model, count=1, seed=0, device=device)
        sync(device)
        h, w = pyr.spec.sizes[-1]
        print(f"one full-size sample ({w}x{h}, {sum(model.schedule.start_steps)} denoiser calls): "
              f"{time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
