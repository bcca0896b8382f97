"""LayerDiffusion per-stage speed and peak memory, and the projected whole edit, standalone (diffusers back end).

    python benchmarks/layerdiffusion_speed.py --checkpoint v1-5-pruned-emaonly.safetensors   # a GPU
    python benchmarks/layerdiffusion_speed.py --random           # random-weight SD 1.5, no checkpoint file
    python benchmarks/layerdiffusion_speed.py --tiny --out benchmarks/results/layerdiffusion_speed_tiny_cpu.json

The three stages of :mod:`core.layerdiffusion` on a random image, a random reference image, a
centred box covering 1/4 of the image (half its width and height) as the object mask and an all-zero
reference mask (a pure background reference, as the ``layerdiffusion_reference_background`` workflow),
both brought onto the latent grid by :func:`core.layerdiffusion.latent_mask`:

* stage 1, :func:`~core.layerdiffusion.optimize_layers` (eq. 2 as written, the default "concat" reading:
  e_a and e_b trained together in one prediction on their 154 concatenated tokens, one batch-1 UNet
  forward and backward per step, the UNet frozen; the "separate" readings run batch 2);
* stage 2, :func:`~core.layerdiffusion.finetune_layered` (eqs. 4-6 at e_opt = 0.7 e^_a + 0.3 e^_b,
  L_obj on the image, L_bg on the reference: one batch-2 call per step), LoRA (the pack's default,
  rank 8 on every UNet conv/linear weight) and full (the paper's: every UNet weight with Adam, trained in place);
* stage 3, :func:`~core.layerdiffusion.iterative_sample` (eq. 8: DDIM with classifier-free guidance,
  w = 7.5, one batch-2 call per step, e^_a and e_opt alternating) with the LoRA-mode fine-tuned model
  applied as :meth:`LayerDiffusionEdit.render` does (``model.adapted`` with the result's weight functions: the
  LoRA factors on every trained layer's output at every call).  Plain CFG DDIM on the base model
  (:func:`core.sampling.ddim_sample`) is timed next to it, to show what the fine-tuned view costs.

For each: the median seconds per step after a warm-up step (``on_step`` intervals; ``mean_s_per_step``
averages every interval, the first included) and the peak memory of the stage (GPU:
``max_memory_allocated``, i.e. without the CUDA context and the allocator's cache; CPU: the process's
peak RSS since the stage began).  Gradient checkpointing and bf16 autocast (the fit loop's ``auto``
precision) are on for a GPU, off for the CPU, as in ``imagic_speed.py`` and ``sine_speed.py``.  SD 1.5:
512x512 (latent 64x64); tiny model: 64x64 (latent 8x8).

The whole edit is projected at the paper's settings (§3.3): 500 stage-1 steps + 250 stage-2 steps +
50 sampling steps, per fine-tune mode, with the largest stage peak, and set against the paper's
anchor, about 2 minutes per edit on an A100, and the pack's target, a whole edit under 1 minute on an
H100 (checked only when the device is an H100; on another GPU the ratio to the anchor is printed, on
the CPU only the projection).  Not counted: loading the model, text and VAE encoding, SAM masks, the
target image O_t that the workflow generates first, and VAE decoding.  ``--out`` writes a JSON file
with the machine, date and command.  :func:`time_layerdiffusion` is what ``benchmarks/gpu_suite.py``
runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, free_memory, header, sd_model, sd_parser, step_stats, write_result  # noqa: E402
from memory import peak_mib, reset_peak  # noqa: E402

from core.layerdiffusion import (  # noqa: E402
    ALPHA,
    GuidanceConfig,
    LayeredFineTuneConfig,
    LayerEmbeddingConfig,
    finetune_layered,
    interpolate_layers,
    iterative_sample,
    latent_mask,
    optimize_layers,
)
from core.sampling import ddim_sample  # noqa: E402

OBJECT_TEXT = "a photo of a jumping dog"
BACKGROUND_TEXT = "on a beach"

PAPER_STEPS = {"embedding": 500, "finetune": 250, "sampling": 50}  # §3.3
PAPER_A100_MINUTES = 2.0  # the paper's anchor: about 2 minutes per edit on an A100
TARGET_H100_MINUTES = 1.0  # the pack's target: a whole edit under 1 minute on an H100

# Settings: SD 1.5 at 512x512 and the tiny model (CPU check).  Steps timed per stage, the first = warm-up.
SD15 = dict(size=512, embedding_steps=6, finetune_steps=6, finetunes=["lora", "full"], sample_steps=50,
            guidance=7.5, alpha=ALPHA)
TINY = dict(SD15, size=64)


def masks(size: int, latent_hw: tuple[int, int]) -> dict:
    """The object mask (a centred box, half the width and height: 1/4 of the image) and an all-zero
    reference mask, in pixels [1, S, S] and on the latent grid [1, 1, h, w]."""
    obj = torch.zeros(1, size, size)
    q = size // 4
    obj[:, q:size - q, q:size - q] = 1.0
    ref = torch.zeros(1, size, size)
    return {"M": latent_mask(obj, latent_hw, (size, size), "mask_image"),
            "M_r": latent_mask(ref, latent_hw, (size, size), "mask_reference", allow_empty=True),
            "object_fraction": float(obj.mean())}


def _run(fn, device) -> tuple[dict, object]:
    timer = Timer(device)
    free_memory(device)
    reset_peak(device)
    timer.start()
    out = fn(timer)
    return {**step_stats(timer), "peak_gib": peak_mib(device) / 1024}, out


def time_layerdiffusion(model, cfg: dict, device=None, log=print) -> dict:
    """Stage 1, stage 2 (each mode in ``cfg['finetunes']``), stage 3 and the projected whole edit on
    ``model`` with settings ``cfg`` (:data:`SD15` or :data:`TINY`, or a dict with the same keys);
    returns a JSON-ready dict."""
    device = torch.device(device or model.device)
    gpu = device.type == "cuda"
    size = cfg["size"]
    gen = torch.Generator().manual_seed(0)
    img, ref = torch.rand(1, 3, size, size, generator=gen), torch.rand(1, 3, size, size, generator=gen)
    with torch.no_grad():
        latent, ref_latent = model.encode(img.to(device)), model.encode(ref.to(device))
        e_a, e_b = model.encode_text([OBJECT_TEXT]), model.encode_text([BACKGROUND_TEXT])
        uncond = model.encode_text([""])
    hw = tuple(latent.shape[-2:])
    m = masks(size, hw)
    log(f"{size}x{size} (latent {hw[0]}x{hw[1]}, object mask {m['object_fraction']:.0%} of the image, "
        f"{int(m['M'].sum())} latent cells; reference mask all zero) on {device} ({torch.get_num_threads()} threads), "
        f"checkpointing {'on' if gpu else 'off'}, {'bf16 autocast' if gpu else 'fp32'}")
    rows = []

    def add(row):
        rows.append(row)
        paper = f"   paper's {row['paper_steps']} steps: {row['paper_minutes']:7.2f} min"
        log(f"  {row['stage']:<42} {row['s_per_step']:8.4f} s/step   peak {row['peak_gib']:6.2f} GiB{paper}")

    # stage 1
    ecfg = LayerEmbeddingConfig(steps=cfg["embedding_steps"], gradient_checkpointing=gpu)
    r, layers = _run(lambda tm: optimize_layers(model, latent, e_a, e_b, m["M"], ecfg, on_step=tm), device)
    n = PAPER_STEPS["embedding"]
    add({"stage": "stage 1: layered embeddings (e_a + e_b)", "key": "embedding", **r, "paper_steps": n,
         "paper_minutes": r["s_per_step"] * n / 60})
    e_opt = interpolate_layers(layers.e_a, layers.e_b, cfg["alpha"])
    e_hat_a = layers.e_a
    del layers

    # stage 2
    tuned = None
    for mode in sorted(cfg["finetunes"], key=lambda x: x == "lora"):  # LoRA last: its result is kept for stage 3
        tuned = None  # the previous mode's result is dropped before this one is timed (not in its peak)
        fcfg = LayeredFineTuneConfig(mode=mode, steps=cfg["finetune_steps"], gradient_checkpointing=gpu)
        r, res = _run(lambda tm, c=fcfg: finetune_layered(model, latent, ref_latent, e_opt, m["M"], m["M_r"], c,
                                                           on_step=tm), device)
        n = PAPER_STEPS["finetune"]
        add({"stage": f"stage 2: layered fine-tune ({mode})", "key": f"finetune ({mode})", "mode": mode, **r,
             "trainable_parameters": res.trainable_parameters, "paper_steps": n,
             "paper_minutes": r["s_per_step"] * n / 60})
        tuned = res  # the last one (LoRA when timed) is kept for stage 3; its deltas are on the CPU
        del res

    # stage 3
    sampling_model = None
    if cfg["sample_steps"] and tuned is not None:
        sampling_model = tuned.mode
        shape = (1, 4, *hw)
        gc_ = GuidanceConfig(steps=cfg["sample_steps"], guidance=cfg["guidance"])
        fns = tuned.weight_functions()
        del tuned
        with model.adapted({k: f.to(device) for k, f in fns.items()}) as view:
            iterative_sample(view, e_hat_a, e_opt, uncond, shape, GuidanceConfig(2, cfg["guidance"]))  # warm-up
            r, _ = _run(lambda tm: iterative_sample(view, e_hat_a, e_opt, uncond, shape, gc_, on_step=tm), device)
        del fns
        n = PAPER_STEPS["sampling"]
        add({"stage": f"stage 3: iterative guidance ({sampling_model} view)", "key": "sampling", **r,
             "sample_steps": cfg["sample_steps"], "paper_steps": n, "paper_minutes": r["s_per_step"] * n / 60})
        ddim_sample(model, e_opt, uncond, shape=shape, steps=2, guidance=cfg["guidance"])  # warm-up
        r, _ = _run(lambda tm: ddim_sample(model, e_opt, uncond, shape=shape, steps=cfg["sample_steps"],
                                           guidance=cfg["guidance"], on_step=tm), device)
        add({"stage": "baseline: DDIM + CFG, base model", "key": "base cfg", **r,
             "sample_steps": cfg["sample_steps"], "paper_steps": n, "paper_minutes": r["s_per_step"] * n / 60})
    else:
        del tuned
    free_memory(device)
    out = {"settings": cfg, "latent": list(hw), "object_latent_cells": int(m["M"].sum()), "stages": rows,
           "sampling_model": sampling_model, "paper_steps": PAPER_STEPS}
    out["whole_edit"] = whole_edit(rows)
    out["anchors"] = anchors(out["whole_edit"], device)
    _log_whole(out, device, log)
    return out


def whole_edit(rows: list[dict]) -> dict:
    """Projected minutes (and peak GiB) of a whole edit at the paper's settings (500 + 250 + 50 steps), per
    fine-tune mode."""
    per = {r["key"]: r for r in rows}
    out = {}
    for mode in ("lora", "full"):
        key = f"finetune ({mode})"
        if key in per and "embedding" in per and "sampling" in per:
            parts = [per["embedding"], per[key], per["sampling"]]
            seconds = sum(p["s_per_step"] * p["paper_steps"] for p in parts)
            out[mode] = {"minutes": seconds / 60, "peak_gib": max(p["peak_gib"] for p in parts),
                         "stage_minutes": {p["key"]: p["paper_minutes"] for p in parts}}
    return out


def anchors(edit: dict, device) -> dict:
    """The projection against the paper's A100 anchor (GPU only) and the pack's H100 target (``met`` only on an
    H100)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    h100 = gpu is not None and "H100" in gpu
    out = {"device": gpu or "cpu", "paper_A100_minutes": PAPER_A100_MINUTES, "target_H100_minutes": TARGET_H100_MINUTES,
           "target_applies": h100}
    for mode, e in edit.items():
        row = {"minutes": e["minutes"]}
        if gpu is not None:  # a CPU projection is not compared with a GPU figure
            row["over_paper_A100"] = e["minutes"] / PAPER_A100_MINUTES
        if h100:
            row["target_met"] = e["minutes"] < TARGET_H100_MINUTES
        out[mode] = row
    return out


