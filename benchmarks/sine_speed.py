"""SINE fine-tuning and guided-sampling speed and peak memory, standalone (diffusers back end).

    python benchmarks/sine_speed.py --checkpoint v1-5-pruned-emaonly.safetensors   # a GPU
    python benchmarks/sine_speed.py --random                # random-weight SD 1.5, no checkpoint file
    python benchmarks/sine_speed.py --tiny --out benchmarks/results/sine_speed_tiny_cpu.json   # CPU, tiny model

Fine-tuning (:func:`core.sine.finetune_sine`), one row per setting: LoRA (rank 8 on every
conv/linear weight, the pack's default) and full fine-tuning, each on the whole image (paper: 800
steps) and by patches with the positional map F(v) (paper: 10,000 steps; each step draws a crop
and VAE-encodes it, which is counted), and full fine-tuning with the text encoder trained too
(``train_text_encoder``, the official code's setting; the prompt is re-encoded through the
adapted encoder every step, which is counted; the row is skipped with a note when the pack's
``SineFineTuneConfig`` lacks the field).  For each: the median seconds per step after a warm-up
step (``on_step`` intervals; ``mean_s_per_step`` in the JSON averages every interval, the first
included), the peak memory of the stage (GPU: ``max_memory_allocated``, i.e. without the CUDA
context and the allocator's cache; CPU: the process's peak RSS since the stage began), and the
median times the paper's step count.  Gradient checkpointing and bf16 autocast (the fit loop's
``auto`` precision) are on for a GPU, off for the CPU, as in ``imagic_speed.py``.  SD 1.5: whole
image 512x512, patches cut from the 1024x1024 resize and resized to 512 (the official sizes);
tiny model: 64x64, patches from 128 to 64 (the tests' sizes).

Guided sampling (:func:`core.sine.edit`, DDIM with model-based guidance, eq. 3) at two latent
sizes (SD 1.5: 64x64 = 512x512 px and 96x128 = 768x1024 px, height x width, the paper's
Figs. 13-18; tiny model: 16x16 and 24x32), ``--sample-steps`` DDIM steps (default 50), w = 7.5,
v = 0.7, with the fine-tuned model of the "LoRA, patches" row (its LoRA factors on every conv/linear
weight, applied to the layers' outputs as a view of the base, plus F(v) of the whole grid):

* ``K=-1``: every step guided (two base predictions in one batch + the fine-tuned view's): the
  cost of one guided step;
* ``K=400`` (the paper's): guided only while t > 400 (30 of the 50 DDIM timesteps 981, 961, ...,
  1); reported as the run's mean seconds per step, the figure a user waits for;
* the baseline, plain CFG DDIM (:func:`core.sampling.ddim_sample` on the model, no views):
  what the same edit costs without SINE.  This is the fair baseline: ``edit`` with K=999 is
  also plain CFG (the fine-tuned view is never evaluated; with the same seed it gives the same
  latents) but it runs the base through the installed views, so it already carries part of
  SINE's cost.  It is timed too (``cfg_in_views``), to show that overhead separately.

Ratios: ``guided_over_cfg`` = K=-1 step / CFG step (medians after the warm-up step) and
``k400_over_cfg`` = K=400 run / CFG run (mean seconds per step over the whole run, its first
interval including ``edit``'s set-up: installing the views and copying the deltas).  Each size
is warmed up first (a few steps of CFG and of guided sampling) and every run's first step is
left out of the medians.  Targets (``targets`` in the result; printed next to the numbers on a
GPU, where they apply): full fine-tuning with the text encoder under 24 GiB peak, both LoRA rows
under 10 GiB, and a K=400 run at most 1.6x plain CFG per step at every size.

Not measured: VAE decoding of the edit, text encoding (done once), loading the model, the time
to the paper's quality (random weights and a few steps say nothing about it), batch sizes above
1, and fp16/bf16 sampling beyond the model's own dtype (float16 on a GPU, float32 on the CPU).
``--out`` writes a JSON file with the machine, date and command.  :func:`time_sine` is what
``benchmarks/gpu_suite.py`` runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, free_memory, header, sd_model, sd_parser, step_stats, write_result  # noqa: E402
from memory import peak_mib, reset_peak  # noqa: E402

from core.diffusion import timesteps  # noqa: E402
from core.sampling import ddim_sample  # noqa: E402
from core.lora import Deltas  # noqa: E402
from core.sine import PatchConfig, SineFineTuneConfig, edit, finetune_sine  # noqa: E402

FINETUNE_PROMPT = "a photo of a sks dog"
TARGET_PROMPT = "a photo of a sks dog wearing a hat"

# (label, mode, patches, train_text_encoder)
FINETUNES = (("LoRA", "lora", False, False), ("LoRA, patches", "lora", True, False), ("full", "full", False, False),
             ("full, patches", "full", True, False), ("full + text encoder", "full", False, True))
PAPER_STEPS = {False: 800, True: 10_000}  # paper §4: without / with patches

# Settings: real SD 1.5 (the paper's sizes) and the tiny model (CPU check).
SD15 = dict(finetune_size=512, finetune_steps=4, patch=None, finetunes=[f[0] for f in FINETUNES],
            sample_latents=[[64, 64], [96, 128]], sample_steps=50, guidance=7.5, v=0.7, K=400, warmup_steps=2)
TINY = dict(SD15, finetune_size=64, patch=dict(high_resolution=128, size=64), sample_latents=[[16, 16], [24, 32]])

TARGETS = {"full + text encoder peak GiB": 24.0, "LoRA peak GiB": 10.0, "K=400 / CFG per step": 1.6}


def text_encoder_supported() -> bool:
    """Does this pack's SINE fine-tuning train the text encoder (config field and ``prompt=``)?"""
    fields = {f.name for f in dataclasses.fields(SineFineTuneConfig)}
    return "train_text_encoder" in fields and "prompt" in inspect.signature(finetune_sine).parameters


