"""Cost of switching between the base model and a view inside one sampling step, per call.

    python benchmarks/engine_switch.py --checkpoint random_sd15.safetensors [--comfyui /path/to/ComfyUI]
        [--size 16] [--calls 10] [--out benchmarks/results/engine_switch_cpu.json]

Measures eps calls (batch 1, latent size x size) on an SD 1.5 checkpoint:

* diffusers back end (:class:`core.sd.backend.DiffusersSD`): the plain model; inside ``views()``
  the base, a LoRA view (rank 4 on the attention projections, output-side), and base/view
  alternating in pairs;
* with ``--comfyui`` (run with ComfyUI's Python): the same on ComfyUI's MODEL, the LoRA given
  the native way (``comfy.sd.load_lora_for_models``) and seen as a view of the base
  (``view_spec_from_patched``), plus the load count of a ``views()`` block.

The switch cost is pair - (base + view): what alternating costs beyond the two calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, calls: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, spec, x, t, c, calls: int) -> dict:
    import torch

    with torch.no_grad():
        plain = timed(lambda: model.eps(x, t, c), calls)
        with model.views(spec) as (base, view):
            b = timed(lambda: base.eps(x, t, c), calls)
            v = timed(lambda: view.eps(x, t, c), calls)
            pair = timed(lambda: (base.eps(x, t, c), view.eps(x, t, c)), calls)
    return {"plain_model_s": plain, "base_in_views_s": b, "view_s": v, "pair_s": pair,
            "switch_cost_s": pair - (b + v)}


def random_loras(shapes, torch):
    from core.lora import LoRAConfig, make_loras

    loras = make_loras(shapes, LoRAConfig(rank=4, alpha=4, targets="attention"), seed=0)
    g = torch.Generator().manual_seed(1)
    for lora in loras.values():
        lora.up.data.normal_(std=0.2, generator=g)
    return loras


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--comfyui", default=None, help="a ComfyUI checkout (run this script with its Python)")
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.comfyui:
        sys.path.insert(0, a.comfyui)
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        args.cpu = True
    import importlib.util

    import torch

    spec_ = importlib.util.spec_from_file_location("sie_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec_)
    sys.modules["sie_pack"] = pack
    spec_.loader.exec_module(pack)
    sys.path.insert(0, str(ROOT))
    from core.sd.loader import load_sd15
    from core.seam import ViewSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, a.size, a.size, generator=g)
    t = torch.tensor([500])
    d = load_sd15(a.checkpoint, device="cpu", dtype=torch.float32)
    c = d.encode_text(["a photo of a cat"])
    result = {"machine": f"{cpu_name()}, {torch.get_num_threads()} threads, no GPU",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "command": " ".join(sys.argv), "latent": [a.size, a.size]}
    loras = random_loras({k: tuple(v.shape) for k, v in d.unet_parameters().items()}, torch)
    result["diffusers"] = measure(d, ViewSpec(loras), x, t, c, a.calls)
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
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
