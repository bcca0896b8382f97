"""High-Fidelity rectifier (Hou et al., AAAI 2024): training-step time, peak memory and sampling overhead.

    python benchmarks/rectifier_speed.py                 # a GPU: real sizes (CelebA-HQ 256 DDPM, SD 1.5 at 512)
    python benchmarks/rectifier_speed.py --tiny          # the CPU default: tiny models, the same rows (1-2 min)
    python benchmarks/rectifier_speed.py --only pixel --out /tmp/r.json

Both back ends with random weights at the real architecture (:mod:`benchmarks.common`), so time
and memory are the real models' (nothing is downloaded, no checkpoint is read):

* **pixel**: ``google/ddpm-celebahq-256`` (``UNet2DModel``, 113.7 M parameters, 63 modulated
  convolutions in the mid and up blocks) at 256x256, the rectifier with the paper's ResNet-34
  encoder (blocks 3-4-6-3) and 64-channel branches;
* **SD**: Stable Diffusion 1.5 (UNet 860 M, 43 modulated convolutions) at 512x512, i.e. latents
  64x64 drawn at random (the VAE is not timed), one text condition; estimate clip 4 (as the
  rectifier CLI uses for latents).

Rows, each with the median seconds per step after the warm-up steps (``on_step`` intervals;
``mean_s_per_step`` averages every interval, the first included) and the peak memory of the row
(GPU: ``max_memory_allocated``, weights included, CUDA context and allocator cache not; CPU: the
process's peak RSS since the row began), next to ``resident_mib_at_start`` (what was held before the
row: the models, and in the suite also its SD model while the pixel rows run):

* **training** (:func:`core.rectifier.train_rectifier`, reconstruction, eq. 3, ``estimate="base"``:
  one unmodulated pass for P_t, R, one modulated pass, backward into R, Adam): pixel at batch 8 and
  1, SD at batch 1 and 4 (a batch that runs out of GPU memory is recorded as ``oom``); an **edit**
  step (Alg. 1: directional CLIP on the decoded x0_hat + L1) for the pixel model at batch 8 when
  ``open_clip`` is importable, with a random-weight OpenCLIP ViT-B-32 (a tiny CLIP for ``--tiny``).
  bf16 autocast on a GPU (the fit loop's ``auto`` precision), fp32 on the CPU; no gradient
  checkpointing of the denoiser (the training code has none; the per-layer weight offsets are
  recomputed in backward).  Every training row starts from the same fresh R, with learning rate
  :data:`TRAIN_LR` (1e-5; the step's time does not depend on it): at the paper's 1e-3 the randomly
  initialised encoder diverges within 4 steps (a NaN loss would end the row; one that still happens
  is recorded as ``diverged_at``, with the steps timed before it).
* **sampling** (:func:`core.rectifier.ddpm_sample`): a step of the plain model, of the rectified
  model with ``estimate="base"`` (unmodulated pass + R + modulated pass) and with
  ``estimate="modulated"`` (R fed the previous step's modulated estimate: one pass + R), and the
  ratios rectified / plain.  Pixel: one image; SD: classifier-free guidance, w = 7.5, as one
  batch-2 call (uncond + cond) per pass.  No autocast: the models' own dtype (pixel float32, SD
  float16 on a GPU; float32 on the CPU), R in float32.
* **components**: single calls at the sampling shape (plain eps; eps of the base *inside* the
  views, i.e. with the dispatchers installed; R's forward; the modulated pass for given offsets;
  one whole rectified call), to show where a rectified step's time goes.

Targets and anchor (``targets`` in the JSON; pass/fail only when measured on a GPU at the real
sizes): a pixel reconstruction step at 256x256, batch 8, under 0.25 s on an H100; a rectified
sampling step under 2x a plain one (checked for both estimates); the paper trained every task on
one RTX 3090 Ti.  ``--tiny`` (the default without CUDA): a tiny pixel UNet at 32x32 and the tests'
tiny SD at latent 16x16, ResNet blocks 1-1-1-1 and 16-channel branches: a check of the code path,
whose numbers (per-call overhead, not arithmetic) say nothing about the real models.

:func:`time_rectifier` is what ``benchmarks/gpu_suite.py`` runs (``budget_s``: rows that would
start after the budget is spent are skipped and listed).  Not measured: loading a checkpoint,
VAE encoding/decoding, DDP, time to the paper's quality (random weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CELEBAHQ_256,
    RESULTS,
    TINY_PIXEL,
    Timer,
    free_memory,
    header,
    random_pixel_ddpm,
    random_sd15,
    step_stats,
    tiny_sd,
    write_result,
)
from memory import peak_mib, reset_peak, sync  # noqa: E402

from core.rectifier import TrainConfig, ddpm_sample, new_rectifier, rectified, train_rectifier  # noqa: E402
from core.rectifier.layers import generated_values  # noqa: E402
from core.rectifier.modulation import modulation_functions  # noqa: E402
from core.seam import Features  # noqa: E402

SD_PROMPT = "a photo of a face"
EDIT_TEXTS = ("face", "smiling face")

# Steps per row: ``*_steps`` in all, the first ``warmup`` left out of the median.
REAL = dict(
    tier="real",
    pixel=dict(model="google/ddpm-celebahq-256 architecture", unet="celebahq-256", size=256,
               encoder_layers=[3, 4, 6, 3], width=64, estimate_clip=1.0, train_batches=[8, 1], train_steps=5,
               edit_batch=8, edit_steps=4, clip="ViT-B-32", sample_steps=8, components_calls=4, warmup=2),
    sd=dict(model="SD 1.5", latent=64, encoder_layers=[3, 4, 6, 3], width=64, estimate_clip=4.0,
            train_batches=[1, 4], train_steps=5, sample_steps=8, guidance=7.5, components_calls=4, warmup=2),
    budget_s=None,
)
TINY = dict(
    tier="tiny",
    pixel=dict(REAL["pixel"], model="tiny UNet2DModel (32, 64)", unet="tiny", size=32, encoder_layers=[1, 1, 1, 1],
               width=16, clip="tiny", train_steps=6, edit_steps=5, sample_steps=10, components_calls=5),
    sd=dict(REAL["sd"], model="tiny SD-shaped model (tests/tiny_sd.py)", latent=16, encoder_layers=[1, 1, 1, 1],
            width=16, train_steps=6, sample_steps=10, components_calls=5),
    budget_s=None,
)

# Training rows use this learning rate, not the paper's 1e-3 (the step's time does not depend on it): with
# the randomly initialised ResNet-34 and its BatchNorm frozen at identity statistics, Adam at 1e-3 blows the
# encoder's features up (mean |f| 21 -> 1e5 after two updates) and the loss is NaN by step 4.
TRAIN_LR = 1e-5

TARGETS = {"pixel_recon_step_s": 0.25, "sampling_over_plain": 2.0}
ANCHOR = ("Hou et al. 2024, Experiments: every training task completed on a single RTX 3090 Ti "
          "(no step time given)")
TARGET_TEXT = {"pixel_recon_step_s": "pixel recon training step, 256x256, batch 8, on an H100: under 0.25 s",
               "sampling_over_plain": "rectified sampling step / plain step: under 2x"}


class Deadline:
    """Rows start only while the budget lasts (None: no budget); skipped rows are listed."""

    def __init__(self, budget_s: float | None):
        self.end = None if budget_s is None else time.perf_counter() + budget_s
        self.skipped: list[str] = []

    def allows(self, row: str, log) -> bool:
        if self.end is None or time.perf_counter() < self.end:
            return True
        self.skipped.append(row)
        log(f"  {row}: skipped (time budget spent)")
        return False


def resident_mib(device) -> float:
    """Memory held when a row starts (GPU: allocated, e.g. the suite's SD model beside the pixel one; CPU: RSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# -- models ----------------------------------------------------------------------------------------------------


def tiny_open_clip(device):
    """A random-weight OpenCLIP with ViT-B-32's tokenizer and a 32x32, 2-layer image tower (``--tiny``)."""
    import open_clip

    from core.clip_model import OpenCLIP

    model = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                                         head_width=32),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    model = model.to(device).eval().requires_grad_(False)
    return OpenCLIP(model, open_clip.get_tokenizer("ViT-B-32"), "tiny", 32)


