"""One Imagic stage of the diffusers community pipeline, or of the pack, timed in its own process.

``imagic_speed.py --reference PATH`` runs this script once per (side, stage), interleaved, and
compares; it is not meant to be called by hand, but can be::

    python benchmarks/imagic_reference.py --side reference --stage finetune --reference PATH --size 256 --steps 4
    python benchmarks/imagic_reference.py --side ours --stage "fine-tune (lora r8)" --size 256 --steps 4
    python benchmarks/imagic_reference.py --side ours --method sine --stage "fine-tune (full)" --size 256 --steps 4

PATH is a local copy of ``examples/community/imagic_stable_diffusion.py`` (huggingface/diffusers;
not part of the pack).  Both sides run on Stable Diffusion 1.5 with random weights built from the
pack's shipped configs with the same seed (the same weights), in float32, batch 1, without gradient
checkpointing (the port has none).  The reference's ``train()`` is called as shipped with one of its
two step counts set to 0, so a process runs one stage: ``embedding`` (its text-embedding loop) or
``finetune`` (its full UNet fine-tune).  Its seconds per step are the intervals between successive
UNet calls (one per step in both loops; CUDA synchronised), the last one closed when ``train()``
returns; the first step is the warm-up.  Peak memory: CUDA ``max_memory_allocated``, CPU the
process's peak resident set, from just before the stage (the model already built).

On the CPU accelerate creates no GradScaler for the port's ``mixed_precision="fp16"`` (its backward is
a plain ``loss.backward()``) and the port never autocasts its UNet (it does not ``prepare`` it), so
both sides compute in float32.  Prints one JSON line: {side, stage, s_per_step, peak_gib, ...}.

``--method sine`` / ``layerdiffusion`` (with ``--side ours``) times that method's fine-tune instead, LoRA r8 or
full, on the same model and size: SINE on the whole image (``sine_speed.py``'s "LoRA" / "full" rows, its
prompt), LayerDiffusion's layered fine-tune (eq. 6, ``layerdiffusion_speed.py``'s masks: a centred box and an
all-zero reference mask, e_opt = e_a).  They share the fit loop and the adapters with Imagic, so the same
ratios to the port's full fine-tune should hold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from common import random_sd15  # noqa: E402
from memory import peak_mib, reset_peak, sync  # noqa: E402

REFERENCE_STAGES = ("embedding", "finetune")


def load_port(path: str | Path):
    """The community pipeline's module, imported from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--reference {path}: no such file (a local copy of diffusers' "
                         "examples/community/imagic_stable_diffusion.py)")
    spec = importlib.util.spec_from_file_location("imagic_community_pipeline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def time_reference(port, model, stage: str, size: int, steps: int) -> dict:
    """Seconds per step and peak memory of one stage of the port's ``train()`` on ``model``'s modules."""
    from diffusers import DDIMScheduler
    from PIL import Image

    device = model.device
    scheduler = DDIMScheduler.from_pretrained(str(ROOT / "core/sd/configs/sd15/scheduler"))
    pipe = port.ImagicStableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                              tokenizer=model.tokenizer, unet=model.unet, scheduler=scheduler,
                                              safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((torch.rand(size, size, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .to(torch.uint8).numpy())
    calls: list[float] = []

    def tick(module, args, kwargs):
        sync(device)
        calls.append(time.perf_counter())

    handle = model.unet.register_forward_pre_hook(tick, with_kwargs=True)
    n_emb, n_ft = (steps, 0) if stage == "embedding" else (0, steps)
    reset_peak(device)
    try:
        pipe.train("a photo of a dog", image, height=size, width=size, generator=torch.Generator().manual_seed(0),
                   text_embedding_optimization_steps=n_emb, model_fine_tuning_optimization_steps=n_ft)
        sync(device)
        calls.append(time.perf_counter())
    finally:
        handle.remove()
    times = [b - a for a, b in zip(calls, calls[1:])]
    if len(times) != steps:
        raise RuntimeError(f"expected {steps} UNet calls in the port's {stage} loop, saw {len(times)}")
    return {"s_per_step": statistics.median(times[1:] or times), "steps_timed": max(len(times) - 1, 1),
            "peak_gib": peak_mib(device) / 1024, "times": times}


OURS_FINETUNES = {"fine-tune (lora r8)": "lora", "fine-tune (full)": "full"}


def time_method_finetune(model, method: str, stage: str, size: int, steps: int, options: dict) -> dict:
    """Seconds per step and peak memory of SINE's or LayerDiffusion's fine-tune (``stage``: a key of
    :data:`OURS_FINETUNES`) on ``model`` at ``size``."""
    from common import Timer, step_stats

    mode = OURS_FINETUNES[stage]
    device = model.device
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=gen)
    timer = Timer(device)
    if method == "sine":
        from core.sine import SineFineTuneConfig, finetune_sine
        from sine_speed import FINETUNE_PROMPT

        cond = model.encode_text([FINETUNE_PROMPT])
        config = SineFineTuneConfig(mode=mode, steps=steps, patches=False, **options)
        reset_peak(device)
        timer.start()
        finetune_sine(model, image.to(device), cond, config, on_step=timer, prompt=FINETUNE_PROMPT)
    elif method == "layerdiffusion":
        from core.layerdiffusion import LayeredFineTuneConfig, finetune_layered
        from layerdiffusion_speed import OBJECT_TEXT, masks

        with torch.no_grad():
            latent = model.encode(image.to(device))
            ref = model.encode(torch.rand(1, 3, size, size, generator=gen).to(device))
            e_opt = model.encode_text([OBJECT_TEXT])
        m = masks(size, tuple(latent.shape[-2:]))
        config = LayeredFineTuneConfig(mode=mode, steps=steps, **options)
        reset_peak(device)
        timer.start()
        finetune_layered(model, latent, ref, e_opt, m["M"], m["M_r"], config, on_step=timer)
    else:
        raise SystemExit(f"--method: imagic, sine or layerdiffusion, not {method!r}")
    return {**step_stats(timer), "peak_gib": peak_mib(device) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("reference", "ours"), required=True)
    ap.add_argument("--stage", required=True, help="reference: embedding | finetune; ours: a stage of "
                                                     "imagic_speed.STAGES")
    ap.add_argument("--reference", default=None, help="the community pipeline file (--side reference)")
    ap.add_argument("--method", default="imagic", help="--side ours: imagic, sine or layerdiffusion")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="steps run (the first is the warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--options", default="{}", help="ours: JSON of FineTuneConfig / EmbeddingConfig options "
                                                     "(gradient_checkpointing, ...)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.side == "reference":
        if a.stage not in REFERENCE_STAGES:
            raise SystemExit(f"--stage for the reference: one of {REFERENCE_STAGES}")
        port = load_port(a.reference)
    model = random_sd15(device, torch.float32)
    if a.side == "reference":
        row = time_reference(port, model, a.stage, a.size, a.steps)
    elif a.method != "imagic":
        row = time_method_finetune(model, a.method, a.stage, a.size, a.steps, json.loads(a.options))
    else:
        from imagic_speed import time_stages

        row = time_stages(model, a.size, a.steps, device, (a.stage,), gpu=False, log=lambda m: None,
                          options=json.loads(a.options))[0]
    print(json.dumps({"side": a.side, "method": a.method, "stage": a.stage, "size": a.size, **row}), flush=True)


if __name__ == "__main__":
    main()
