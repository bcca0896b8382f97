"""Imagic per-stage speed and peak memory, standalone (diffusers back end).

    python benchmarks/imagic_speed.py --checkpoint v1-5-pruned-emaonly.safetensors --size 512   # a GPU
    python benchmarks/imagic_speed.py --random --size 512 --full      # random-weight SD 1.5, no checkpoint file
    python benchmarks/imagic_speed.py --tiny                                                       # CPU, tiny model

For each stage — embedding optimisation, LoRA fine-tuning, full fine-tuning (``--full``)
and DDIM sampling with CFG — the median seconds per step after a warm-up and the peak
memory of the stage (GPU: ``max_memory_allocated``; CPU: the process's peak RSS since
the stage began), then the projected time of a whole edit at the SD ports' settings
(500 embedding + 1000 fine-tuning steps + 50 DDIM steps).  Gradient checkpointing and
bf16 autocast are on for a GPU, off for the CPU, as in the nodes.  ``--weight-space`` also
times LoRA fine-tuning with weight-space adapters (full-size W + BA every call) against the
pack's output-side adapters.  ``--out`` writes a JSON file with the machine, date and command.
:func:`time_stages` is what ``benchmarks/gpu_suite.py`` runs.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Timer, header, sd_model, sd_parser, write_result  # noqa: E402
from memory import peak_mib, reset_peak  # noqa: E402

from core.imagic import EmbeddingConfig, FineTuneConfig, LoRAConfig, finetune, optimize_embedding  # noqa: E402
from core.sampling import ddim_sample  # noqa: E402


def peak_gib(device) -> float:
    return peak_mib(device) / 1024


class WeightSpaceLoRA(torch.nn.Module):
    """A LoRA seen only as a weight function W -> W + BA (no ``output_delta``): the views then
    rebuild the full-size weight every call and back-propagate through it, as weight-space
    adapters do.  Used to time what the output-side LoRA saves."""

    def __init__(self, lora):
        super().__init__()
        self.inner = lora

    def forward(self, weight):
        return self.inner(weight)

    def delta(self):
        return self.inner.delta()

    def state(self, module):
        return self.inner.state(module)


@contextmanager
def weight_space_loras():
    """Inside the block, ``finetune(mode="lora")`` trains weight-space adapters."""
    import importlib

    ft = importlib.import_module("core.imagic.finetune")  # the module (core.imagic.finetune is also a function)
    real = ft.make_loras
    ft.make_loras = lambda *a, **k: {n: WeightSpaceLoRA(lo) for n, lo in real(*a, **k).items()}
    try:
        yield
    finally:
        ft.make_loras = real


STAGES = ("embedding", "fine-tune (lora r8)", "fine-tune (lora r8, weight-space)", "fine-tune (full)",
          "DDIM + CFG sampling")


def time_stages(model, size: int = 512, steps: int = 6, device=None, stages=("embedding", "fine-tune (lora r8)",
                "DDIM + CFG sampling"), gpu: bool | None = None, log=print, options: dict | None = None) -> list[dict]:
    """Median seconds per step (first step = warm-up) and peak memory of each Imagic stage.

    ``stages``: any of :data:`STAGES`.  ``gpu`` (default: CUDA device) turns on gradient
    checkpointing and bf16 autocast, as the nodes do on a GPU.  ``options``: further settings of the
    fine-tune configs (e.g. ``{"gradient_checkpointing": True}``).
    """
    options = dict(options or {})
    device = torch.device(device or model.device)
    gpu = device.type == "cuda" if gpu is None else gpu
    img = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = model.encode(img.to(device))
        e_tgt = model.encode_text(["a photo of a dog"])
        uncond = model.encode_text([""])
    log(f"{size}x{size} (latent {tuple(latent.shape)}) on {device} ({torch.get_num_threads()} threads), "
        f"checkpointing {'on' if gpu else 'off'}, {'bf16 autocast' if gpu else 'fp32'}")
    ft = {"gradient_checkpointing": gpu, **options}
    lora = FineTuneConfig("lora", steps, lora=LoRAConfig(8, 8.0), **ft)
    runs = {
        "embedding": lambda tm: optimize_embedding(model, latent, e_tgt, EmbeddingConfig(steps, 1e-3, 0, ft["gradient_checkpointing"]),
                                                   on_step=tm),
        "fine-tune (lora r8)": lambda tm: finetune(model, latent, e_tgt, lora, on_step=tm),
        "fine-tune (full)": lambda tm: finetune(
            model, latent, e_tgt, FineTuneConfig("full", steps, **ft), on_step=tm),
        "DDIM + CFG sampling": lambda tm: ddim_sample(model, e_tgt, uncond, shape=tuple(latent.shape),
                                                       steps=steps, guidance=7.5, on_step=tm),
    }

    def weight_space(tm):
        with weight_space_loras():
            finetune(model, latent, e_tgt, lora, on_step=tm)

    runs["fine-tune (lora r8, weight-space)"] = weight_space
    rows = []
    for label in stages:
        timer = Timer(device)
        reset_peak(device)
        timer.start()
        runs[label](timer)
        rows.append({"stage": label, "s_per_step": timer.median(1), "peak_gib": peak_gib(device),
                     "steps_timed": max(len(timer.times) - 1, 1)})
        log(f"  {label:<34} {rows[-1]['s_per_step']:8.3f} s/step   peak {rows[-1]['peak_gib']:6.2f} GiB")
    return rows


def whole_edit(rows: list[dict]) -> dict:
    """Projected minutes (and peak GiB) of a whole edit at the SD ports' settings, per fine-tune mode."""
    per = {r["stage"]: r["s_per_step"] for r in rows}
    out = {}
    for mode in ("lora r8", "full"):
        key = f"fine-tune ({mode})"
        if key in per and "embedding" in per and "DDIM + CFG sampling" in per:
            total = 500 * per["embedding"] + 1000 * per[key] + 50 * per["DDIM + CFG sampling"]
            peak = max(r["peak_gib"] for r in rows if r["stage"] in ("embedding", key, "DDIM + CFG sampling"))
            out[mode] = {"minutes": total / 60, "peak_gib": peak}
    return out