def time_finetune(model, image, cond, label: str, steps: int, patch: PatchConfig, gpu: bool, device) -> tuple:
    """One fine-tuning row (``label`` from :data:`FINETUNES`) and its result."""
    _, mode, patches, text = next(f for f in FINETUNES if f[0] == label)
    kw = dict(mode=mode, steps=steps, patches=patches, patch=patch, gradient_checkpointing=gpu)
    extra = {}
    if text:
        kw["train_text_encoder"] = True
    if "prompt" in inspect.signature(finetune_sine).parameters:
        extra["prompt"] = FINETUNE_PROMPT
    config = SineFineTuneConfig(**kw)
    timer = Timer(device)
    free_memory(device)
    reset_peak(device)
    timer.start()
    res = finetune_sine(model, image, cond, config, on_step=timer, **extra)
    row = {"stage": label, "mode": mode, "patches": patches, "text_encoder": text, **step_stats(timer),
           "peak_gib": peak_mib(device) / 1024, "trainable_parameters": res.trainable_parameters,
           "paper_steps": PAPER_STEPS[patches]}
    row["paper_minutes"] = row["s_per_step"] * row["paper_steps"] / 60
    return row, res


def time_sampling(model, tuned, conds: dict, latent: tuple[int, int], cfg: dict, device) -> dict:
    """Plain CFG DDIM, CFG inside the views (K=999), and SINE's guidance with K=-1 and K=``cfg['K']``."""
    shape = (1, 4, *latent)
    steps, w, v = cfg["sample_steps"], cfg["guidance"], cfg["v"]
    u, c, c_hat = conds["uncond"], conds["target"], conds["finetune"]
    runs = {
        "cfg": lambda n, tm: ddim_sample(model, c, u, shape=shape, steps=n, guidance=w, on_step=tm),
        "cfg_in_views": lambda n, tm: edit(model, tuned, c, c_hat, u, shape, n, w, v, K=999, on_step=tm),
        "guided_every_step": lambda n, tm: edit(model, tuned, c, c_hat, u, shape, n, w, v, K=-1, on_step=tm),
        f"guided_K{cfg['K']}": lambda n, tm: edit(model, tuned, c, c_hat, u, shape, n, w, v, K=cfg["K"],
                                                  on_step=tm),
    }
    wu = cfg.get("warmup_steps", 2)
    runs["cfg"](wu, None)  # warm-up at this size (kernels, allocator)
    runs["guided_every_step"](wu, None)
    ts = timesteps(len(model.alphas_cumprod), steps, "leading", steps_offset=1).tolist()
    out = {"latent": list(latent), "pixels": [latent[0] * 8, latent[1] * 8], "steps": steps,
           f"guided_steps_K{cfg['K']}": sum(t > cfg["K"] for t in ts)}
    for name, run in runs.items():
        timer = Timer(device)
        free_memory(device)
        reset_peak(device)
        timer.start()
        run(steps, timer)
        out[name] = {**step_stats(timer), "peak_gib": peak_mib(device) / 1024}
    base = out["cfg"]
    out["guided_over_cfg"] = out["guided_every_step"]["s_per_step"] / base["s_per_step"]
    out[f"k{cfg['K']}_over_cfg"] = out[f"guided_K{cfg['K']}"]["mean_s_per_step"] / base["mean_s_per_step"]
    out["views_over_cfg"] = out["cfg_in_views"]["s_per_step"] / base["s_per_step"]
    return out


