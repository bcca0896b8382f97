"""SinDDM training and sampling speed, optionally side by side with the official code.

    python benchmarks/sinddm_speed.py --image core/sinddm/data/coffee_128x100.png \\
        [--official /path/to/fallenshock/SinDDM] [--batch 32 --width 160 --steps 3] [--sample] \\
        [--out benchmarks/results/sinddm_speed_cpu.json]

For every scale: the median time of one training step (batch of noisy copies, forward,
L1 loss, backward, Adam step) after a warm-up, and the peak resident memory of that
step (peak GPU memory on CUDA).  With ``--official`` the official classes are imported
from that checkout and timed in the same run, interleaved step by step with ours (same
image, batch, width, threads), and the ratio ours / official is printed.  ``--sample``
adds the time of one full-size sample.  ``--out`` writes the numbers, the machine, the
date and the command to a JSON file.  :func:`time_training` and :func:`time_sample` are what
``benchmarks/gpu_suite.py`` runs.
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

from common import header, write_result  # noqa: E402
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


def time_training(pyr, width: int = 160, batch: int = 32, steps: int = 3, warmup: int = 1,
                  device: torch.device | str = "cpu", precision: str = "auto", official: str | None = None,
                  image: str | None = None, log=print) -> tuple[dict, TrainStep]:
    """Median seconds of one training step at every scale (ours, and the official code's when
    ``official`` is a checkout of fallenshock/SinDDM and ``image`` the file ``pyr`` was built from).

    Returns (result, our TrainStep); result["scales"] holds one row per scale.
    """
    device = torch.device(device)
    cfg = TrainConfig(steps=1000, batch_size=batch, precision=precision)
    gen = torch.Generator(device=device).manual_seed(0)
    ours = TrainStep(SinDDMNet(NetConfig(width)), pyr, cfg, device, gen)
    runners = {"ours": ours.step}
    if official:
        runners["official"] = Official(official, image, batch, width, device, pyr)
    log(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"{pyr.spec.n_scales} scales, batch {batch}, width {width}; ours: channels_last, "
        f"bf16 autocast {'on' if ours.bf16 else 'off'} (native bf16: {native_bf16(device)})")
    medians: dict[str, list[float]] = {k: [] for k in runners}
    rows = []
    for s in range(pyr.spec.n_scales):
        times: dict[str, list[float]] = {k: [] for k in runners}
        peaks: dict[str, float] = {}
        for k in range(warmup + steps):
            for name, run in runners.items():  # interleaved, so load drifts hit both alike
                sync(device)
                reset_peak(device)
                t0 = time.perf_counter()
                run(s)
                sync(device)
                dt = time.perf_counter() - t0
                peaks[name] = max(peaks.get(name, 0.0), peak_mib(device))
                if k >= warmup:
                    times[name].append(dt)
        h, w = pyr.spec.sizes[s]
        row = {"scale": s, "size": [w, h]}
        parts = []
        for name in runners:
            m = statistics.median(times[name])
            medians[name].append(m)
            row[f"{name}_s"], row[f"{name}_peak_mib"] = m, peaks[name]
            parts.append(f"{name} {m:.3f} s (peak {peaks[name]:.0f} MiB)")
        if official:
            row["ratio"] = medians["ours"][-1] / medians["official"][-1]
        rows.append(row)
        log(f"scale {s} {w}x{h}: " + ", ".join(parts) + (f"  ratio {row['ratio']:.2f}" if official else ""))
    result = {"device": str(device), "batch": batch, "width": width, "bf16_autocast": ours.bf16,
              "native_bf16": native_bf16(device), "scales": rows}
    for name in runners:
        result[f"{name}_mean_s"] = statistics.mean(medians[name])
        log(f"mean over scales, {name}: {result[f'{name}_mean_s']:.3f} s/step")
    if official:
        result["ratio_mean"] = result["ours_mean_s"] / result["official_mean_s"]
        result["ratio_finest"] = medians["ours"][-1] / medians["official"][-1]
        log(f"ours / official (mean over scales): {result['ratio_mean']:.2f}; finest scale: "
            f"{result['ratio_finest']:.2f}")
    return result, ours


def time_sample(net: SinDDMNet, pyr, device: torch.device | str = "cpu", log=print) -> dict:
    """Seconds of one full-size sample (all scales) after a one-scale warm-up."""
    device = torch.device(device)
    model = SinDDM.create(net.eval(), pyr)
    sample(model, count=1, seed=0, device=device, scales=1)  # warm-up
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    sample(model, count=1, seed=0, device=device)
    sync(device)
    h, w = pyr.spec.sizes[-1]
    out = {"size": [w, h], "denoiser_calls": int(sum(model.schedule.start_steps)),
           "seconds": time.perf_counter() - t0, "peak_mib": peak_mib(device)}
    log(f"one full-size sample ({w}x{h}, {out['denoiser_calls']} denoiser calls): {out['seconds']:.2f} s")
    return out


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
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file (with machine, date, command)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from PIL import Image

    pyr = build_pyramid(Image.open(a.image))
    print(f"image {a.image}", flush=True)
    log = lambda msg: print(msg, flush=True)
    result, ours = time_training(pyr, a.width, a.batch, a.steps, a.warmup, device, a.precision, a.official, a.image,
                                 log)
    if a.sample:
        result["sample"] = time_sample(ours.net, pyr, device, log)
    if a.out:
        data = {**header(device), "image": Path(a.image).name, "official": bool(a.official), **result}
        if a.official:
            data["official_commit"] = official_commit(a.official)
        print(f"wrote {write_result(a.out, data)}")


def official_commit(checkout: str) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