def main() -> None:
    ap = sd_parser(__doc__)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6, help="steps timed per stage (first one is warm-up)")
    ap.add_argument("--full", action="store_true", help="also time full fine-tuning (a float32 copy of the UNet "
                                                        "with Adam: needs a GPU with room for it)")
    ap.add_argument("--weight-space", action="store_true",
                    help="also time LoRA fine-tuning with weight-space adapters (to compare with output-side)")
    ap.add_argument("--no-sampling", action="store_true", help="skip the DDIM stage")
    ap.add_argument("--no-embedding", action="store_true", help="skip the embedding stage")
    a = ap.parse_args()
    model, name, device, _ = sd_model(ap, a)
    print(name, flush=True)
    stages = [s for s, on in (("embedding", not a.no_embedding), ("fine-tune (lora r8)", True),
                              ("fine-tune (lora r8, weight-space)", a.weight_space), ("fine-tune (full)", a.full),
                              ("DDIM + CFG sampling", not a.no_sampling)) if on]
    rows = time_stages(model, a.size, a.steps, device, stages, log=lambda m: print(m, flush=True))
    edit = whole_edit(rows)
    for mode, e in edit.items():
        print(f"whole edit, {mode} (500 + 1000 + 50 steps): {e['minutes']:.1f} min, peak {e['peak_gib']:.2f} GiB")
    per = {r["stage"]: r["s_per_step"] for r in rows}
    ratio = None
    if "fine-tune (lora r8, weight-space)" in per:
        ratio = per["fine-tune (lora r8, weight-space)"] / per["fine-tune (lora r8)"]
        print(f"weight-space / output-side LoRA step time: {ratio:.2f}")
    if a.out:
        data = {**header(device), "model": name, "size": a.size, "stages": rows, "whole_edit": edit}
        if ratio is not None:
            data["lora_weight_space_over_output_side"] = ratio
        print(f"wrote {write_result(a.out, data)}")


if __name__ == "__main__":
    main()