def _target(device, ok: bool) -> str:
    if device.type != "cuda":
        return ""
    return "  (target met)" if ok else "  (TARGET MISSED)"


def time_sine(model, cfg: dict, device=None, log=print) -> dict:
    """SINE fine-tuning rows and guided-sampling timings on ``model`` with settings ``cfg``
    (:data:`SD15` or :data:`TINY`, or a dict with the same keys); returns a JSON-ready dict."""
    device = torch.device(device or model.device)
    gpu = device.type == "cuda"
    size = cfg["finetune_size"]
    patch = PatchConfig(**cfg["patch"]) if cfg.get("patch") else PatchConfig()
    img = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conds = {k: model.encode_text([p]) for k, p in (("uncond", ""), ("target", TARGET_PROMPT),
                                                        ("finetune", FINETUNE_PROMPT))}
    log(f"fine-tuning at {size}x{size}, patches {patch.high_resolution} -> {patch.size}, on {device} "
        f"({torch.get_num_threads()} threads), checkpointing {'on' if gpu else 'off'}, "
        f"{'bf16 autocast' if gpu else 'fp32'}, {cfg['finetune_steps']} steps (first = warm-up)")
    rows, skipped, tuned = [], [], None
    sample_from = "LoRA, patches" if "LoRA, patches" in cfg["finetunes"] else cfg["finetunes"][0]
    for label in cfg["finetunes"]:
        if label == "full + text encoder" and not text_encoder_supported():
            skipped.append(label)
            log(f"  {label:<22} skipped: SineFineTuneConfig has no train_text_encoder (or finetune_sine no prompt=)")
            continue
        row, res = time_finetune(model, img, conds["finetune"], label, cfg["finetune_steps"], patch, gpu, device)
        rows.append(row)
        if label == sample_from:  # kept for sampling, off the device meanwhile (not in the other rows' peaks)
            lean = isinstance(res.deltas, Deltas)  # a LoRA's factors: small, left where they are
            tuned = dataclasses.replace(res, delta={}, text_delta={}, text_deltas={},
                                        deltas=res.deltas if lean else {k: d.cpu() for k, d in res.deltas.items()})
        del res
        limit = TARGETS["LoRA peak GiB"] if row["mode"] == "lora" else (
            TARGETS["full + text encoder peak GiB"] if row["text_encoder"] else None)
        note = "" if limit is None else _target(device, row["peak_gib"] < limit)
        log(f"  {label:<22} {row['s_per_step']:8.3f} s/step   peak {row['peak_gib']:6.2f} GiB   "
            f"paper's {row['paper_steps']} steps: {row['paper_minutes']:7.1f} min{note}")
    free_memory(device)
    out = {"settings": cfg, "finetune": rows, "skipped": skipped, "sampling": [], "sampling_model": sample_from}
    if tuned is not None and cfg["sample_latents"]:
        if not isinstance(tuned.deltas, Deltas):
            tuned = dataclasses.replace(tuned, deltas={k: d.to(device) for k, d in tuned.deltas.items()})
        for latent in cfg["sample_latents"]:
            out["sampling"].append(time_sampling(model, tuned, conds, tuple(latent), cfg, device))
            _log_sampling(out["sampling"][-1], cfg["K"], device, log)
    del tuned
    free_memory(device)
    out["targets"] = targets(out, device)
    return out


