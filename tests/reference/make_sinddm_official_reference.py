"""Writes tests/data/sinddm_official_reference.json from the OFFICIAL SinDDM code.

    python tests/reference/make_sinddm_official_reference.py /path/to/SinDDM [--check]

``/path/to/SinDDM`` is a checkout of fallenshock/SinDDM at commit
e7107d9fd198928f26e278f99ec428e261726a45 (its HEAD when these numbers were made; the
folder holding ``SinDDM/functions.py``).  Its imports need einops, matplotlib,
scikit-image, tqdm and torchvision (all on PyPI; none is used by the functions called
here except through the imports).  ``--check`` recomputes and compares with the stored
file instead of writing it (exit status 1 on any difference).

Every number in the file comes from the official functions:

* ``geometry``: ``SinDDM.functions.create_img_scales(..., scale_factor=1.411,
  auto_scale=50000)`` (the arguments of the official ``main.py``) on a seeded
  random-noise PNG of each size: the scale sizes (W, H), n_scales and the recomputed r
  (``null`` when n_scales = 1, where the official r is a division by zero).
* ``coffee``: the same function on the bundled images core/sinddm/data/coffee_*.png
  (``errors`` = its ``rescale_losses``, the uint8-wrapped error), then
  ``SinDDM.models.MultiScaleGaussianDiffusion`` built as in ``main.py`` (T = 100,
  loss_factor 1, train_full_t) for ``start_steps`` (``num_timesteps_ideal``) and its
  ``gammas`` buffer: gamma at t = 0, at t = T[s] - 1 and the first t where gamma reaches
  the sampler's clamp 0.55.

The pack's own variants (e.g. the float-error pyramid) live in sinddm_own_reference.json.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "sinddm_official_reference.json"
COFFEE = ("coffee_128x100.png", "coffee_250x200.png")
GEOMETRY = ("300x150", "512x512", "1024x768", "100x400", "64x48", "40x300", "250x200", "128x100", "333x77")


def import_official(path: Path):
    sys.path.insert(0, str(path))
    import SinDDM.functions as functions
    import SinDDM.models as models

    return functions, models


def official_commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "e7107d9fd198928f26e278f99ec428e261726a45 (not checked: the folder is not a git checkout)"


def geometry(functions, size: str, tmp: Path) -> dict:
    w, h = map(int, size.split("x"))
    rng = np.random.default_rng(w * 10_000 + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / f"noise_{size}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # n_scales = 1: the official r divides by zero
        sizes, _, r, n = functions.create_img_scales(str(tmp) + "/", f"noise_{size}.png", scale_factor=1.411,
                                                     create=False, auto_scale=50000)
    r = float(r)
    return {"sizes_wh": [list(map(int, s)) for s in sizes], "n_scales": int(n),
            "r": r if n > 1 and math.isfinite(r) else None}


def coffee(functions, models, name: str) -> dict:
    folder = str(ROOT / "core" / "sinddm" / "data") + "/"
    sizes, losses, r, n = functions.create_img_scales(folder, name, scale_factor=1.411, create=False,
                                                      auto_scale=50000)
    diff = models.MultiScaleGaussianDiffusion(torch.nn.Identity(), n_scales=n, scale_factor=r, image_sizes=sizes,
                                              timesteps=100, train_full_t=True, scale_losses=losses, loss_factor=1,
                                              loss_type="l1", device="cpu", reblurring=True)
    steps = [int(v) for v in diff.num_timesteps_ideal]
    g = diff.gammas
    return {
        "errors": [float(v) for v in losses],
        "start_steps": steps,
        "gamma_train_t0": [float(g[s - 1, 0]) for s in range(1, n)],
        "gamma_train_at_T_minus_1": [float(g[s - 1, steps[s] - 1]) for s in range(1, n)],
        "first_t_gamma_ge_055": [int((g[s - 1] >= 0.55).nonzero()[0]) for s in range(1, n)],
    }


def compute(official: Path) -> dict:
    functions, models = import_official(official)
    with tempfile.TemporaryDirectory() as tmp:
        geo = {size: geometry(functions, size, Path(tmp)) for size in GEOMETRY}
    return {
        "source": (f"computed by tests/reference/make_sinddm_official_reference.py from create_img_scales / "
                   f"MultiScaleGaussianDiffusion of fallenshock/SinDDM at {official_commit(official)} "
                   f"(numpy {np.__version__}, Pillow {Image.__version__}, torch {torch.__version__}); seeded "
                   f"random-noise images for the geometry cases, the bundled coffee images for the errors"),
        "geometry": geo,
        "coffee": {name: coffee(functions, models, name) for name in COFFEE},
    }


def differences(new, old, path="") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        out = [f"{path}/{k}: only in one" for k in set(new) ^ set(old)]
        for k in set(new) & set(old):
            out += differences(new[k], old[k], f"{path}/{k}")
        return out
    if isinstance(new, list) and isinstance(old, list):
        if len(new) != len(old):
            return [f"{path}: length {len(new)} != {len(old)}"]
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(new, float) and isinstance(old, float):
        return [] if new == old or abs(new - old) <= 1e-12 * abs(old) else [f"{path}: {new!r} != {old!r}"]
    return [] if new == old else [f"{path}: {new!r} != {old!r}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("official", type=Path, help="checkout of fallenshock/SinDDM (folder with SinDDM/models.py)")
    ap.add_argument("--check", action="store_true", help="compare with the stored file instead of writing it")
    args = ap.parse_args()
    ref = compute(args.official.resolve())
    if args.check:
        old = json.loads(OUT.read_text())
        diffs = [d for d in differences(ref, old) if not d.startswith("/source")]
        print("\n".join(diffs) if diffs else f"{OUT.name}: every number reproduced by the official code")
        return 1 if diffs else 0
    OUT.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
