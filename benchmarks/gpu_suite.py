"""Every method's speed and memory benchmark at the papers' scale, in one run and one table.

    python benchmarks/gpu_suite.py                       # one GPU: papers' sizes, random weights
    python benchmarks/gpu_suite.py --dry-run             # the same code at tiny sizes on the CPU (seconds)
    python benchmarks/gpu_suite.py --download-wheels     # here, with PyPI: the wheels a bare GPU machine lacks

What it runs (the functions of the single benchmarks, not copies of them):

* SinDDM (``sinddm_speed.py``): one training step at every scale of the 250x200 image at the
  paper's width 160 and batch 32, the projected time of the paper's 120,000 steps (one
  random scale per step), and one full-size sample;
* Imagic (``imagic_speed.py``) on Stable Diffusion 1.5 at 512x512 with random weights built
  from the pack's shipped configs (no checkpoint file): embedding step, LoRA fine-tune step,
  full fine-tune step (with its peak memory) and DDIM+CFG step, with checkpointing and bf16
  autocast as the nodes use on a GPU, and the projected whole edit (500 + 1000 + 50 steps);
* Imagic on SDXL (``imagic_speed.py``): the same stages (embedding, LoRA r8 fine-tune, DDIM + CFG) on a
  random-weight SDXL base built from the shipped configs at 1024x1024, fp16 weights with the VAE in
  fp32, bf16 autocast and checkpointing, and the projected whole LoRA edit, with issue 21's targets
  (LoRA step under 16 GB, the whole edit under 3 minutes on one H100) checked in the log and the JSON;
* SINE (``sine_speed.py``) on the same model: a fine-tuning step (LoRA and full, on the whole
  512x512 image and by patches of the 1024 resize, and full with the text encoder) with its peak
  memory and the paper's projected fine-tuning time (800 / 10,000 steps), and a DDIM step with
  model-based guidance (every step guided, and the paper's K=400 averaged over 50 steps) next to
  a plain CFG step, at 512x512 and 768x1024 (height x width), with the targets (full + text
  encoder under 24 GiB, LoRA under 10 GiB, K=400 at most 1.6x CFG) checked in the log and the JSON;
* LayerDiffusion (``layerdiffusion_speed.py``) on the same model at 512x512, a centred box (1/4 of
  the image) as the object mask and an all-zero reference mask: a stage-1 step (layered embeddings
  e_a + e_b, one batch-2 UNet call), a stage-2 step (layered fine-tune, LoRA and full), a stage-3
  step (iterative guidance, DDIM + CFG with the LoRA-tuned view) next to plain CFG DDIM, each with
  its peak memory, and the projected whole edit at the paper's 500 + 250 + 50 steps against the
  paper's "about 2 minutes per edit on an A100" and the pack's target (under 1 minute on an H100);
* the engine (``engine_switch.py``) on the same model: the cost of switching between the
  base and a LoRA view inside a step, and a DDIM step with SINE's model-based guidance where
  the fine-tuned model is a LoRA view of the base, next to a plain CFG step;
* the High-Fidelity rectifier (``rectifier_speed.py``): on a random-weight pixel DDPM with
  ``google/ddpm-celebahq-256``'s architecture at 256x256 (R with the paper's ResNet-34 encoder), a
  reconstruction training step at batch 8 and 1 with its peak memory (and an edit step at batch 8
  when open_clip is installed: the bare GPU machine has it only from the carried wheels), and a DDPM
  step of the plain model next to the rectified one (P_t from the base model: 2 passes + R; from
  the previous modulated estimate: 1 pass + R); on the same SD 1.5 at 512x512 (latent 64x64), a
  reconstruction step at batch 1 and 4 and the same sampling comparison with CFG (batch 2); the
  targets (pixel step at batch 8 under 0.25 s on an H100, rectified step under 2x a plain one) in
  the log and the JSON.  Bounded to about 90 s: few steps per row (2 warm-up + 3), and no row
  starts after ``budget_s`` (skipped rows are listed in the JSON).  Then ``python -m core.rectifier
  train`` end to end on the device, reconstruction and then editing with a random OpenCLIP
  (:func:`run_rectifier_cli_edit`, a few seconds; it needs the open_clip wheels of
  ``--download-wheels``).

With ``--imagic-reference PATH`` (a carried local copy of diffusers' community Imagic pipeline, and the
accelerate wheels of ``--download-wheels``) it also runs ``imagic_speed.side_by_side``: the port's embedding
and full fine-tune steps beside ours (LoRA, full, full with checkpointing), each in its own process, fp32,
with the ratios ours / port in the table (about 3 more minutes).

Sized to finish well inside 8 minutes on one H100/H200 (not yet run on one: the JSON records
how long each part took).  Prints one table and writes it with the machine, date and command to a JSON file
(default ``benchmarks/results/gpu_suite_<device>_<date>.json``; ``--dry-run``: a temporary
folder unless ``--out`` is given).

On the lent GPU machine (no network; torch, torchvision and transformers installed, diffusers
not; open_clip only for the rectifier's CLI and edit rows): build the wheel folder here once with
``--download-wheels`` (``.whl/``: the diffusers, open_clip and ftfy wheels; add ``/.whl/`` to
``.git/info/exclude``), carry it, and the suite installs it into a temporary
folder itself when ``import diffusers`` fails.  The whole call::

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT/gpu_suite.json",
        carry=[".whl"], timeout_s=540)

then copy the returned JSON into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

DEFAULT_WHEELS = ROOT / ".whl"
# What a bare GPU machine lacks (it has torch, torchvision, transformers, huggingface_hub, safetensors,
# numpy, Pillow, regex, requests, filelock); diffusers' own needs are all there on Python >= 3.8.
WHEELS = ("diffusers==0.42.1",
          # the rectifier stage's CLI edit training (a random OpenCLIP): open_clip and ftfy, which it imports
          "open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth",
          # --imagic-reference: the community pipeline imports accelerate (which needs psutil and PyYAML)
          "accelerate==1.16.0", "psutil", "PyYAML")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")

# The papers' sizes (default) and the dry run's.
FULL = dict(sinddm_image="coffee_250x200.png", sinddm_width=160, sinddm_batch=32, sinddm_steps=3, sinddm_warmup=1,
            sinddm_paper_steps=120_000, sd="random", sd_size=512, sd_steps=6, switch_latent=64, switch_calls=10,
            guided_steps=6, sdxl_size=1024, sdxl_steps=5,
            sine=dict(finetune_size=512, finetune_steps=4, patch=None,
                      finetunes=["LoRA", "LoRA, patches", "full", "full, patches", "full + text encoder"],
                      sample_latents=[[64, 64], [96, 128]], sample_steps=50, guidance=7.5, v=0.7, K=400,
                      warmup_steps=2),
            layerdiffusion=dict(size=512, embedding_steps=4, finetune_steps=4, finetunes=["lora", "full"],
                                sample_steps=50, guidance=7.5, alpha=0.7),
            # rectifier_speed.REAL (celebahq-256 at 256x256, SD 1.5 at 512x512), with these step counts
            rectifier=dict(tier="real", budget_s=90,
                           steps=dict(train_steps=5, edit_steps=4, sample_steps=8, components_calls=3, warmup=2)))
DRY = dict(sinddm_image="coffee_128x100.png", sinddm_width=8, sinddm_batch=2, sinddm_steps=1, sinddm_warmup=1,
           sinddm_paper_steps=120_000, sinddm_resize=(90, 70), sd="tiny", sd_size=32, sd_steps=2, switch_latent=4,
           switch_calls=2, guided_steps=2, sdxl_size=32, sdxl_steps=2,
           sine=dict(finetune_size=64, finetune_steps=2, patch=dict(high_resolution=128, size=64),
                     finetunes=["LoRA", "LoRA, patches", "full", "full, patches", "full + text encoder"],
                     sample_latents=[[16, 16], [24, 32]], sample_steps=10, guidance=7.5, v=0.7, K=400,
                     warmup_steps=1),
           layerdiffusion=dict(size=64, embedding_steps=2, finetune_steps=2, finetunes=["lora", "full"],
                               sample_steps=4, guidance=7.5, alpha=0.7),
           # one thread: tiny networks gain nothing from more, and on a busy machine two threads ran 7x slower
           rectifier=dict(tier="tiny", budget_s=None, threads=1,
                          steps=dict(train_steps=2, edit_steps=2, sample_steps=3, components_calls=1, warmup=1)))


def download_wheels(dest: Path, python: str = "3.12") -> list[Path]:
    """pip download (no dependencies, binary only, for the GPU machine's Python and platform) of :data:`WHEELS`."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", str(dest), *WHEELS]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def ensure_diffusers(wheels: Path | None) -> str:
    """Import diffusers; if it is missing, install the wheels in ``wheels`` into a temporary folder first."""
    try:
        import diffusers
    except ImportError:
        files = sorted(glob.glob(str(Path(wheels) / "*.whl"))) if wheels else []
        if not files:
            raise SystemExit(
                "diffusers is not installed and no wheel folder was found "
                f"({wheels}). On a machine with PyPI: python benchmarks/gpu_suite.py --download-wheels, "
                "then carry .whl/ (or pass --wheels DIR).") from None
        site = Path(tempfile.mkdtemp(prefix="sie_site_"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *files], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        importlib.invalidate_caches()
        import diffusers
        print(f"installed {', '.join(Path(f).name for f in files)} into {site}", flush=True)
    return diffusers.__version__


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class Table:
    """Rows of (method, stage, setting, value, unit, peak memory in MiB or None)."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, method, stage, setting, value, unit, peak_mib=None):
        self.rows.append({"method": method, "stage": stage, "setting": setting, "value": float(value), "unit": unit,
                          "peak_mib": None if peak_mib is None else float(peak_mib)})

    def render(self) -> str:
        head = ("method", "stage", "setting", "time", "peak memory")
        body = []
        for r in self.rows:
            v = r["value"]
            t = f"{v:.4g} {r['unit']}" if abs(v) < 1e4 else f"{v:.3e} {r['unit']}"
            m = "" if r["peak_mib"] is None else (f"{r['peak_mib'] / 1024:.2f} GiB" if r["peak_mib"] >= 1024
                                                  else f"{r['peak_mib']:.0f} MiB")
            body.append((r["method"], r["stage"], r["setting"], t, m))
        w = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
        line = lambda cells: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(cells)) + " |"
        return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, body)])


def run_sinddm(table: Table, cfg: dict, device, log) -> dict:
    from PIL import Image
    from sinddm_speed import time_sample, time_training

    from core.sinddm import build_pyramid

    img = Image.open(ROOT / "core/sinddm/data" / cfg["sinddm_image"]).convert("RGB")
    if cfg.get("sinddm_resize"):
        img = img.resize(cfg["sinddm_resize"], Image.LANCZOS)
    pyr = build_pyramid(img)
    w, b = cfg["sinddm_width"], cfg["sinddm_batch"]
    res, ours = time_training(pyr, w, b, cfg["sinddm_steps"], cfg["sinddm_warmup"], device, log=log)
    setting = f"width {w}, batch {b}"
    for row in res["scales"]:
        sw, sh = row["size"]
        table.add("SinDDM", f"train step, scale {row['scale']} ({sw}x{sh})", setting, row["ours_s"], "s/step",
                  row["ours_peak_mib"])
    n = cfg["sinddm_paper_steps"]
    table.add("SinDDM", "train step, mean over scales", setting, res["ours_mean_s"], "s/step")
    table.add("SinDDM", f"paper's training, projected ({n} steps)", setting, res["ours_mean_s"] * n / 3600, "h")
    smp = time_sample(ours.net, pyr, device, log=log)
    sw, sh = smp["size"]
    table.add("SinDDM", f"one sample, full size ({sw}x{sh})", f"{smp['denoiser_calls']} denoiser calls",
              smp["seconds"], "s", smp["peak_mib"])
    return {"image": cfg["sinddm_image"], "pyramid": [list(s) for s in pyr.spec.sizes], **res, "sample": smp}


def build_sd(cfg: dict, device):
    from common import random_sd15, tiny_sd

    if cfg["sd"] == "tiny":
        return tiny_sd(device), "tiny SD-shaped model (tests/tiny_sd.py)"
    return random_sd15(device), "SD 1.5, random weights from core/sd/configs/sd15"


def run_imagic(table: Table, cfg: dict, model, name: str, device, log) -> dict:
    from imagic_speed import time_stages, whole_edit

    size = cfg["sd_size"]
    stages = ("embedding", "fine-tune (lora r8)", "fine-tune (full)", "DDIM + CFG sampling")
    rows = time_stages(model, size, cfg["sd_steps"], device, stages, log=log)
    gpu = device.type == "cuda"
    setting = f"{size}x{size}, " + ("bf16 autocast, checkpointing" if gpu else "fp32")
    labels = {"embedding": "embedding step", "fine-tune (lora r8)": "LoRA fine-tune step (r8)",
              "fine-tune (full)": "full fine-tune step", "DDIM + CFG sampling": "DDIM + CFG step"}
    for r in rows:
        table.add("Imagic", labels[r["stage"]], setting, r["s_per_step"], "s/step", r["peak_gib"] * 1024)
    edit = whole_edit(rows)
    for mode, e in edit.items():
        table.add("Imagic", f"whole edit, {mode} (500+1000+50 steps)", setting, e["minutes"], "min",
                  e["peak_gib"] * 1024)
    return {"model": name, "size": size, "stages": rows, "whole_edit": edit}


SDXL_TARGETS = {"lora_step_peak_gib": 16 * 1e9 / 2**30, "whole_lora_edit_min": 3.0}  # issue 21, one H100


def run_imagic_sdxl(table: Table, cfg: dict, device, log) -> dict:
    """Imagic's stages on SDXL at its native size (random weights), with issue 21's targets."""
    from common import random_sdxl, tiny_sd
    from imagic_speed import time_stages, whole_edit

    t0 = time.perf_counter()
    if cfg["sd"] == "tiny":
        model, name = tiny_sd(device, xl=True), "tiny SDXL-shaped model (tests/tiny_sd.py)"
    else:
        model, name = random_sdxl(device), "SDXL base, random weights from core/sd/configs/sdxl"
    log(f"{name} built on {device} in {time.perf_counter() - t0:.1f} s")
    size = cfg["sdxl_size"]
    rows = time_stages(model, size, cfg["sdxl_steps"], device, ("embedding", "fine-tune (lora r8)",
                                                                   "DDIM + CFG sampling"), log=log)
    setting = f"{size}x{size}, " + ("bf16 autocast, checkpointing" if device.type == "cuda" else "fp32")
    labels = {"embedding": "embedding step", "fine-tune (lora r8)": "LoRA fine-tune step (r8)",
              "DDIM + CFG sampling": "DDIM + CFG step"}
    for r in rows:
        table.add("Imagic SDXL", labels[r["stage"]], setting, r["s_per_step"], "s/step", r["peak_gib"] * 1024)
    edit = whole_edit(rows).get("lora r8", {})
    if edit:
        table.add("Imagic SDXL", "whole edit, lora r8 (500+1000+50 steps)", setting, edit["minutes"], "min",
                  edit["peak_gib"] * 1024)
    lora = next(r for r in rows if r["stage"] == "fine-tune (lora r8)")
    applies = device.type == "cuda" and cfg["sd"] != "tiny"  # the targets are for one H100 at 1024x1024
    targets = {"applies": applies,
               "lora_step_peak_gib": {"target": SDXL_TARGETS["lora_step_peak_gib"], "measured": lora["peak_gib"]},
               "whole_lora_edit_min": {"target": SDXL_TARGETS["whole_lora_edit_min"], "measured": edit.get("minutes")}}
    for k in ("lora_step_peak_gib", "whole_lora_edit_min"):
        v = targets[k]
        if applies and v["measured"] is not None:
            v["met"] = v["measured"] < v["target"]
        log(f"SDXL target {k}: measured {v['measured']}, target {v['target']:.3g}"
            + (f": {'met' if v['met'] else 'NOT met'}" if "met" in v else " (no verdict off a GPU)"))
    del model
    return {"model": name, "size": size, "stages": rows, "whole_edit": edit, "targets": targets}


def run_sine(table: Table, cfg: dict, model, device, log) -> dict:
    from sine_speed import time_sine

    sc = cfg["sine"]
    res = time_sine(model, sc, device, log=log)
    gpu = device.type == "cuda"
    prec = "bf16 autocast, checkpointing" if gpu else "fp32"
    size, patch = sc["finetune_size"], sc["patch"] or {"high_resolution": 1024, "size": 512}
    for r in res["finetune"]:
        setting = (f"{patch['high_resolution']} -> {patch['size']} crops" if r["patches"]
                   else f"{size}x{size}") + f", {prec}"
        table.add("SINE", f"fine-tune step, {r['stage']}", setting, r["s_per_step"], "s/step", r["peak_gib"] * 1024)
        table.add("SINE", f"paper's fine-tuning, {r['stage']} ({r['paper_steps']} steps), projected", setting,
                  r["paper_minutes"], "min")
    K = sc["K"]
    for s in res["sampling"]:
        (h, w), (lh, lw) = s["pixels"], s["latent"]
        setting = f"{h}x{w} px (latent {lh}x{lw}), {s['steps']} DDIM steps"
        for key, stage, stat in (("cfg", "DDIM + CFG step (plain)", "s_per_step"),
                                 ("cfg_in_views", "DDIM + CFG step inside views (K=999)", "s_per_step"),
                                 ("guided_every_step", "DDIM step, guided (K=-1)", "s_per_step"),
                                 (f"guided_K{K}", f"DDIM step, K={K}, mean over the run", "mean_s_per_step")):
            table.add("SINE", f"{stage}, {h}x{w}", setting, s[key][stat], "s/step", s[key]["peak_gib"] * 1024)
        table.add("SINE", f"guided / CFG step, {h}x{w}", setting, s["guided_over_cfg"], "x")
        table.add("SINE", f"K={K} / CFG, mean over the run, {h}x{w}", setting, s[f"k{K}_over_cfg"], "x")
    where = "" if res["targets"]["applies"] else " (a GPU target; this run is not on a GPU)"
    for name, t in res["targets"].items():
        if name != "applies":
            log(f"  target {name}: {t['value']:.2f} vs {t['limit']} -> {'met' if t['met'] else 'MISSED'}{where}")
    return res


def run_layerdiffusion(table: Table, cfg: dict, model, device, log) -> dict:
    from layerdiffusion_speed import PAPER_STEPS, time_layerdiffusion

    lc = cfg["layerdiffusion"]
    res = time_layerdiffusion(model, lc, device, log=log)
    gpu = device.type == "cuda"
    size = lc["size"]
    setting = f"{size}x{size}, " + ("bf16 autocast, checkpointing" if gpu else "fp32")
    for r in res["stages"]:
        extra = f", {r['sample_steps']} DDIM steps" if "sample_steps" in r else ""
        table.add("LayerDiffusion", f"{r['stage']} step", setting + extra, r["s_per_step"], "s/step",
                  r["peak_gib"] * 1024)
    steps = "+".join(str(PAPER_STEPS[k]) for k in ("embedding", "finetune", "sampling"))
    anchors = res["anchors"]
    for mode, e in res["whole_edit"].items():
        table.add("LayerDiffusion", f"whole edit, {mode} ({steps} steps), projected", setting, e["minutes"], "min",
                  e["peak_gib"] * 1024)
        if gpu:
            table.add("LayerDiffusion", f"whole edit, {mode} / paper's A100 figure ({anchors['paper_A100_minutes']:g} "
                      "min)", f"{setting}, {anchors['device']}", anchors[mode]["over_paper_A100"], "x")
    return res


def run_engine(table: Table, cfg: dict, model, device, log) -> dict:
    from engine_switch import guided_step, switch_cost
    from memory import peak_mib, reset_peak

    lat = cfg["switch_latent"]
    reset_peak(device)
    sw = switch_cost(model, lat, cfg["switch_calls"])
    peak = peak_mib(device)
    setting = f"latent {lat}x{lat}, LoRA r4 on attention"
    for key, stage in (("plain_model_s", "eps call, plain model"), ("base_in_views_s", "eps call, base in views()"),
                       ("view_s", "eps call, LoRA view"), ("pair_s", "eps calls, base + view alternating"),
                       ("switch_cost_s", "view switch cost (pair - base - view)")):
        table.add("engine", stage, setting, sw[key], "s", peak if key == "pair_s" else None)
    log(f"  switch cost {sw['switch_cost_s']:+.4f} s (pair {sw['pair_s']:.4f} s)")
    reset_peak(device)
    gd = guided_step(model, lat, cfg["guided_steps"])
    peak = peak_mib(device)
    table.add("engine", "DDIM + CFG step (base only)", setting, gd["ddim_cfg_step_s"], "s/step")
    table.add("engine", "DDIM step, SINE guidance with a LoRA view", setting, gd["ddim_guided_lora_view_step_s"],
              "s/step", peak)
    log(f"  guided step / CFG step: {gd['guided_over_cfg']:.2f}")
    return {"switch": sw, "guided": gd}


def run_rectifier(table: Table, cfg: dict, model, device, log) -> dict:
    from rectifier_speed import REAL, TINY, time_rectifier

    rc = cfg["rectifier"]
    base = REAL if rc["tier"] == "real" else TINY
    settings = {**base, "budget_s": rc["budget_s"], "threads": rc.get("threads"),
                "pixel": {**base["pixel"], **rc["steps"]}, "sd": {**base["sd"], **rc["steps"]}}
    res = time_rectifier(settings, device, sd_model=model, log=log)
    gpu = device.type == "cuda"
    for key, name in (("pixel", "pixel DDPM"), ("sd", "SD")):
        r = res.get(key)
        if not r:
            continue
        size = f"{r['size']}x{r['size']}" if key == "pixel" else f"{r['pixels']}x{r['pixels']} (latent {r['latent']})"
        rect = f"R: ResNet blocks {'-'.join(map(str, r['encoder_layers']))}, width {r['width']}"
        setting = f"{size}, {rect}, " + ("bf16 autocast" if gpu else "fp32")
        for t in r["train"]:
            stage = f"{t['mode']} train step, {name}, batch {t['batch']}"
            if "s_per_step" not in t:  # out of memory, or no step finished
                log(f"  {stage}: {'out of memory' if t.get('oom') else t.get('error')} (no row)")
                continue
            table.add("Rectifier", stage, setting + (f", CLIP {t['clip']}" if "clip" in t else ""), t["s_per_step"],
                      "s/step", t["peak_mib"])
        smp = r.get("sampling")
        if smp:
            kind = "DDPM step" if key == "pixel" else "DDPM + CFG step"
            ssetting = f"{size}, batch {smp['shape'][0]}" + (", CFG as one batch-2 call" if key == "sd" else "") + \
                       (", model dtype" if gpu else ", fp32")
            for k, label in (("plain", "plain"), ("rectified_base", "rectified (base estimate)"),
                             ("rectified_modulated", "rectified (modulated estimate)")):
                table.add("Rectifier", f"{kind}, {label}, {name}", ssetting, smp[k]["s_per_step"], "s/step",
                          smp[k]["peak_mib"])
            for est in ("base", "modulated"):
                table.add("Rectifier", f"rectified / plain step, {est} estimate, {name}", ssetting,
                          smp[f"{est}_over_plain"], "x")
        comp = r.get("components")
        if comp:
            table.add("Rectifier", f"rectifier forward (one call), {name}", size, comp["rectifier_forward_s"], "s")
            table.add("Rectifier", f"modulated pass / plain pass, {name}", size, comp["modulated_over_plain"], "x")
    if res["skipped"]:
        log(f"  skipped (time budget): {', '.join(res['skipped'])}")
    res["cli_edit"] = run_rectifier_cli_edit(table, device, log)
    return res


def run_rectifier_cli_edit(table: Table, device, log) -> dict:
    """``python -m core.rectifier train`` end to end on ``device``: reconstruction (2 steps), then editing (Alg. 1,
    2 steps, continued from it) with a random-weight OpenCLIP ViT-S-32, on a small random pixel DDPM (32x32) and
    four random PNGs written to a temporary folder; the files are read back (mode, history, finite losses).  The
    edit step indexes the CLIP source images with indices drawn on the model's device: the check that every
    tensor of a step lives there (a CPU tensor indexed with CUDA indices crashed it before).  Needs open_clip
    (the wheels of ``--download-wheels``); without it the row is skipped and said so.  Errors are recorded in the
    JSON (``error``) and fail the suite."""
    import shutil

    import torch

    try:
        import open_clip
    except ImportError:
        log("  CLI edit training: skipped (open_clip is not installed)")
        return {"skipped": "open_clip is not installed"}
    from common import TINY_PIXEL, random_pixel_ddpm
    from PIL import Image
    from safetensors.torch import save_file

    from core.pixel import save_pixel_folder
    from core.rectifier import load_rectifier
    from core.rectifier.__main__ import main as rectifier_cli

    tmp = Path(tempfile.mkdtemp(prefix="sie_rect_cli_"))
    try:
        save_pixel_folder(random_pixel_ddpm("cpu", config=TINY_PIXEL).unet, tmp / "model")
        (tmp / "images").mkdir()
        g = torch.Generator().manual_seed(0)
        for i in range(4):
            Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(tmp / "images" / f"{i}.png")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = open_clip.create_model("ViT-S-32", pretrained=None)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp / "clip.safetensors"))
        del clip
        common = ["--model", str(tmp / "model"), "--images", str(tmp / "images"), "--steps", "2", "--batch", "2",
                  "--encoder-blocks", "1,1,1,1", "--width", "8", "--device", str(device)]
        t0 = time.perf_counter()
        rectifier_cli(["train", "--mode", "recon", *common, "--out", str(tmp / "recon.safetensors")])
        recon_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rectifier_cli(["train", "--mode", "edit", *common, "--continue", str(tmp / "recon.safetensors"),
                       "--clip", str(tmp / "clip.safetensors"), "--clip-arch", "ViT-S-32", "--source", "photo",
                       "--target", "painting", "--out", str(tmp / "edit.safetensors")])
        edit_s = time.perf_counter() - t0
        _, info = load_rectifier(tmp / "edit.safetensors")
        modes = [h["mode"] for h in info.history]
        losses = [h["final_loss"] for h in info.history]
        if info.mode != "edit" or modes != ["recon", "edit"] or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"the edit file records mode {info.mode}, history {modes}, final losses {losses}")
        setting = "pixel DDPM 32x32 (random), 4 images, batch 2, 2 steps, CLIP ViT-S-32 (random)"
        table.add("Rectifier", "CLI train --mode edit (end to end)", setting, edit_s, "s")
        log(f"  CLI: recon {recon_s:.1f} s, edit {edit_s:.1f} s on {device}; history {modes}, final losses {losses}")
        return {"recon_s": recon_s, "edit_s": edit_s, "history": modes, "final_losses": losses}
    except Exception as e:  # noqa: BLE001  (recorded; the suite exits 1)
        import traceback

        log(traceback.format_exc())
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes and models, on the CPU, a few steps")
    ap.add_argument("--imagic-reference", default=None, metavar="PATH",
                    help="also run imagic_speed's side by side with the diffusers community pipeline (a local copy of "
                         "examples/community/imagic_stable_diffusion.py, carried: not part of the pack) at the suite's "
                         "SD size, fp32, one round: about 3 minutes on one GPU")
    ap.add_argument("--device", default=None, help="default: cuda (cpu for --dry-run)")
    ap.add_argument("--only", default="sinddm,imagic,sine,layerdiffusion,engine,rectifier,imagic_sdxl",
                    help="comma-separated subset")
    ap.add_argument("--out", default=None, help="the JSON file (default: benchmarks/results/gpu_suite_<device>_<date>"
                                                ".json; --dry-run: a temporary folder)")
    ap.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="wheel folder to install from when diffusers is "
                                                                  "missing")
    ap.add_argument("--download-wheels", nargs="?", const=str(DEFAULT_WHEELS), default=None, metavar="DIR",
                    help="download the wheels a bare GPU machine lacks into DIR (default .whl) and exit")
    a = ap.parse_args(argv)
    if a.download_wheels:
        files = download_wheels(Path(a.download_wheels))
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} wheel(s), {size:.1f} MiB in {a.download_wheels}; carry it: run(..., carry=['.whl'])")
        return 0
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    diffusers_version = ensure_diffusers(Path(a.wheels) if a.wheels else None)

    import torch
    from common import header, write_result

    cfg = DRY if a.dry_run else FULL
    device = torch.device(a.device or ("cpu" if a.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or use --dry-run (CPU, tiny sizes)")
    log = lambda msg: print(msg, flush=True)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    table = Table()
    data = {**header(device), "tier": "dry-run" if a.dry_run else "papers' sizes", "diffusers": diffusers_version,
            "settings": cfg}
    log(f"{data['machine']}; torch {torch.__version__}, diffusers {diffusers_version}; {data['tier']}")
    timings = {}
    if "sinddm" in only:
        t0 = time.perf_counter()
        log("SinDDM")
        data["sinddm"] = run_sinddm(table, cfg, device, log)
        timings["sinddm"] = time.perf_counter() - t0
    if only & {"imagic", "sine", "layerdiffusion", "engine", "rectifier"}:
        t0 = time.perf_counter()
        model, name = build_sd(cfg, device)
        log(f"{name} built on {device} in {time.perf_counter() - t0:.1f} s")
        if "imagic" in only:
            t0 = time.perf_counter()
            log("Imagic")
            data["imagic"] = run_imagic(table, cfg, model, name, device, log)
            timings["imagic"] = time.perf_counter() - t0
        if "sine" in only:
            t0 = time.perf_counter()
            log("SINE")
            data["sine"] = run_sine(table, cfg, model, device, log)
            timings["sine"] = time.perf_counter() - t0
        if "layerdiffusion" in only:
            t0 = time.perf_counter()
            log("LayerDiffusion")
            data["layerdiffusion"] = run_layerdiffusion(table, cfg, model, device, log)
            timings["layerdiffusion"] = time.perf_counter() - t0
        if "engine" in only:
            t0 = time.perf_counter()
            log("engine")
            data["engine"] = run_engine(table, cfg, model, device, log)
            timings["engine"] = time.perf_counter() - t0
        if "rectifier" in only:
            t0 = time.perf_counter()
            log("Rectifier")
            try:
                data["rectifier"] = run_rectifier(table, cfg, model, device, log)
            except Exception as e:  # not yet run on a GPU: keep the other stages' results (exit status 1)
                import traceback

                log(traceback.format_exc())
                data["rectifier"] = {"error": f"{type(e).__name__}: {e}"}
            timings["rectifier"] = time.perf_counter() - t0
        del model
    if "imagic_sdxl" in only:
        t0 = time.perf_counter()
        log("Imagic on SDXL")
        try:
            data["imagic_sdxl"] = run_imagic_sdxl(table, cfg, device, log)
        except Exception as e:  # not yet run on a GPU: keep the other stages' results (exit status 1)
            import traceback

            log(traceback.format_exc())
            data["imagic_sdxl"] = {"error": f"{type(e).__name__}: {e}"}
        timings["imagic_sdxl"] = time.perf_counter() - t0
    if a.imagic_reference:
        t0 = time.perf_counter()
        log("Imagic side by side with the community pipeline")
        from imagic_speed import side_by_side

        try:
            sbs = side_by_side(a.imagic_reference, cfg["sd_size"], 4, 1, str(device), log=log)
            data["imagic_vs_reference"] = sbs
            for k, v in sbs["ratios"].items():
                table.add("Imagic vs port", k, f"{cfg['sd_size']}x{cfg['sd_size']}, fp32", v, "ratio", None)
        except Exception as e:  # keep the rest of the suite
            data["imagic_vs_reference"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"side by side failed: {e}")
        timings["imagic_vs_reference"] = time.perf_counter() - t0
    bad = [r for r in table.rows if not _finite(r["value"])]
    failed = [k for k in ("rectifier", "imagic_vs_reference", "imagic_sdxl") if "error" in data.get(k, {})]
    if "error" in data.get("rectifier", {}).get("cli_edit", {}):
        failed.append("rectifier CLI edit training")
        data["rectifier"]["error"] = data["rectifier"]["cli_edit"]["error"]
    data["table"] = table.rows
    data["suite_seconds"] = {**timings, "total": time.perf_counter() - t_start}
    if a.out:
        out = Path(a.out)
    elif a.dry_run:
        out = Path(tempfile.mkdtemp(prefix="sie_gpu_suite_")) / "gpu_suite_dry_run.json"
    else:
        tag = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(device).lower()).strip("-")
        out = ROOT / "benchmarks/results" / f"gpu_suite_{tag}_{datetime.now(timezone.utc):%Y%m%d}.json"
    write_result(out, data)
    print()
    print(table.render())
    print(f"\n{len(table.rows)} rows in {data['suite_seconds']['total']:.0f} s; written to {out}")
    if failed:
        print("failed: " + ", ".join(f"{k} ({data[k]['error']})" for k in failed))
    if bad:
        print(f"not finite: {', '.join(r['method'] + ' / ' + r['stage'] for r in bad)}")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
