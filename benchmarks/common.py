"""What every benchmark records next to its numbers, and the random-weight models they run on.

* :func:`header`: machine (CPU model and threads, GPU name and memory), date (UTC), torch
  version and the command line, so that every figure in ``benchmarks/results/`` says
  where it came from;
* :func:`write_result`: the JSON file (parents created);
* :func:`random_sd15`: Stable Diffusion 1.5 with random weights, built in process from
  the configs shipped in ``core/sd/configs/sd15`` (no checkpoint file, no download): the
  same modules and shapes as the real model, so speed and memory are the real model's;
* :func:`tiny_sd`: the tests' tiny SD-shaped model (``tests/tiny_sd.py``), for CPU checks.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None) -> str:
    """One line: the GPU (name, memory) when ``device`` is CUDA, then the CPU and its threads."""
    import torch

    cpu = f"{cpu_name()}, {torch.get_num_threads()} threads"
    if device is not None and torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), {cpu}"
    return f"{cpu}, no GPU" if not torch.cuda.is_available() else f"{cpu} (GPU not used)"


def command() -> str:
    """The command line that produced a result, as it would be typed."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def header(device=None) -> dict:
    import torch

    out = {"machine": machine(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command(), "torch": torch.__version__, "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # other work on the machine (CPU runs: compare with its threads)
        out["load_average_1_5_15_min"] = [round(x, 2) for x in os.getloadavg()]
    return out


class Timer:
    """``on_step`` callback recording the seconds between steps (CUDA synchronised)."""

    def __init__(self, device):
        import torch

        self.device, self.times, self.last = torch.device(device), [], None

    def _sync(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self.last = time.perf_counter()

    def __call__(self, i=None, n=None, info=None):
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def median(self, warmup: int) -> float:
        return statistics.median(self.times[warmup:] or self.times)


def write_result(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return path


def random_sd15(device="cpu", dtype=None, seed: int = 0):
    """SD 1.5 (UNet 860M, VAE, CLIP ViT-L text encoder) with random weights, as a ``DiffusersSD``.

    Built on ``device`` straight from the shipped configs; ``dtype`` defaults to what
    :func:`core.sd.load_sd15` uses (float16 on CUDA, float32 on the CPU).
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from core.sd.backend import DiffusersSD
    from core.sd.loader import build_modules, read_config
    from core.sd.tokenizer import load_clip_tokenizer

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    unet, vae, text = build_modules(read_config("unet"), read_config("vae"), read_config("text_encoder"), device)
    mods = [(m if dtype == torch.float32 else m.to(dtype)).eval().requires_grad_(False) for m in (unet, vae, text)]
    return DiffusersSD(unet=mods[0], vae=mods[1], text_encoder=mods[2], tokenizer=load_clip_tokenizer(None))


def tiny_sd(device="cpu", dtype=None):
    """The tests' tiny SD-shaped model, loaded through the real single-file loader."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from core.sd.loader import load_sd15
    from tiny_sd import build_tiny, write_config_dir, write_single_file

    d = Path(tempfile.mkdtemp(prefix="sie_tiny_sd_"))
    u, v, t = build_tiny(0)
    return load_sd15(write_single_file(d / "tiny.safetensors", u, v, t), device=device,
                     dtype=dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32),
                     config_dir=write_config_dir(d / "cfg", u, v, t))
