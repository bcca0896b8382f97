"""Cost of switching between the base model and a view inside one sampling step, per call.

    python benchmarks/engine_switch.py --checkpoint random_sd15.safetensors [--comfyui /path/to/ComfyUI]
        [--size 16] [--calls 10] [--guided-steps 6] [--out benchmarks/results/engine_switch_cpu.json]
    python benchmarks/engine_switch.py --random      # SD 1.5 with random weights from the shipped configs

Measures eps calls (batch 1, latent size x size) on an SD 1.5 checkpoint:

* diffusers back end (:class:`core.sd.backend.DiffusersSD`): the plain model; inside ``views()``
  the base, a LoRA view (rank 4 on the attention projections, output-side), and base/view
  alternating in pairs;
* with ``--comfyui`` (run with ComfyUI's Python): the same on ComfyUI's MODEL, the LoRA given
  the native way (``comfy.sd.load_lora_for_models``) and seen as a view of the base
  (``view_spec_from_patched``), plus the load count of a ``views()`` block.

The switch cost is pair - (base + view): what alternating costs beyond the two calls.
:func:`switch_cost` and :func:`guided_step` (a DDIM step with SINE's model-based guidance,
the fine-tuned model a LoRA view of the base) are what ``benchmarks/gpu_suite.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, comfy_pack, cpu_name, header  # noqa: E402,F401  (cpu_name: kept importable from here)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, calls: int, device="cpu") -> float:
    """Median seconds of ``fn()`` over ``calls`` calls after one warm-up (CUDA synchronised)."""
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, spec, x, t, c, calls: int) -> dict:
    """eps seconds per call: the plain model, the base and the view inside ``views()``, and
    base/view alternating in pairs; ``switch_cost_s`` = pair - (base + view)."""
    import torch

    dev = x.device
    with torch.no_grad():
        plain = timed(lambda: model.eps(x, t, c), calls, dev)
        with model.views(spec) as (base, view):
            b = timed(lambda: base.eps(x, t, c), calls, dev)
            v = timed(lambda: view.eps(x, t, c), calls, dev)
            pair = timed(lambda: (base.eps(x, t, c), view.eps(x, t, c)), calls, dev)
    return {"plain_model_s": plain, "base_in_views_s": b, "view_s": v, "pair_s": pair,
            "switch_cost_s": pair - (b + v)}


def random_loras(shapes, device="cpu", rank: int = 4):
    """Rank-``rank`` LoRAs on the attention projections with random (non-zero) up weights."""
    import torch

    from core.lora import LoRAConfig, make_loras

    loras = make_loras(shapes, LoRAConfig(rank=rank, alpha=rank, targets="attention"), seed=0)
    g = torch.Generator().manual_seed(1)
    for lora in loras.values():
        lora.up.data.normal_(std=0.2, generator=g)
        lora.to(device)
    return loras


def switch_cost(model, size: int = 16, calls: int = 10, loras=None) -> dict:
    """:func:`measure` on a diffusers-back-end model with a LoRA view, latent ``size`` x ``size``."""
    import torch

    from core.seam import ViewSpec

    dev = torch.device(model.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size, size, generator=g).to(dev)
    t = torch.tensor([500], device=dev)
    with torch.no_grad():
        c = model.encode_text(["a photo of a cat"])
    if loras is None:
        loras = random_loras({k: tuple(v.shape) for k, v in model.unet_parameters().items()}, device=dev)
    return measure(model, ViewSpec(loras), x, t, c, calls)


def guided_step(model, size: int = 64, steps: int = 6, loras=None, guidance: float = 7.5, v: float = 0.7) -> dict:
    """Seconds per DDIM step (first = warm-up) of plain CFG and of SINE's model-based guidance
    (eq. 3) with the fine-tuned model as a LoRA view of the base inside the same step: two
    base predictions (empty and target prompt, one batch) plus the view's prediction."""
    import torch

    from core.guidance import cfg
    from core.sine.guidance import model_guidance
    from core.sampling import ddim_loop
    from core.seam import ViewSpec

    dev = torch.device(model.device)
    if loras is None:
        loras = random_loras({k: tuple(v.shape) for k, v in model.unet_parameters().items()}, device=dev)
    with torch.no_grad():
        u, c, c_hat = (model.encode_text([p]) for p in ("", "a photo of a dog", "a photo of a sks dog"))
    x_T = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
    out = {}
    with model.views(ViewSpec(loras)) as (base, view):
        def plain(x, tt, i):
            e_u, e_c = base.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([u, c])).chunk(2)
            return cfg(e_u, e_c, guidance)

        def sine(x, tt, i):
            e_u, e_c = base.eps(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([u, c])).chunk(2)
            e_ft = view.eps(x, tt, c_hat)
            return model_guidance(e_u, e_c, [e_ft], [1.0 - v], guidance, int(tt[0]), K=-1)  # every step guided

        for name, rule in (("ddim_cfg_step_s", plain), ("ddim_guided_lora_view_step_s", sine)):
            timer = Timer(dev)
            timer.start()
            ddim_loop(rule, x_T, model.alphas_cumprod, steps, on_step=timer)
            out[name] = timer.median(1)
    out["guided_over_cfg"] = out["ddim_guided_lora_view_step_s"] / out["ddim_cfg_step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="an SD 1.x single file")
    ap.add_argument("--random", action="store_true",
                    help="SD 1.5 with random weights built from the shipped configs (no checkpoint; diffusers only)")
    ap.add_argument("--guided-steps", type=int, default=0,
                    help="also time this many DDIM steps of CFG and of guidance with a LoRA view (diffusers)")
    ap.add_argument("--comfyui", default=None, help="a ComfyUI checkout (run this script with its Python)")
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not a.checkpoint and not (a.random and not a.comfyui):
        ap.error("give --checkpoint (or --random without --comfyui)")
    comfy_pack(a.comfyui, cpu=True)
    import torch

    sys.path.insert(0, str(ROOT))
    from core.sd.loader import load_sd15
    from core.seam import ViewSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, a.size, a.size, generator=g)
    t = torch.tensor([500])
    if a.random:
        from common import random_sd15

        d = random_sd15("cpu", torch.float32)
    else:
        d = load_sd15(a.checkpoint, device="cpu", dtype=torch.float32)
    c = d.encode_text(["a photo of a cat"])
    result = {**header(), "latent": [a.size, a.size]}
    loras = random_loras({k: tuple(v.shape) for k, v in d.unet_parameters().items()})
    result["diffusers"] = measure(d, ViewSpec(loras), x, t, c, a.calls)
    if a.guided_steps:
        result["diffusers_guided"] = guided_step(d, a.size, a.guided_steps, loras)
    if a.comfyui:
        import comfy.model_management as mm
        import comfy.sd
        from sie_pack.core.lora import lora_state_dict
        from sie_pack.nodes.comfy_views import ComfySD, view_spec_from_patched

        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=False, output_clip=True)
        lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora_state_dict(loras), 1.0, 0.0)
        view = view_spec_from_patched(model, lora_model)
        loads = []
        real = mm.load_models_gpu
        mm.load_models_gpu = lambda models, *p, **k: (loads.append(len(models)), real(models, *p, **k))[1]
        sd = ComfySD(model, clip)
        result["comfyui"] = measure(sd, view, x, t, c, a.calls)
        result["comfyui"]["loads_per_views_block"] = len(loads) - 1  # minus the plain model's own load
        result["comfyui"]["view_layers"] = len(view.weight_functions)
        mm.load_models_gpu = real
        import comfyui_version

        result["comfyui_version"] = comfyui_version.__version__
    print(json.dumps(result, indent=1))
    if a.out:
        from common import write_result

        write_result(a.out, result)


if __name__ == "__main__":
    main()