def _log_sampling(s: dict, K: int, device, log) -> None:
    (h, w), (lh, lw) = s["pixels"], s["latent"]
    log(f"  sampling {h}x{w} px (latent {lh}x{lw}), {s['steps']} DDIM steps, K={K} guides "
        f"{s[f'guided_steps_K{K}']} of them:")
    for name in ("cfg", "cfg_in_views", "guided_every_step", f"guided_K{K}"):
        r = s[name]
        log(f"    {name:<18} {r['s_per_step']:8.4f} s/step (median)  {r['mean_s_per_step']:8.4f} (mean)   "
            f"peak {r['peak_gib']:6.2f} GiB")
    ratio = s[f"k{K}_over_cfg"]
    log(f"    guided / CFG step {s['guided_over_cfg']:.2f}x;  K={K} / CFG, mean over the run {ratio:.2f}x"
        f"{_target(device, ratio <= TARGETS['K=400 / CFG per step'])};  CFG in views / plain CFG "
        f"{s['views_over_cfg']:.2f}x")


def targets(res: dict, device) -> dict:
    """The GPU targets against the measured values ({name: {limit, value, met}}; ``applies`` False on a CPU)."""
    K = res["settings"]["K"]
    out = {"applies": torch.device(device).type == "cuda"}
    lora = [r["peak_gib"] for r in res["finetune"] if r["mode"] == "lora"]
    text = [r["peak_gib"] for r in res["finetune"] if r["text_encoder"]]
    ratio = [s[f"k{K}_over_cfg"] for s in res["sampling"]]
    for name, values in (("full + text encoder peak GiB", text), ("LoRA peak GiB", lora),
                         ("K=400 / CFG per step", ratio)):
        if values:
            limit, value = TARGETS[name], max(values)
            out[name] = {"limit": limit, "value": value, "met": value <= limit if "/" in name else value < limit}
    return out


def main() -> None:
    ap = sd_parser(__doc__)
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps timed per row (first one is warm-up)")
    ap.add_argument("--sample-steps", type=int, default=None, help="DDIM steps per sampling run (default 50)")
    ap.add_argument("--only", default=None, help="semicolon-separated fine-tuning rows (default all: "
                                                 + "; ".join(f[0] for f in FINETUNES) + ")")
    ap.add_argument("--no-sampling", action="store_true", help="skip guided sampling")
    ap.add_argument("--size", type=int, default=None, help="--reference: image size (default 256)")
    from imagic_speed import reference_args, reference_main

    reference_args(ap, "sine")
    a = ap.parse_args()
    if a.reference:
        reference_main(a, "sine")
        return
    model, name, device, tiny = sd_model(ap, a)
    cfg = dict(TINY if tiny else SD15)
    if a.steps:
        cfg["finetune_steps"] = a.steps
    if a.sample_steps:
        cfg["sample_steps"] = a.sample_steps
    if a.only:
        cfg["finetunes"] = [s.strip() for s in a.only.split(";") if s.strip()]
    if a.no_sampling:
        cfg["sample_latents"] = []
    print(name, flush=True)
    res = time_sine(model, cfg, device, log=lambda m: print(m, flush=True))
    if res["skipped"]:
        print(f"skipped: {', '.join(res['skipped'])} (not supported by this version of core.sine)")
    if a.out:
        data = {**header(device), "model": name, **res}
        print(f"wrote {write_result(a.out, data)}")


if __name__ == "__main__":
    main()
