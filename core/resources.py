"""Memory estimates made before allocating, so that a request that cannot fit is refused with
the number and the fix instead of an out-of-memory traceback.

Pure functions: the estimates depend only on their arguments; :func:`free_memory_bytes`
asks the device (CUDA: ``torch.cuda.mem_get_info`` plus what torch's caching allocator
holds unused; CPU: ``psutil`` if installed, else ``MemAvailable`` of ``/proc/meminfo``;
anything else: unknown, and the check passes).  :func:`check_fits` raises
:class:`ResourceError` (a ``ValueError``) whose ``problem`` and ``fix`` the nodes turn into
a ``NodeInputError`` naming the input.

The estimates err on the safe side (they count more than a run needs, not less), but only
by small factors: they are meant to catch what clearly cannot fit (a 100,000 x 100,000
sample, a full fine-tune on an 8 GB card), not to second-guess borderline requests.

SinDDM (``core/sinddm/model.py``): four ConvBlocks with widths 3 -> w/2 -> w -> w -> w/2,
each a depthwise 5x5 conv, the (t, s) embedding added, 3x3 conv -> GELU -> 3x3 conv and a
residual; no attention, no resampling, so memory is linear in pixels x batch:

* sampling (no autograd): at most the block input, the depthwise output, the conditioned
  sum, the first conv's output, its GELU and the second conv's output are alive at once:
  <= 6 w channels, plus the sampler's per-pixel state (x_t, x0, noise, eps, the upsampled
  previous scale, guidance targets: 16 three-channel maps) -> 4 bytes x (6 w + 48) per
  pixel per sample (fp32), at the finest output scale (earlier scales are smaller and
  freed).  CLIP guidance adds its own (not counted).
* training (autograd keeps every block's activations for backward): summing the saved
  tensors of the four blocks gives about 18.5 w channels per pixel; with the backward's
  gradient buffers of the largest block -> 4 bytes x (20 w + 64) per pixel per batch item
  at the finest training scale (the largest), plus the weights, their gradients and Adam's
  two moments (16 bytes per parameter).

Imagic (SD 1.x UNet, ``P`` parameters, 859,520,964 for SD 1.5): full fine-tune keeps an
fp32 trainable copy (4 P: 3.4 GB) and Adam's two moments (8 P: 6.9 GB; 2 P, 1.7 GB, with 8-bit
moments), but no whole set of gradients (each tensor's optimiser step is taken inside backward and
its gradient freed, :class:`core.fit.StepInBackward`); LoRA 16 bytes per adapter parameter (at most rank x P / 64, an
upper bound for adapters on every conv and linear weight); the embedding stage a few kB.
Activations kept for the backward pass grow with the latent's pixels: about 1 MiB per
latent pixel in fp32 (4 GiB at 512 x 512), a quarter of it with gradient checkpointing.
SDXL keeps 1.95x SD 1.5's linear activations per latent pixel (counted on the meta device,
``benchmarks/unet_saved_tensors.py``): x 2 (``ACT_SCALE``).  On ComfyUI's back end a training step
also holds a per-call copy of the weights autograd saves (ComfyUI's weight wrappers copy): 98 % of
SD 1.5's UNet and 87 % of SDXL's, 13 % / 3 % with gradient checkpointing (``WEIGHTS_SAVED``), in
the dtype the UNet computes in.
The frozen model's own weights are not counted: they are already loaded (CPU) or loaded
and offloaded by ComfyUI's model management (GPU), so this is a lower bound there.
"""

from __future__ import annotations

import math

import torch

GIB = 1024**3
SD15_UNET_PARAMS = 859_520_964
SINDDM_SAMPLE_CHANNELS = (6, 48)  # 6 w + 48 float32 values per pixel per sample
SINDDM_TRAIN_CHANNELS = (20, 64)  # 20 w + 64 float32 values per pixel per batch item
IMAGIC_ACT_BYTES_PER_LATENT_PIXEL = 1 << 20  # fp32, no gradient checkpointing
IMAGIC_CHECKPOINTED_FRACTION = 0.25
ACT_SCALE = {"sd1": 1.0, "sdxl": 2.0}  # activations per latent pixel relative to SD 1.5
WEIGHTS_SAVED = {("sd1", False): 0.98, ("sd1", True): 0.13, ("sdxl", False): 0.87, ("sdxl", True): 0.03}


class ResourceError(ValueError):
    """A request that does not fit in the device's free memory: ``problem`` says the numbers,
    ``fix`` what to change."""

    def __init__(self, problem: str, fix: str, need: int, free: int):
        self.problem, self.fix, self.need, self.free = problem, fix, int(need), int(free)
        super().__init__(f"{problem}. Fix: {fix}" if fix else problem)


def gib(n: float) -> str:
    """Bytes as GiB with 1 decimal (2 significant digits below 1 GiB), e.g. '13.7'."""
    v = n / GIB
    return f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory_bytes(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on ``device``, or None where unknown (the checks then pass)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(idx)
        cached = torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)  # reusable by torch
        return int(free + max(cached, 0))
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:
            return _meminfo_available()
    return None


