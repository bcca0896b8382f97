"""What every benchmark records next to its numbers, and the random-weight models they run on.

* :func:`header`: machine (CPU model and threads, GPU name and memory), date (UTC), torch
  version and the command line, so that every figure in ``benchmarks/results/`` says
  where it came from;
* :func:`write_result`: the JSON file (parents created);
* :func:`random_sd15`: Stable Diffusion 1.5 with random weights, built in process from
  the configs shipped in ``core/sd/configs/sd15`` (no checkpoint file, no download): the
  same modules and shapes as the real model, so speed and memory are the real model's;
* :func:`tiny_sd`: the tests' tiny SD-shaped model (``tests/tiny_sd.py``), for CPU checks;
* :func:`random_pixel_ddpm`: a pixel-space DDPM (diffusers ``UNet2DModel``, linear betas
  1e-4..0.02, T = 1000) with random weights, by default at the architecture of
  ``google/ddpm-celebahq-256`` (:data:`CELEBAHQ_256`), or the tiny one (:data:`TINY_PIXEL`);
* :func:`free_memory` and :func:`step_stats`: between stages, and the per-step figures of a
  :class:`Timer` (median after the warm-up, mean of all, steps timed).
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


def comfy_pack(comfyui: str | None, cpu: bool | None = None):
    """Import this pack the way ComfyUI does (as the package ``sie_pack``), for a benchmark run with ComfyUI's
    Python: with ``comfyui`` (a checkout) its ``comfy`` modules are put on the path first, CPU-only when ``cpu``
    (default: when no GPU is visible); without it, the tests' stand-in of ComfyUI's typed node API serves the
    nodes' imports."""
    if comfyui:
        sys.path.insert(0, comfyui)
        import comfy.options

        comfy.options.enable_args_parsing(False)
        import torch
        from comfy.cli_args import args

        args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import load_pack  # the tests' loader: ComfyUI's way of importing a custom node folder

    return load_pack("sie_pack")


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


def random_sdxl(device="cpu", dtype=None, seed: int = 0):
    """SDXL base (UNet 2.57 B, VAE, CLIP-L and OpenCLIP-G text encoders) with random weights, as a
    ``DiffusersSDXL``, built on ``device`` from the shipped configs; ``dtype`` as :func:`core.sd.load_sdxl`
    (float16 on CUDA with the VAE kept in float32, float32 on the CPU)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from core.sd.backend import DiffusersSDXL
    from core.sd.loader import XL_CONFIG_DIR, build_modules, read_config, vae_dtype_for
    from core.sd.tokenizer import load_clip_tokenizer

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    unet, vae, text = build_modules(read_config("unet", XL_CONFIG_DIR), read_config("vae", XL_CONFIG_DIR),
                                    read_config("text_encoder", XL_CONFIG_DIR), device)
    t2 = {k: v for k, v in read_config("text_encoder_2", XL_CONFIG_DIR).items() if not k.startswith("_")}
    with torch.device(device):
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**t2))
    mods = [m.to(dt).eval().requires_grad_(False) for m, dt in
            ((unet, dtype), (vae, vae_dtype_for(dtype)), (text, dtype), (text_2, dtype))]
    return DiffusersSDXL(unet=mods[0], vae=mods[1], text_encoder=mods[2], tokenizer=load_clip_tokenizer(None),
                         text_encoder_2=mods[3], tokenizer_2=load_clip_tokenizer(None, pad_token="!"))


# google/ddpm-celebahq-256 (UNet2DModel, 113.7 M parameters), from its published config
# (/work/shared/reference/pixel-ddpm.md); the church and bedroom 256 models share it.
CELEBAHQ_256 = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, norm_num_groups=32, norm_eps=1e-6,
    act_fn="silu", downsample_padding=0, mid_block_scale_factor=1, attention_head_dim=None,
)
# The tests' tiny pixel DDPM shape (tests/tiny_pixel_ddpm.py, tests/test_engine.py): two levels, one attention.
TINY_PIXEL = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def random_pixel_ddpm(device="cpu", dtype=None, config: dict | None = None, seed: int = 0):
    """A pixel DDPM with random weights as a ``core.pixel.DiffusersPixel`` (eval, no gradients).

    ``config``: ``UNet2DModel`` keyword arguments (default :data:`CELEBAHQ_256`); the schedule is
    the public DDPMs' (linear betas 1e-4..0.02 over 1,000 steps).  ``dtype`` defaults to float32,
    what :func:`core.pixel.load_pixel_unet` loads.
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from diffusers import UNet2DModel

    from core.diffusion import alphas_cumprod
    from core.pixel import DiffusersPixel

    torch.manual_seed(seed)
    unet = UNet2DModel(**(config or CELEBAHQ_256))
    unet = unet.to(torch.device(device))
    if dtype not in (None, torch.float32):  # (diffusers warns about any dtype cast, float32 included)
        unet = unet.to(dtype)
    unet = unet.eval().requires_grad_(False)
    return DiffusersPixel(unet, alphas_cumprod(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)))


def free_memory(device) -> None:
    """Collect garbage and, on CUDA, return the allocator's cache (between stages)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def step_stats(timer: Timer, warmup: int = 1) -> dict:
    """``s_per_step``: median interval after ``warmup`` steps; ``mean_s_per_step``: every interval."""
    times = timer.times
    return {"s_per_step": timer.median(warmup), "mean_s_per_step": sum(times) / max(len(times), 1),
            "steps_timed": max(len(times) - warmup, 1)}


def tiny_sd(device="cpu", dtype=None, xl: bool = False):
    """The tests' tiny SD-shaped model (``xl``: the SDXL-shaped one), loaded through the real single-file loader."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_sd as tiny
    from core.sd.loader import load_sd

    d = Path(tempfile.mkdtemp(prefix="sie_tiny_sdxl_" if xl else "sie_tiny_sd_"))
    mods = tiny.build_tiny_xl(0) if xl else tiny.build_tiny(0)
    write, configs = ((tiny.write_single_file_xl, tiny.write_config_dir_xl) if xl
                      else (tiny.write_single_file, tiny.write_config_dir))
    return load_sd(write(d / "tiny.safetensors", *mods), device=device,
                   dtype=dtype or (torch.float16 if torch.device(device).type == "cuda" else torch.float32),
                   config_dir=configs(d / "cfg", *mods))


def sd_parser(doc: str | None):
    """The command line every SD benchmark shares: which model (``--checkpoint``, ``--random``, ``--tiny``),
    ``--device`` and ``--out``; a benchmark adds its own options to the parser it gets."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None,
                    help="an SD 1.x or SDXL single-file checkpoint (or diffusers folder)")
    ap.add_argument("--random", action="store_true",
                    help="SD 1.5 with random weights built from the shipped configs (no checkpoint file)")
    ap.add_argument("--tiny", action="store_true", help="a tiny SD-shaped model built in code (CPU check)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file (with machine, date, command)")
    return ap


def sd_model(ap, a):
    """``(model, name, device, tiny)`` for the model the parsed arguments ``a`` of :func:`sd_parser` name."""
    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.tiny:
        return tiny_sd(device), "tiny SD-shaped model (tests/tiny_sd.py)", device, True
    if a.random:
        return random_sd15(device), "SD 1.5 with random weights (shipped configs)", device, False
    if a.checkpoint:
        sys.path.insert(0, str(ROOT))
        from core.sd.loader import load_sd

        return load_sd(a.checkpoint, device=device), Path(a.checkpoint).name, device, False
    ap.error("give --checkpoint, --random or --tiny")