def vit_b32(device):
    """OpenCLIP ViT-B-32 with random weights (no download)."""
    import open_clip

    from core.clip_model import OpenCLIP

    model = open_clip.create_model("ViT-B-32", pretrained=None, device=device).eval().requires_grad_(False)
    return OpenCLIP(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32", 224)


def clip_for(name: str, device):
    """(DirectionalCLIP, None) or (None, why not)."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return None, "open_clip is not installed"
    from core.rectifier.clip_direction import DirectionalCLIP

    oc = tiny_open_clip(device) if name == "tiny" else vit_b32(device)
    return DirectionalCLIP(oc, *EDIT_TEXTS), None


def make_rectifier(model, channels: int, c: dict, device):
    r = new_rectifier(model.unet_parameters(), channels, encoder_layers=tuple(c["encoder_layers"]), width=c["width"],
                      estimate_clip=c["estimate_clip"]).to(device)
    layers = r.config.layers
    info = {"modulated_layers": len(layers), "rectifier_parameters": sum(p.numel() for p in r.parameters()),
            "denoiser_parameters": sum(p.numel() for p in model.unet.parameters()),
            "generated_values_per_sample": generated_values(list(layers)),
            "encoder_layers": list(c["encoder_layers"]), "width": c["width"], "estimate_clip": c["estimate_clip"]}
    return r, info


# -- rows ------------------------------------------------------------------------------------------------------


def time_train(model, rectifier, fresh: dict, x0, config: TrainConfig, warmup: int, device, **kw) -> dict:
    """One training row: train_rectifier for config.steps steps from R's initial state ``fresh``, timed per step.

    Out of GPU memory: ``oom``.  A non-finite loss (see :data:`TRAIN_LR`): ``diverged_at`` and the
    steps timed before it, if any."""
    rectifier.load_state_dict(fresh)
    timer = Timer(device)
    free_memory(device)
    reset_peak(device)
    resident = resident_mib(device)
    row = {"mode": config.mode, "batch": config.batch, "lr": config.lr}
    try:
        timer.start()
        res = train_rectifier(model, rectifier, x0, config, on_step=timer, **kw)
        row["final_loss"] = res.losses[-1]
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _oom(e):
            raise
        free_memory(device)
        return {**row, "oom": True, "error": str(e).splitlines()[0][:200]}
    except FloatingPointError as e:
        row["diverged_at"] = len(timer.times) + 1
        row["error"] = str(e)
        if not timer.times:
            return {**row, "failed": True}
    finally:
        rectifier.eval()
    return {**row, **step_stats(timer, min(warmup, len(timer.times) - 1)), "peak_mib": peak_mib(device),
            "resident_mib_at_start": resident}


def cfg_eps(fn, cond: torch.Tensor, uncond: torch.Tensor, w: float):
    """eps(x, t) with classifier-free guidance as one batch-2 call of ``fn(x, t, cond)``."""
    both = torch.cat([uncond, cond])

    def eps(x, t):
        e_u, e_c = fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return e_u + w * (e_c - e_u)

    return eps


def time_sample(eps_fn, model, shape, steps: int, warmup: int, device, clip_x0) -> dict:
    timer = Timer(device)
    free_memory(device)
    reset_peak(device)
    resident = resident_mib(device)
    timer.start()
    ddpm_sample(eps_fn, model.alphas_cumprod, shape, steps, torch.Generator().manual_seed(0), device,
                clip_x0=clip_x0, on_step=timer)
    return {**step_stats(timer, warmup), "peak_mib": peak_mib(device), "resident_mib_at_start": resident}


def sampling(model, rectifier, x0, shape, c: dict, device, cond=None, uncond=None, log=print) -> dict:
    """Plain vs rectified (base and modulated estimates) DDPM steps; SD (``cond`` given): CFG batch 2."""
    steps, warm = c["sample_steps"], c["warmup"]
    clip_x0 = 1.0 if cond is None else None
    guided = (lambda fn: cfg_eps(fn, cond, uncond, c["guidance"])) if cond is not None else (
        lambda fn: (lambda x, t: fn(x, t, None)))
    out = {"steps": steps, "warmup": warm, "shape": list(shape),
           "cfg": None if cond is None else {"guidance": c["guidance"], "batch": 2}}
    with torch.no_grad():
        out["plain"] = time_sample(guided(model.eps), model, shape, steps, warm, device, clip_x0)
        for est in ("base", "modulated"):
            with rectified(model, rectifier, x0, 1.0, est, cond) as R:
                row = time_sample(guided(R.eps), model, shape, steps, warm, device, clip_x0)
                row["base_calls"] = R.base_calls
            out[f"rectified_{est}"] = row
    for est in ("base", "modulated"):
        out[f"{est}_over_plain"] = out[f"rectified_{est}"]["s_per_step"] / out["plain"]["s_per_step"]
    log(f"  DDPM{' + CFG' if cond is not None else ''} step: plain {out['plain']['s_per_step']:.4f} s, "
        f"rectified (base) {out['rectified_base']['s_per_step']:.4f} s ({out['base_over_plain']:.2f}x), "
        f"rectified (modulated) {out['rectified_modulated']['s_per_step']:.4f} s "
        f"({out['modulated_over_plain']:.2f}x); peak {out['rectified_base']['peak_mib']:.0f} MiB")
    return out


def _median_call(fn, calls: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def components(model, rectifier, x0, x, t, cond, calls: int, device) -> dict:
    """Seconds per call of each part of a rectified eps call, at the sampling batch (median of ``calls``)."""
    out = {"plain_eps_s": _median_call(lambda: model.eps(x, t, cond), calls, device)}
    with rectified(model, rectifier, x0, 1.0, "base", cond) as R:
        out["base_eps_in_views_s"] = _median_call(lambda: R.base.eps(x, t, cond), calls, device)
        p = R.base_estimate(x, t, cond)
        xb = R.x0_for(x)
        out["rectifier_forward_s"] = _median_call(lambda: rectifier(xb, p, t), calls, device)
        fns = modulation_functions(rectifier(xb, p, t))
        out["modulated_eps_s"] = _median_call(lambda: R.modulated.eps(x, t, cond, Features(modulation=fns)),
                                              calls, device)
        out["rectified_eps_base_estimate_s"] = _median_call(lambda: R(x, t, cond), calls, device)
    plain = out["plain_eps_s"]
    out["modulated_over_plain"] = out["modulated_eps_s"] / plain
    out["views_over_plain"] = out["base_eps_in_views_s"] / plain
    return out


def _log_train(r: dict, what: str, log) -> None:
    if r.get("oom"):
        log(f"  {what} batch {r['batch']}: out of memory")
    elif r.get("failed"):
        log(f"  {what} batch {r['batch']}: {r['error']}")
    else:
        if "diverged_at" in r:
            log(f"  {what} batch {r['batch']}: loss not finite at step {r['diverged_at']} (timed the steps before)")
        log(f"  {what} batch {r['batch']}: {r['s_per_step']:.4f} s/step (mean {r['mean_s_per_step']:.4f}), "
            f"peak {r['peak_mib']:.0f} MiB")


# -- back ends -------------------------------------------------------------------------------------------------


def _rows(steps, deadline: Deadline, log) -> None:
    """Run (name, fn) in order while the budget lasts."""
    for name, fn in steps:
        if deadline.allows(name, log):
            fn()


def time_pixel(c: dict, device, deadline: Deadline, log=print) -> dict:
    t0 = time.perf_counter()
    model = random_pixel_ddpm(device, config=CELEBAHQ_256 if c["unet"] == "celebahq-256" else TINY_PIXEL)
    rect, info = make_rectifier(model, 3, c, device)
    fresh = {k: v.detach().clone() for k, v in rect.state_dict().items()}  # every training row starts here
    s, w = c["size"], c["warmup"]
    log(f"pixel DDPM ({c['model']}) at {s}x{s}: {info['modulated_layers']} modulated layers, rectifier "
        f"{info['rectifier_parameters'] / 1e6:.1f} M parameters; built in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(max(c["train_batches"] + [c["edit_batch"]]), 3, s, s, generator=g) * 2 - 1).to(device)
    x = torch.randn(1, 3, s, s, generator=g).to(device)
    out = {"model": c["model"], "size": s, **info, "train": []}

    def recon(b):
        config = TrainConfig(mode="recon", steps=c["train_steps"], batch=b, lr=TRAIN_LR)
        r = time_train(model, rect, fresh, x0, config, w, device)
        _log_train(r, "pixel recon", log)
        out["train"].append(r)

    def edit():
        clip, why = clip_for(c["clip"], device)
        if clip is None:
            out["edit_skipped"] = why
            log(f"  pixel edit: skipped ({why})")
            return
        to_image = lambda z: (z.clamp(-1, 1) + 1) / 2
        config = TrainConfig(mode="edit", steps=c["edit_steps"], batch=c["edit_batch"], lr=TRAIN_LR)
        r = time_train(model, rect, fresh, x0, config, w, device, clip=clip, to_image=to_image)
        _log_train(r, f"pixel edit (CLIP {c['clip']})", log)
        out["train"].append({**r, "clip": c["clip"]})

    b0, *more = c["train_batches"]
    _rows([(f"pixel recon batch {b0}", lambda: recon(b0)),  # the acceptance rows first
           ("pixel sampling", lambda: out.update(sampling=sampling(model, rect, x0[:1], (1, 3, s, s), c, device,
                                                                   log=log))),
           ("pixel components", lambda: out.update(components=components(
               model, rect, x0[:1], x, torch.full((1,), 500, device=device), None, c["components_calls"], device))),
           *[(f"pixel recon batch {b}", lambda b=b: recon(b)) for b in more],
           ("pixel edit", edit)], deadline, log)
    return out  # the model and R go with this frame (free_memory afterwards)


def time_sd(model, c: dict, device, deadline: Deadline, log=print) -> dict:
    rect, info = make_rectifier(model, 4, c, device)
    fresh = {k: v.detach().clone() for k, v in rect.state_dict().items()}
    lat, w = c["latent"], c["warmup"]
    log(f"SD ({c['model']}) at latent {lat}x{lat} ({lat * 8}x{lat * 8} px): {info['modulated_layers']} modulated "
        f"layers, rectifier {info['rectifier_parameters'] / 1e6:.1f} M parameters")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(max(c["train_batches"]), 4, lat, lat, generator=g).to(device)
    x = torch.randn(2, 4, lat, lat, generator=g).to(device)
    with torch.no_grad():
        cond, uncond = model.encode_text([SD_PROMPT]), model.encode_text([""])
    out = {"model": c["model"], "latent": lat, "pixels": lat * 8, **info, "train": []}

    def recon(b):
        config = TrainConfig(mode="recon", steps=c["train_steps"], batch=b, lr=TRAIN_LR)
        r = time_train(model, rect, fresh, x0, config, w, device, cond=cond)
        _log_train(r, "SD recon", log)
        out["train"].append(r)

    b0, *more = c["train_batches"]
    _rows([(f"SD recon batch {b0}", lambda: recon(b0)),
           ("SD sampling", lambda: out.update(sampling=sampling(model, rect, x0[:1], (1, 4, lat, lat), c, device,
                                                                cond, uncond, log=log))),
           ("SD components", lambda: out.update(components=components(
               model, rect, x0[:1], x, torch.full((2,), 500, device=device), torch.cat([uncond, cond]),
               c["components_calls"], device))),
           *[(f"SD recon batch {b}", lambda b=b: recon(b)) for b in more]], deadline, log)
    return out


def targets(res: dict, device) -> dict:
    """The acceptance targets against the measured values; ``met`` only on a GPU at the real sizes."""
    device = torch.device(device)
    applies = device.type == "cuda" and res["tier"] == "real"
    out = {"applies": applies, "anchor": ANCHOR, "device": None}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out["device"] = name
        out["device_is_h100"] = "H100" in name
    px = res.get("pixel", {})
    rec8 = [r for r in px.get("train", []) if r["mode"] == "recon" and r["batch"] == 8 and "s_per_step" in r]
    if rec8:
        out["pixel_recon_step_s"] = {"what": TARGET_TEXT["pixel_recon_step_s"], "limit": TARGETS["pixel_recon_step_s"],
                                     "value": rec8[0]["s_per_step"]}
    for back in ("pixel", "sd"):
        smp = res.get(back, {}).get("sampling")
        if smp:
            for est in ("base", "modulated"):
                out[f"sampling_{back}_{est}_over_plain"] = {"what": TARGET_TEXT["sampling_over_plain"] + f" ({back}, "
                                                            f"estimate={est})", "limit": TARGETS["sampling_over_plain"],
                                                            "value": smp[f"{est}_over_plain"]}
    for v in out.values():
        if isinstance(v, dict) and applies:
            v["met"] = v["value"] < v["limit"]
    return out


def time_rectifier(cfg: dict, device, sd_model=None, log=print) -> dict:
    """The pixel and SD rows for settings ``cfg`` (:data:`REAL` / :data:`TINY`; ``cfg['backends']``
    restricts them, ``cfg['threads']`` sets torch's CPU threads for the run).  ``sd_model``: an SD
    model already built (the suite's); else one is built."""
    before = torch.get_num_threads()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    try:
        return _time_rectifier(cfg, torch.device(device), sd_model, log)
    finally:
        torch.set_num_threads(before)


def _time_rectifier(cfg: dict, device: torch.device, sd_model, log) -> dict:
    deadline = Deadline(cfg.get("budget_s"))
    backends = cfg.get("backends", ["pixel", "sd"])
    res = {"tier": cfg["tier"], "settings": {k: v for k, v in cfg.items() if k != "tier"},
           "torch_threads": torch.get_num_threads(),
           "precision": {"train": "bf16 autocast" if device.type == "cuda" else "fp32",
                         "sample": "models' dtype (pixel fp32, SD fp16)" if device.type == "cuda" else "fp32"}}
    seconds = {}
    if "pixel" in backends:
        t0 = time.perf_counter()
        res["pixel"] = time_pixel(cfg["pixel"], device, deadline, log)
        free_memory(device)
        seconds["pixel"] = time.perf_counter() - t0
    if "sd" in backends and deadline.allows("SD (all rows)", log):
        t0 = time.perf_counter()
        if sd_model is None:
            sd_model = tiny_sd(device) if cfg["tier"] == "tiny" else random_sd15(device)
        res["sd"] = time_sd(sd_model, cfg["sd"], device, deadline, log)
        free_memory(device)
        seconds["sd"] = time.perf_counter() - t0
    res["skipped"] = deadline.skipped
    res["seconds"] = seconds
    res["targets"] = targets(res, device)
    for k, v in res["targets"].items():
        if isinstance(v, dict):
            verdict = (" -> met" if v["met"] else " -> MISSED") if "met" in v else " (not checked: not a GPU at the " \
                                                                                   "real sizes)"
            log(f"  target {k}: {v['value']:.3f} vs {v['limit']}{verdict}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models (the default without CUDA)")
    ap.add_argument("--real", action="store_true", help="real sizes even on the CPU (slow)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--only", default="pixel,sd", help="comma-separated back ends: pixel, sd")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which no new row starts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/rectifier_speed_<tier>_"
                                                "<device>.json)")
    a = ap.parse_args(argv)
    if a.tiny and a.real:
        ap.error("--tiny or --real, not both")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = a.tiny or (device.type != "cuda" and not a.real)
    cfg = dict(TINY if tiny else REAL, budget_s=a.budget, threads=a.threads,
               backends=[s.strip() for s in a.only.split(",") if s.strip()])
    log = lambda m: print(m, flush=True)
    if a.threads:  # before the header, which records the threads
        torch.set_num_threads(a.threads)
    data = header(device)
    log(f"{data['machine']}; torch {torch.__version__}; {cfg['tier']} models on {device}; "
        f"load average {data.get('load_average_1_5_15_min')}")
    t0 = time.perf_counter()
    res = time_rectifier(cfg, device, log=log)
    data.update(res)
    data["total_seconds"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):  # the CPU's other work, at the end too (the header has it at the start)
        data["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if a.out:
        out = Path(a.out)
    elif device.type == "cuda":
        tag = "".join(ch if ch.isalnum() else "-" for ch in torch.cuda.get_device_name(device).lower()).strip("-")
        out = RESULTS / f"rectifier_speed_{cfg['tier']}_{tag}_{datetime.now(timezone.utc):%Y%m%d}.json"
    else:
        out = RESULTS / f"rectifier_speed_{cfg['tier']}_cpu.json"
    log(f"wrote {write_result(out, data)} ({data['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