def _log_whole(res: dict, device, log) -> None:
    a = res["anchors"]
    log(f"whole edit at the paper's settings ({PAPER_STEPS['embedding']} + {PAPER_STEPS['finetune']} + "
        f"{PAPER_STEPS['sampling']} steps), projected; paper: about {PAPER_A100_MINUTES:g} min per edit on an "
        f"A100; pack target: under {TARGET_H100_MINUTES:g} min on an H100")
    for mode, e in res["whole_edit"].items():
        st = e["stage_minutes"]
        line = (f"  {mode:<5} {e['minutes']:8.2f} min  (stage 1 {st['embedding']:.2f} + stage 2 "
                f"{st[f'finetune ({mode})']:.2f} + stage 3 {st['sampling']:.2f})   peak {e['peak_gib']:6.2f} GiB")
        if device.type == "cuda":
            line += f"   {a[mode]['over_paper_A100']:.2f}x the paper's A100 figure"
            if a["target_applies"]:
                line += "   (target met)" if a[mode]["target_met"] else "   (TARGET MISSED)"
            else:
                line += f"   (H100 target not checked on {a['device']})"
        log(line)
    if device.type != "cuda":
        log("  (CPU: the projection only; the A100 anchor and the H100 target are GPU figures)")


def main() -> None:
    ap = sd_parser(__doc__)
    ap.add_argument("--size", type=int, default=None, help="image size (default 512; --tiny 64)")
    ap.add_argument("--steps", type=int, default=None,
                    help="stage 1 and stage 2 steps timed (first one is warm-up; default 6)")
    ap.add_argument("--sample-steps", type=int, default=None, help="DDIM steps of the stage 3 run (default 50; "
                                                                   "0 skips stage 3)")
    ap.add_argument("--no-full", action="store_true", help="skip full fine-tuning (a float32 UNet copy with Adam)")
    from imagic_speed import reference_args, reference_main

    reference_args(ap, "layerdiffusion")
    a = ap.parse_args()
    if a.reference:
        reference_main(a, "layerdiffusion")
        return
    model, name, device, tiny = sd_model(ap, a)
    cfg = dict(TINY if tiny else SD15)
    if a.size:
        cfg["size"] = a.size
    if a.steps:
        cfg["embedding_steps"] = cfg["finetune_steps"] = a.steps
    if a.sample_steps is not None:
        cfg["sample_steps"] = a.sample_steps
    if a.no_full:
        cfg["finetunes"] = [f for f in cfg["finetunes"] if f != "full"]
    print(name, flush=True)
    res = time_layerdiffusion(model, cfg, device, log=lambda msg: print(msg, flush=True))
    if a.out:
        data = {**header(device), "model": name, **res}
        print(f"wrote {write_result(a.out, data)}")


if __name__ == "__main__":
    main()
