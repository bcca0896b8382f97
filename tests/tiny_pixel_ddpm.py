"""A tiny pixel-space DDPM trained in the test tier on real crops, cached, plus DDIM inversion.

The rectifier's acceptance test needs a diffusion model whose reconstructions look like
the data, not like noise, without downloading one.  :func:`trained_tiny_ddpm` trains a
small diffusers ``UNet2DModel`` (~0.7 M parameters, 16x16 RGB) with the plain epsilon
objective of Ho et al. 2020 (Algorithm 1: uniform t, ||eps - eps_theta(x_t, t)||^2) on
the crops of :mod:`pixel_data` in under a minute on two idle CPU cores (600 steps), and caches the
weights as a diffusers model folder (safetensors) so later runs load them instead:

    train, held = real_crops()
    model = trained_tiny_ddpm(train)                 # core.pixel.DiffusersPixel, eval, no grads
    recon = ddim_reconstruct(model, held, steps=50)  # [N, 3, 16, 16] in [0, 1]

The cache lives in ``$SIE_TEST_CACHE`` or ``~/.cache/comfyui-single-image-edit``, in a
folder named after a hash of the crops, the config, the step count, the seed and
:data:`FORMAT`; it is written into a temporary folder and renamed into place.

``python tests/tiny_pixel_ddpm.py`` trains (or loads) the model and prints the training
time, the final loss, held-out eps-MSE (trained vs untrained) and the L1/L2/SSIM of
DDIM round trips of the held-out crops.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if __name__ == "__main__":  # run as a script: make ``core`` and ``pixel_data`` importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from core.diffusion import alphas_cumprod, q_sample  # noqa: E402
from core.pixel import DiffusersPixel, PixelModelError, load_pixel_unet, save_pixel_folder  # noqa: E402

FORMAT = "tiny-pixel-ddpm-v1"  # bump when the training procedure changes: invalidates every cache
DEFAULT_STEPS = 600
INFO_FILE = "train_info.json"


@dataclass(frozen=True)
class TinyDDPMConfig:
    """Architecture, schedule and optimiser of the tiny DDPM (every field enters the cache hash)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 40
    final_lr_fraction: float = 0.02  # cosine decay from lr to lr * this
    grad_clip: float = 1.0
    hflip: bool = True  # random horizontal flips of the training crops
    max_threads: int = 2

    def scheduler_config(self) -> dict:
        """The diffusers DDPMScheduler config saved beside the weights."""
        return {"_class_name": "DDPMScheduler", "num_train_timesteps": self.num_train_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end, "beta_schedule": "linear",
                "prediction_type": "epsilon"}

    def schedule(self) -> torch.Tensor:
        """alpha_bar_t of the linear beta schedule, float64 [T]."""
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)
        return alphas_cumprod(betas)


@dataclass(frozen=True)
class TrainInfo:
    """How the returned weights came about (read back from the cache when loaded)."""

    steps: int
    seconds: float  # wall time of the training loop
    final_loss: float  # mean eps-MSE over the last 10% of the steps
    from_cache: bool


@contextmanager
def at_most_threads(n: int) -> Iterator[None]:
    """Run the block with at most ``n`` torch threads (tiny nets gain nothing from more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_unet(config: TinyDDPMConfig, seed: int = 0):
    """A freshly initialised (seeded) ``UNet2DModel`` for 16x16 RGB: the untrained network."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=config.layers_per_block,
                       block_out_channels=tuple(config.block_out_channels),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=config.norm_num_groups)


def untrained_tiny_ddpm(seed: int = 0, config: TinyDDPMConfig | None = None) -> DiffusersPixel:
    """The network :func:`trained_tiny_ddpm` starts from, as a Denoiser (the baseline of the tests)."""
    config = config or TinyDDPMConfig()
    unet = build_unet(config, seed).eval().requires_grad_(False)
    return DiffusersPixel(unet, config.schedule())


def _check_crops(crops: torch.Tensor) -> torch.Tensor:
    if not isinstance(crops, torch.Tensor) or crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[0] == 0:
        shape = tuple(crops.shape) if isinstance(crops, torch.Tensor) else type(crops).__name__
        raise ValueError(f"crops must be a non-empty tensor [N, 3, H, W] in [0, 1], got {shape}")
    return crops.detach().to("cpu", torch.float32).contiguous()