def check_fits(need: int, device: str | torch.device, what: str, fix: str, free: int | None = None) -> int | None:
    """Raise :class:`ResourceError` when ``need`` bytes exceed the free memory of ``device``
    (``free`` overrides the query); returns the free bytes (None: unknown, not checked)."""
    free = free_memory_bytes(device) if free is None else int(free)
    if free is not None and need > free:
        dev = torch.device(device).type
        raise ResourceError(f"{what} needs about {gib(need)} GiB but only {gib(free)} GiB is free on the {dev}",
                            fix, need, free)
    return free


# --------------------------------------------------------------------------------------
# SinDDM
# --------------------------------------------------------------------------------------
def sinddm_net_params(width: int, channels: int = 3, emb: int = 32) -> int:
    """Parameters of :class:`core.sinddm.model.SinDDMNet` at ``width`` (1,106,772 at 160)."""
    def block(d: int, o: int) -> int:
        return (d * 25 + d) + (emb * emb + emb) + (emb * d + d) + (d * o * 9 + o) + (o * o * 9 + o) \
            + ((d * o + o) if d != o else 0)

    w = width
    cond = (2 * emb * 4 * emb + 4 * emb) + (4 * emb * emb + emb)
    return cond + block(channels, w // 2) + block(w // 2, w) + block(w, w) + block(w, w // 2) + (w // 2 * channels
                                                                                              + channels)


def sinddm_sample_bytes(height: int, width: int, count: int, net_width: int) -> int:
    """Activation memory of SinDDM sampling: ``count`` samples of ``height`` x ``width`` (the
    finest output scale) at network width ``net_width`` (see the module docstring)."""
    a, b = SINDDM_SAMPLE_CHANNELS
    return 4 * (a * int(net_width) + b) * int(height) * int(width) * int(count)


def sinddm_train_bytes(height: int, width: int, batch: int, net_width: int) -> int:
    """Memory of one SinDDM training step at the finest scale ``height`` x ``width`` with
    ``batch`` noisy copies, network width ``net_width``: activations + weights, grads, Adam."""
    a, b = SINDDM_TRAIN_CHANNELS
    return 4 * (a * int(net_width) + b) * int(height) * int(width) * int(batch) + 16 * sinddm_net_params(net_width)


# --------------------------------------------------------------------------------------
# Imagic
# --------------------------------------------------------------------------------------
def imagic_parts(latent_hw: tuple[int, int], mode: str, unet_params: int = SD15_UNET_PARAMS, rank: int = 8,
                 gradient_checkpointing: bool = False, optimizer: str = "adam", family: str = "sd1",
                 weight_copy_itemsize: int = 0) -> dict[str, int]:
    """Bytes by item for an Imagic stage on a latent of ``latent_hw`` (image size / 8).

    ``family``: "sd1" or "sdxl" (:data:`ACT_SCALE`); ``weight_copy_itemsize``: bytes per weight of the
    per-call copies ComfyUI's back end makes (0 for the diffusers back end, which makes none).

    ``mode``: "embedding" (stage 1: only e_opt is trained), "lora" or "full" (stage 2).  A full fine-tune
    holds a float32 copy of the UNet and Adam's two moments (one byte each with ``optimizer`` "adam8bit"),
    but never a whole set of gradients: each tensor's step is taken inside backward
    (:class:`core.fit.StepInBackward`)."""
    if mode not in ("embedding", "lora", "full"):
        raise ValueError(f"mode must be embedding, lora or full, got {mode!r}")
    if family not in ACT_SCALE:
        raise ValueError(f"family must be one of {sorted(ACT_SCALE)}, got {family!r}")
    p = int(unet_params)
    act = int(ACT_SCALE[family] * IMAGIC_ACT_BYTES_PER_LATENT_PIXEL * int(latent_hw[0]) * int(latent_hw[1]))
    if gradient_checkpointing:
        act = int(act * IMAGIC_CHECKPOINTED_FRACTION)
    parts = {"activations": act}
    if weight_copy_itemsize:
        parts["weight copies"] = int(WEIGHTS_SAVED[family, bool(gradient_checkpointing)] * p * weight_copy_itemsize)
    if mode == "full":
        parts.update({"fp32 copy": 4 * p, "Adam state": (2 if optimizer.endswith("8bit") else 8) * p})
    elif mode == "lora":
        parts["LoRA + Adam + grads"] = 16 * min(p, math.ceil(int(rank) * p / 64))
    else:
        parts["embedding + Adam"] = 16 * 77 * 1024
    return parts


def imagic_bytes(latent_hw: tuple[int, int], mode: str, unet_params: int = SD15_UNET_PARAMS, rank: int = 8,
                 gradient_checkpointing: bool = False, optimizer: str = "adam", family: str = "sd1",
                 weight_copy_itemsize: int = 0) -> int:
    """Total of :func:`imagic_parts`."""
    return sum(imagic_parts(latent_hw, mode, unet_params, rank, gradient_checkpointing, optimizer, family,
                            weight_copy_itemsize).values())


def describe_parts(parts: dict[str, int]) -> str:
    return " + ".join(f"{k} {gib(v)}" for k, v in parts.items())


__all__ = ["GIB", "ResourceError", "check_fits", "describe_parts", "free_memory_bytes", "gib", "imagic_bytes",
           "imagic_parts", "sinddm_net_params", "sinddm_sample_bytes", "sinddm_train_bytes", "SD15_UNET_PARAMS"]
