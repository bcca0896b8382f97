"""The SinDDM demo as a new user meets it: wall time and sample quality, per CPU kind.

    python benchmarks/sinddm_demo.py [--kinds native,avx2-fp32] [--samples 16] \\
        [--out benchmarks/results/sinddm_demo_cpu.json]

For every CPU kind, runs ``python -m core.sinddm demo`` (what ``python3 run.py demo``
runs, with its default settings) in a fresh process and records the wall time in all
(start-up, pyramid, training, sampling, writing), the training time and pace, and the
sampling time.  Then draws ``--samples`` samples from the model it wrote and records the
paper's pixel diversity and the 7x7 patch SWD per scale (:mod:`core.sinddm.metrics`),
next to the untrained network's (what training must beat).

CPU kinds:

* ``native``: the machine as it is (bf16 autocast where the CPU has AVX512-BF16 or AMX,
  fp32 otherwise: :func:`core.sinddm.train.native_bf16`);
* ``avx2-fp32``: the same machine limited to AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``) and fp32 training (``--precision fp32``): the code path of
  a CPU without AVX-512, such as the 2-core AMD EPYC of the issue that asked for this.

``--previous-steps N`` (default 40) also times N steps of the previous demo settings
(128x100 coffee, width 48, batch 8) on each kind, so that a pace measured elsewhere
with those settings (0.57 s/step on a 2-core AMD EPYC without AVX-512) converts into an
estimate of the new demo's time there.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_result  # noqa: E402

KINDS = {
    "native": ({}, []),
    "avx2-fp32": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, ["--precision", "fp32"]),
}
PREVIOUS = dict(image="core/sinddm/data/coffee_128x100.png", width=48, batch=8)


def run_demo(kind: str, out: Path) -> dict:
    env_extra, args = KINDS[kind]
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "core.sinddm", "demo", "--out", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{kind}: the demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    log = proc.stdout
    trained = re.search(r"done in ([\d.]+) min", log)
    sampled = re.search(r"sampled .* in ([\d.]+) s", log)
    steps = re.search(r"training (\d+) steps, width (\d+), batch (\d+)", log)
    n = int(steps.group(1))
    train_s = float(trained.group(1)) * 60
    return {"command": " ".join(["python", "-m", "core.sinddm", "demo", *args]), "env": env_extra,
            "wall_s_in_all": round(wall, 1), "train_s": round(train_s, 1), "s_per_step": round(train_s / n, 4),
            "sample_s": float(sampled.group(1)), "steps": n, "width": int(steps.group(2)),
            "batch": int(steps.group(3)), "stdout": log.splitlines()}


def previous_pace(kind: str, steps: int) -> float:
    """Seconds per step of the previous demo settings on ``kind`` (mean of ``steps`` after 5 warm-up steps)."""
    env_extra, args = KINDS[kind]
    code = (
        "import sys, time, torch; sys.path.insert(0, '.');"
        "from PIL import Image; from core.sinddm import NetConfig, TrainConfig, build_pyramid;"
        "from core.sinddm.train import train;"
        f"pyr = build_pyramid(Image.open({PREVIOUS['image']!r}));"
        f"prec = {'fp32' if args else 'auto'!r}; t = [];"
        "cb = lambda i, n, info: t.append(time.perf_counter());"
        f"train(pyr, NetConfig({PREVIOUS['width']}), TrainConfig(steps={steps + 5}, batch_size={PREVIOUS['batch']},"
        " precision=prec), 'cpu', on_step=cb);"
        "print((t[-1] - t[4]) / (len(t) - 5))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env_extra},
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def quality(model_path: Path, samples: int) -> dict:
    import torch

    from sinddm_quality import measure

    from core.sinddm import SinDDM, load, sample
    from core.sinddm.model import seeded_net

    model = load(model_path, torch.device("cpu"))
    pyr = model.pyramid
    ref = (pyr.images[-1] + 1) / 2

    def rounded(m: SinDDM) -> dict:
        found = measure(sample(m, count=samples, seed=0, device=torch.device("cpu")), ref, pyr.spec.sizes)
        return {"diversity": round(found["diversity"], 4),
                "patch_swd_per_scale": [round(v, 4) for v in found["patch_swd_per_scale"]],
                "patch_swd_mean": round(found["patch_swd_mean"], 4)}

    flipped = measure(ref.flip(-1), ref, pyr.spec.sizes)["patch_swd_mean"]
    return {"samples": samples, "trained": rounded(model),
            "untrained": rounded(SinDDM.create(seeded_net(model.net.config, 0), pyr)),  # seeded: the same on every kind
            "training_image_flipped_patch_swd_mean": round(flipped, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="native,avx2-fp32", help=f"comma-separated, from {sorted(KINDS)}")
    ap.add_argument("--samples", type=int, default=16, help="samples for the quality figures (0: none)")
    ap.add_argument("--previous-steps", type=int, default=40, help="steps timed at the previous settings (0: none)")
    ap.add_argument("--out", default=None, help="JSON result file")
    a = ap.parse_args()
    kinds = [k for k in a.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"--kinds: unknown {unknown}; choose from {sorted(KINDS)}")
    result = {**header(), "kinds": {}}
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="sinddm_demo_") as tmp:
            r = run_demo(kind, Path(tmp))
            print(f"{kind}: {r['wall_s_in_all'] / 60:.1f} min in all, training {r['train_s'] / 60:.1f} min "
                  f"({r['s_per_step']:.3f} s/step), sampling {r['sample_s']:.0f} s", flush=True)
            if a.samples:
                r["quality"] = quality(Path(tmp) / "sinddm.safetensors", a.samples)
                q = r["quality"]
                print(f"  diversity {q['trained']['diversity']:.3f}, patch SWD {q['trained']['patch_swd_mean']:.4f} "
                      f"(untrained {q['untrained']['patch_swd_mean']:.4f}, training image flipped "
                      f"{q['training_image_flipped_patch_swd_mean']:.4f})", flush=True)
        if a.previous_steps:
            r["previous_settings"] = {**PREVIOUS, "s_per_step": round(previous_pace(kind, a.previous_steps), 4),
                                      "steps_timed": a.previous_steps}
            print(f"  previous settings: {r['previous_settings']['s_per_step']:.3f} s/step", flush=True)
        result["kinds"][kind] = r
    if a.out:
        write_result(a.out, result)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