def _lr_factor(step: int, steps: int, config: TinyDDPMConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``final_lr_fraction``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
    lo = config.final_lr_fraction
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))


def train_tiny_ddpm(crops: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0,
                    config: TinyDDPMConfig | None = None):
    """Train with the epsilon objective; returns (UNet2DModel in eval mode without grads, :class:`TrainInfo`).

    Deterministic for a given thread count: the initialisation is seeded with ``seed`` and
    every batch index, flip, timestep and noise comes from one generator seeded with it.
    """
    config = config or TinyDDPMConfig()
    data = _check_crops(crops) * 2 - 1  # [N, 3, H, W] in [-1, 1]
    ab = config.schedule().float()  # [T]
    with at_most_threads(config.max_threads):
        unet = build_unet(config, seed).train()
        opt = torch.optim.Adam(unet.parameters(), lr=config.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, config))
        g = torch.Generator().manual_seed(int(seed))
        losses: list[float] = []
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=g)  # [B]
            x0 = data[idx]  # [B, 3, H, W]
            if config.hflip:
                flip = torch.rand(config.batch_size, generator=g) < 0.5  # [B]
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=g)  # [B]
            eps = torch.randn(x0.shape, generator=g)  # [B, 3, H, W]
            x_t = q_sample(x0, ab[t], eps)
            loss = F.mse_loss(unet(x_t, t).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.detach().item())
        seconds = time.perf_counter() - start
    tail = losses[-max(1, steps // 10):]
    info = TrainInfo(steps=steps, seconds=seconds, final_loss=sum(tail) / len(tail), from_cache=False)
    return unet.eval().requires_grad_(False), info


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$SIE_TEST_CACHE`` or ``~/.cache/comfyui-single-image-edit``."""
    env = os.environ.get("SIE_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comfyui-single-image-edit"


def cache_dir(crops: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0,
              config: TinyDDPMConfig | None = None) -> Path:
    """The cache folder of a training run: named after a hash of everything that determines it."""
    config = config or TinyDDPMConfig()
    data = _check_crops(crops)
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "config": asdict(config), "steps": int(steps), "seed": int(seed),
                         "shape": list(data.shape)}, sort_keys=True).encode())
    h.update(data.numpy().tobytes())
    return cache_root() / f"tiny_pixel_ddpm_{h.hexdigest()[:16]}"


def _write_cache(folder: Path, unet, info: TrainInfo, config: TinyDDPMConfig) -> None:
    """Save into a temporary sibling folder, then rename it to ``folder`` (a concurrent winner is kept)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_pixel_folder(unet, tmp, config.scheduler_config())
        (tmp / INFO_FILE).write_text(json.dumps(asdict(info), indent=2), encoding="utf-8")
        os.rename(tmp, folder)
    except OSError:
        if not (folder / INFO_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path) -> tuple[DiffusersPixel, TrainInfo] | None:
    """The cached model, or None when there is none; an unreadable entry is removed (and retrained)."""
    if not (folder / INFO_FILE).is_file():
        return None
    try:
        unet, ab = load_pixel_unet(folder)  # eval mode, no grads
        info = TrainInfo(**{**json.loads((folder / INFO_FILE).read_text(encoding="utf-8")), "from_cache": True})
    except (PixelModelError, OSError, ValueError, TypeError) as e:
        print(f"tiny_pixel_ddpm: discarding the unreadable cache {folder} ({e})", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return DiffusersPixel(unet, ab), info


def trained_tiny_ddpm_with_info(crops: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0, cache: bool = True,
                                config: TinyDDPMConfig | None = None) -> tuple[DiffusersPixel, TrainInfo]:
    """:func:`trained_tiny_ddpm` and how its weights came about.

    With ``cache``, a fresh training run is saved and then read back from the cache, so
    the first and every later call return the same (loaded) weights bit for bit.  An
    unwritable cache only costs the speed-up.
    """
    config = config or TinyDDPMConfig()
    folder = cache_dir(crops, steps, seed, config) if cache else None
    if folder is not None:
        hit = _read_cache(folder)
        if hit is not None:
            return hit
    unet, info = train_tiny_ddpm(crops, steps, seed, config)
    if folder is not None:
        try:
            _write_cache(folder, unet, info, config)
        except OSError as e:
            print(f"tiny_pixel_ddpm: cannot write the cache {folder} ({e}); continuing without it", file=sys.stderr)
        else:
            hit = _read_cache(folder)
            if hit is not None:
                return hit[0], info
    return DiffusersPixel(unet, config.schedule()), info


def trained_tiny_ddpm(crops: torch.Tensor, steps: int = DEFAULT_STEPS, seed: int = 0, cache: bool = True,
                      config: TinyDDPMConfig | None = None) -> DiffusersPixel:
    """A tiny epsilon-prediction DDPM trained on ``crops`` [N, 3, 16, 16] in [0, 1] (eval mode, no grads).

    Linear betas 1e-4..0.02 over T = 1000, images mapped to [-1, 1]; see
    :class:`TinyDDPMConfig` for the network and the optimiser.  With ``cache`` the weights
    are read from / written to :func:`cache_dir`.
    """
    return trained_tiny_ddpm_with_info(crops, steps, seed, cache, config)[0]


# --------------------------------------------------------------------------------------
# Evaluation: eps-MSE and DDIM round trips
# --------------------------------------------------------------------------------------
@torch.no_grad()
def eps_mse(model: DiffusersPixel, images01: torch.Tensor, draws: int = 8, seed: int = 1234) -> float:
    """Mean ||eps - eps_theta(x_t, t)||^2 over ``draws`` noisings per image, t ~ U{0..T-1} (seeded)."""
    x0 = _check_crops(images01).repeat(draws, 1, 1, 1) * 2 - 1  # [draws * N, 3, H, W]
    ab = model.alphas_cumprod
    g = torch.Generator().manual_seed(int(seed))
    t = torch.randint(0, len(ab), (x0.shape[0],), generator=g)  # [draws * N]
    eps = torch.randn(x0.shape, generator=g)
    with at_most_threads(2):
        pred = model.eps(q_sample(x0, ab[t], eps), t)
    return float(F.mse_loss(pred, eps))


def ddim_reconstruct(model: DiffusersPixel, images01: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Invert ``images01`` [B, 3, H, W] in [0, 1] to x_T with deterministic DDIM (trailing timesteps, from and to
    alpha_bar = 1), sample back; returns [B, 3, H, W] in [0, 1] (:mod:`core.rectifier.sample`)."""
    from core.rectifier.sample import ddim_invert, ddim_sample

    x0 = _check_crops(images01) * 2 - 1  # [B, 3, H, W] in [-1, 1]
    ab = model.alphas_cumprod
    with at_most_threads(2):
        x_T = ddim_invert(model.eps, x0, ab, steps)
        return ((ddim_sample(model.eps, x_T, ab, steps) + 1) / 2).clamp(0, 1)


def main() -> None:
    """Train (or load) on the default crops and print the numbers the acceptance test relies on."""
    from pixel_data import real_crops

    from core.rectifier.metrics import reconstruction_report

    train, held = real_crops()
    model, info = trained_tiny_ddpm_with_info(train)
    source = "loaded from cache (trained earlier)" if info.from_cache else "trained now"
    print(f"tiny DDPM, {sum(p.numel() for p in model.unet.parameters())} parameters, {source}: "
          f"{info.steps} steps in {info.seconds:.1f} s, final training loss {info.final_loss:.4f}")
    untrained = untrained_tiny_ddpm()
    print(f"held-out eps-MSE: trained {eps_mse(model, held):.4f}, untrained {eps_mse(untrained, held):.4f}")
    for steps in (5, 10, 50):
        report = reconstruction_report(held, ddim_reconstruct(model, held, steps))
        print(f"DDIM round trip, {steps:2d} steps: " + ", ".join(f"{k} {v:.4f}" for k, v in report.items()))


if __name__ == "__main__":
    main()
