"""Imagic per-stage speed and peak memory, standalone (diffusers back end).

    python benchmarks/imagic_speed.py --checkpoint v1-5-pruned-emaonly.safetensors --size 512   # a GPU
    python benchmarks/imagic_speed.py --tiny                                                       # CPU, tiny model

For each stage — embedding optimisation, LoRA fine-tuning, full fine-tuning (``--full``)
and DDIM sampling with CFG — the median seconds per step after a warm-up and the peak
memory of the stage (GPU: ``max_memory_allocated``; CPU: the process's peak RSS since
the stage began), then the projected time of a whole edit at the SD ports' settings
(500 embedding + 1000 fine-tuning steps + 50 DDIM steps).  Gradient checkpointing and
bf16 autocast are on for a GPU, off for the CPU, as in the nodes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import peak_mib, reset_peak  # noqa: E402

from core.imagic import EmbeddingConfig, FineTuneConfig, LoRAConfig, finetune, optimize_embedding  # noqa: E402
from core.sampling import ddim_sample  # noqa: E402
from core.sd.loader import load_sd15  # noqa: E402


def peak_gib(device) -> float:
    return peak_mib(device) / 1024


class Timer:
    """on_step callback recording the time between steps."""

    def __init__(self, device):
        self.device, self.times, self.last = device, [], None

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last = time.perf_counter()

    def __call__(self, i, n, info):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def median(self, warmup: int) -> float:
        return statistics.median(self.times[warmup:] or self.times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--tiny", action="store_true", help="a tiny SD-shaped model built in code (CPU check)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="steps timed per stage (first one is warm-up)")
    ap.add_argument("--full", action="store_true", help="also time full fine-tuning (needs ~17 GB on a GPU)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if a.tiny:
        from tiny_sd import build_tiny, write_config_dir, write_single_file

        d = Path(tempfile.mkdtemp())
        u, v, t = build_tiny(0)
        model = load_sd15(write_single_file(d / "tiny.safetensors", u, v, t), device=device,
                          config_dir=write_config_dir(d / "cfg", u, v, t))
        name = "tiny SD-shaped model"
    elif a.checkpoint:
        model = load_sd15(a.checkpoint, device=device)
        name = Path(a.checkpoint).name
    else:
        ap.error("give --checkpoint or --tiny")
    img = torch.rand(1, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    latent = model.encode(img)
    e_tgt = model.encode_text(["a photo of a dog"])
    uncond = model.encode_text([""])
    print(f"{name} on {device} ({torch.get_num_threads()} threads), {a.size}x{a.size} "
          f"(latent {tuple(latent.shape)}), checkpointing {'on' if gpu else 'off'}, "
          f"{'bf16 autocast' if gpu else 'fp32'}", flush=True)
    rows = []

    def stage(label, fn):
        timer = Timer(device)
        reset_peak(device)
        timer.start()
        fn(timer)
        rows.append((label, timer.median(1), peak_gib(device)))
        print(f"  {label:<22} {rows[-1][1]:8.3f} s/step   peak {rows[-1][2]:6.2f} GiB", flush=True)

    stage("embedding", lambda tm: optimize_embedding(model, latent, e_tgt, EmbeddingConfig(a.steps, 1e-3, 0, gpu),
                                                     on_step=tm))
    stage("fine-tune (lora r8)", lambda tm: finetune(
        model, latent, e_tgt, FineTuneConfig("lora", a.steps, lora=LoRAConfig(8, 8.0), gradient_checkpointing=gpu),
        on_step=tm))
    if a.full:
        stage("fine-tune (full)", lambda tm: finetune(
            model, latent, e_tgt, FineTuneConfig("full", a.steps, gradient_checkpointing=gpu), on_step=tm))
    stage("DDIM + CFG sampling", lambda tm: ddim_sample(model, e_tgt, uncond, shape=tuple(latent.shape),
                                                         steps=a.steps, guidance=7.5, on_step=tm))
    per = {label: s for label, s, _ in rows}
    for mode in ("lora r8", "full"):
        key = f"fine-tune ({mode})"
        if key in per:
            total = 500 * per["embedding"] + 1000 * per[key] + 50 * per["DDIM + CFG sampling"]
            peak = max(p for label, _, p in rows if label in ("embedding", key, "DDIM + CFG sampling"))
            print(f"whole edit, {mode} (500 + 1000 + 50 steps): {total / 60:.1f} min, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
