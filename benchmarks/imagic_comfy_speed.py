"""Imagic's LoRA fine-tune step against its embedding step on ComfyUI's back end (run with ComfyUI's Python).

    $COMFYUI_DIR/.venv/bin/python benchmarks/imagic_comfy_speed.py --comfyui $COMFYUI_DIR \\
        --checkpoint random_sd15.safetensors [--size 256 --steps 4] [--out benchmarks/results/...json]

Loads the checkpoint with ComfyUI's own loader (MODEL, CLIP, VAE as Load Checkpoint gives them), wraps it as
the nodes do (``nodes.comfy_views.ComfySD``) and times :func:`imagic_speed.time_stages`' embedding and
LoRA r8 stages on it: the median s/step of each and their ratio, the figure issue 23 asks to be at most 1.3
on both back ends (both stages are one forward and one backward pass through the UNet).  The diffusers
back end's ratio is in ``imagic_vs_reference_cpu_256.json``.  ``tests/integration/make_random_sd15.py``
writes a random-weight checkpoint of the real architecture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import comfy_pack, header, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="a ComfyUI checkout (run this script with its Python)")
    ap.add_argument("--checkpoint", required=True, help="an SD 1.x single file")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="steps per stage (the first one is a warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the lower median of each stage counts")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    comfy_pack(a.comfyui)
    import comfy.sd
    import comfyui_version
    import torch
    from imagic_speed import time_stages
    from sie_pack.nodes.comfy_views import ComfySD

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=True, output_clip=True)
    sd = ComfySD(model, clip, vae)
    stages = ("embedding", "fine-tune (lora r8)")
    found: dict[str, list[float]] = {s: [] for s in stages}
    peaks: dict[str, list[float]] = {s: [] for s in stages}
    with torch.inference_mode(False):
        for _ in range(a.rounds):
            for row in time_stages(sd, a.size, a.steps, torch.device("cpu"), stages):
                found[row["stage"]].append(row["s_per_step"])
                peaks[row["stage"]].append(row["peak_gib"])
    best = {s: min(v) for s, v in found.items()}
    ratio = best["fine-tune (lora r8)"] / best["embedding"]
    print(f"LoRA r8 step / embedding step on ComfyUI's back end: {ratio:.2f}")
    result = {**header(), "back_end": f"ComfyUI {comfyui_version.__version__} (ComfySD over Load Checkpoint's "
                                      "MODEL, CLIP, VAE)", "checkpoint": Path(a.checkpoint).name, "size": a.size,
              "steps_per_stage": a.steps, "rounds": a.rounds,
              "stages": {s: {"s_per_step": best[s], "runs": found[s], "peak_gib": min(peaks[s])} for s in stages},
              "lora_step_over_embedding_step": ratio}
    if a.out:
        write_result(a.out, result)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
