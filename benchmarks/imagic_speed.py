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

Side by side with the diffusers community pipeline (``examples/community/imagic_stable_diffusion.py``,
a local copy: not part of the pack)::

    python benchmarks/imagic_speed.py --reference /path/to/imagic_stable_diffusion.py --size 256 --steps 4 \
        --rounds 2 --out benchmarks/results/imagic_vs_reference_cpu_256.json

runs every stage in its own process (``benchmarks/imagic_reference.py``), interleaved (reference
embedding, ours, reference fine-tune, our LoRA r8, our full fine-tune, our full fine-tune with
gradient checkpointing; ``--rounds`` times), on random-weight SD 1.5 with the same seed on both
sides, fp32, batch 1, and records each stage's median s/step and peak memory (the lower of the
rounds' medians and peaks) with the ratios ours / reference.
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


SIDE_BY_SIDE = (("reference", "imagic", "embedding", {}), ("ours", "imagic", "embedding", {}),
                ("reference", "imagic", "finetune", {}), ("ours", "imagic", "fine-tune (lora r8)", {}),
                ("ours", "imagic", "fine-tune (full)", {}),
                ("ours", "imagic", "fine-tune (full)", {"gradient_checkpointing": True}))
"""(side, method, stage, options) of each process :func:`side_by_side` runs, in order, every round."""


def method_runs(method: str) -> tuple:
    """The side-by-side runs of SINE's or LayerDiffusion's fine-tunes: the port's full fine-tune beside them."""
    return (("reference", "imagic", "finetune", {}), ("ours", method, "fine-tune (lora r8)", {}),
            ("ours", method, "fine-tune (full)", {}))


def side_by_side(reference: str, size: int, steps: int, rounds: int, device: str | None = None,
                 log=print, runs: tuple = SIDE_BY_SIDE) -> dict:
    """Each (side, method, stage, options) of ``runs`` in its own process, ``rounds`` times interleaved; the
    best median s/step and the lowest peak of each, and the ratios ours / reference."""
    import json
    import subprocess

    found: dict[str, list[dict]] = {}
    for r in range(rounds):
        for side, method, stage, options in runs:
            label = (f"{side}: {stage}" if method == "imagic" or side == "reference" else f"ours: {method} {stage}") \
                + (" + gradient checkpointing" if options.get("gradient_checkpointing") else "")
            cmd = [sys.executable, str(Path(__file__).with_name("imagic_reference.py")), "--side", side, "--stage",
                   stage, "--method", method, "--size", str(size), "--steps", str(steps), "--options",
                   json.dumps(options)]
            if side == "reference":
                cmd += ["--reference", reference]
            if device:
                cmd += ["--device", device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{label} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            found.setdefault(label, []).append(row)
            log(f"round {r + 1}  {label:<62} {row['s_per_step']:8.3f} s/step   peak {row['peak_gib']:6.2f} GiB")
    stages = {k: {"s_per_step": min(x["s_per_step"] for x in v), "peak_gib": min(x["peak_gib"] for x in v),
                  "runs": [{"s_per_step": x["s_per_step"], "peak_gib": x["peak_gib"]} for x in v]}
              for k, v in found.items()}
    ratios = {}
    ref_ft = stages["reference: finetune"]
    if "reference: embedding" in stages and "ours: embedding" in stages:
        ref_emb, emb = stages["reference: embedding"], stages["ours: embedding"]
        ratios["embedding (time)"] = emb["s_per_step"] / ref_emb["s_per_step"]
        ratios["embedding (memory)"] = emb["peak_gib"] / ref_emb["peak_gib"]
    for label, v in stages.items():
        if label.startswith("ours: ") and "fine-tune" in label:
            name = label[len("ours: "):]
            ratios[f"{name} / reference full fine-tune (time)"] = v["s_per_step"] / ref_ft["s_per_step"]
            ratios[f"{name} / reference full fine-tune (memory)"] = v["peak_gib"] / ref_ft["peak_gib"]
    if "ours: embedding" in stages and "ours: fine-tune (lora r8)" in stages:
        ratios["our LoRA step / our embedding step"] = (stages["ours: fine-tune (lora r8)"]["s_per_step"]
                                                       / stages["ours: embedding"]["s_per_step"])
    for k, v in ratios.items():
        log(f"{k:<76} {v:6.2f}")
    return {"stages": stages, "ratios": ratios}


def write_side_by_side(path: str, reference: str, size: int, steps: int, rounds: int, result: dict) -> Path:
    """The side-by-side result with the machine, date, command and the reference file's digest."""
    import hashlib

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = {**header(dev), "model": "SD 1.5 with random weights (shipped configs), fp32, batch 1", "size": size,
            "steps_per_process": steps, "rounds": rounds,
            "reference_file_sha256": hashlib.sha256(Path(reference).read_bytes()).hexdigest(), **result}
    return write_result(path, data)


def reference_args(ap, method: str) -> None:
    """``--reference`` and ``--rounds`` for ``method``'s benchmark (its fine-tunes beside the port's)."""
    ap.add_argument("--reference", default=None,
                    help="a local copy of diffusers' examples/community/imagic_stable_diffusion.py: this method's "
                         "LoRA and full fine-tune steps beside the port's full fine-tune, each in its own process "
                         "(imagic_speed.side_by_side; random SD 1.5, fp32, --size default 256)")
    ap.add_argument("--rounds", type=int, default=1, help="--reference: interleaved rounds")


def reference_main(a, method: str) -> None:
    """Run :func:`method_runs` of ``method`` side by side as ``a`` (parsed :func:`reference_args`) asks."""
    size, steps = a.size or 256, a.steps or 4
    result = side_by_side(a.reference, size, steps, a.rounds, a.device, log=lambda m: print(m, flush=True),
                          runs=method_runs(method))
    if a.out:
        print(f"wrote {write_side_by_side(a.out, a.reference, size, steps, a.rounds, result)}")


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
    ap.add_argument("--reference", default=None, help="a local copy of diffusers' examples/community/"
                    "imagic_stable_diffusion.py: time it and ours side by side (random SD 1.5, fp32)")
    ap.add_argument("--rounds", type=int, default=1, help="--reference: interleaved rounds")
    a = ap.parse_args()
    if a.reference:
        result = side_by_side(a.reference, a.size, a.steps, a.rounds, a.device, log=lambda m: print(m, flush=True))
        if a.out:
            print(f"wrote {write_side_by_side(a.out, a.reference, a.size, a.steps, a.rounds, result)}")
        return
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
